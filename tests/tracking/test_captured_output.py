import re

from ingredients.experiment import collapse_terminal_updates, filter_captured_output


def test_progress_bar_updates_keep_their_final_state():
    text = "start\n" + "".join(f"\repoch 1: {i}%" for i in range(101)) + "\nend\n"
    assert collapse_terminal_updates(text) == "start\nepoch 1: 100%\nend\n"


def test_a_bar_still_moving_keeps_its_carriage_return_for_the_next_chunk():
    first = filter_captured_output("a\r\rprogress 10%\r")
    assert first.endswith("\r")
    assert filter_captured_output(first + "progress 100%\n") == "progress 100%\n"


def test_backspaces_are_applied():
    assert collapse_terminal_updates("abc\b\bX\n") == "aXc\n"


def test_long_output_keeps_head_and_tail_within_the_limit():
    lines = [f"line {i:06d}" for i in range(100_000)]
    text = "\n".join(lines) + "\n"
    kept = filter_captured_output(text, limit=50_000)
    assert len(kept) <= 50_000 + 60
    assert kept.startswith("line 000000\n")
    assert kept.endswith("line 099999\n")
    left_out = int(re.search(r"\[\.\.\. (\d+) characters left out \.\.\.\]", kept).group(1))
    assert left_out + len(kept) - len(re.search(r"\n\[.*\]\n", kept).group(0)) == len(text)


def test_repeated_cuts_keep_one_marker_and_count_everything_left_out():
    """Sacred filters the whole output again at every heartbeat."""
    total, kept = 0, ""
    for chunk in range(20):
        new = "".join(f"chunk {chunk} line {i:05d}\n" for i in range(2000))
        total += len(new)
        kept = filter_captured_output(kept + new, limit=20_000)
    assert kept.count("characters left out") == 1
    marker = re.search(r"\n\[\.\.\. (\d+) characters left out \.\.\.\]\n", kept)
    assert int(marker.group(1)) + len(kept) - len(marker.group(0)) == total
    assert kept.startswith("chunk 0 line 00000\n")
    assert kept.endswith("chunk 19 line 01999\n")
