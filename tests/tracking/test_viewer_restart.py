"""omniboard comes back after its database restarts: omniboard 2.16.1 gives up its
connection after 30 s and answers HTTP 500 "pool destroyed" from then on, so `medseg db
omniboard` restarts it behind the same address. A server of its own: the test stops it.
Its runs table leaves the data commands' runs out by default, one click away."""

import signal
import time
import urllib.error
import urllib.request
from datetime import datetime

import pymongo
import pytest

from medseg import db
from tests.tracking.support import Database, browser_page, start_viewer

pytestmark = pytest.mark.slow


def runs_answer(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/Runs?select=_id", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_until(condition, timeout: float, what: str, log) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(1)


def test_omniboard_answers_again_after_a_database_restart(tmp_path):
    server = db.start_on_free_port(tmp_path / "server")
    client = pymongo.MongoClient(server.url)
    client.medseg.runs.insert_many([
        {"_id": run_id, "experiment": {"name": name}, "command": command, "status": "COMPLETED",
         "start_time": datetime.utcnow(), "heartbeat": datetime.utcnow(), "config": {},
         "host": {}, "meta": {}, "info": {}}
        for run_id, name, command in [(1, "sadaan_data", "generate_data"), (2, "sadaan", "main")]])
    client.close()
    port = db.free_port()
    log = tmp_path / "omniboard.log"
    process = start_viewer("omniboard", Database(server.url, "medseg", None), port, log)
    api = f"http://127.0.0.1:{port}/sacred/api/v1"
    try:
        wait_until(lambda: runs_answer(api), 300, "omniboard did not answer", log)
        server.stop()
        time.sleep(35)  # longer than omniboard keeps trying to reconnect
        server.start()
        wait_until(lambda: runs_answer(api), 120, "omniboard did not answer again", log)
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/sacred")
            page.get_by_text("1 experiments").wait_for(timeout=60_000)
            shown = page.locator(".fixedDataTableRowLayout_rowWrapper").all_inner_texts()
            page.screenshot(path=str(tmp_path / "after-restart.png"))
            page.locator("span.tag", has_text="Experiment Name").click()
            page.get_by_text("2 experiments").wait_for(timeout=30_000)
            all_runs = page.locator(".fixedDataTableRowLayout_rowWrapper").all_inner_texts()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        server.stop()
    assert "restarting it" in log.read_text()
    assert any("sadaan\nmain" in row for row in shown)
    assert not any("sadaan_data" in row for row in shown)
    assert any("sadaan_data\ngenerate_data" in row for row in all_runs)
