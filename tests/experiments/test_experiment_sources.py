"""What an experiment records of its own file: the caller's file as main file and base folder,
and the git state of its repository as it is when the experiment is built (start-up asks git
once per repository; a later experiment in the same process asks again)."""

import runpy
import subprocess

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]


def _git(folder, *args):
    return subprocess.run([*GIT, *args], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.strip()


def _build(path):
    return runpy.run_path(str(path))["ex"]


def test_main_file_and_git_state_follow_the_repository(tmp_path):
    script = tmp_path / "probe_experiment.py"
    script.write_text("from ingredients.experiment import MedsegExperiment\n"
                      "ex = MedsegExperiment('probe')\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")

    first = _build(script)
    assert first.mainfile.filename == str(script)
    assert first.base_dir == str(tmp_path)
    assert (first.mainfile.commit, first.mainfile.is_dirty) == (_git(tmp_path, "rev-parse",
                                                                     "HEAD"), False)

    script.write_text(script.read_text() + "# edited\n")
    edited = _build(script)
    assert edited.mainfile.is_dirty is True

    _git(tmp_path, "commit", "-qam", "second")
    committed = _build(script)
    assert committed.mainfile.commit == _git(tmp_path, "rev-parse", "HEAD") != first.mainfile.commit
    assert committed.mainfile.is_dirty is False
