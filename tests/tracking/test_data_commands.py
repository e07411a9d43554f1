"""Data commands are recorded (how the data was made is provenance) under `<experiment>_data`,
so the experiment's own runs are its training runs; their last line ends with its newline."""

import subprocess
import sys

from tests.tracking.support import SADAAN, Finished, environment


def test_generate_data_is_recorded_apart_from_training_runs(tmp_path, database):
    # Unbuffered, print writes a line and its newline apart: Sacred's next log line (which
    # another process copies) used to land between them.
    env = environment(MEDSEG_MONGO_URL=database.url, PYTHONUNBUFFERED="1")
    data = tmp_path / "data"
    completed = subprocess.run(
        [sys.executable, str(SADAAN), "generate_data", "with", *database.tracking(),
         f"dataset_path={data}", "synthetic.num_train=2", "synthetic.num_val=1", "synthetic.num_test=0",
         "synthetic.image_size=[16,16,16]"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    done = Finished(completed.returncode, completed.stdout, completed.stderr)
    assert done.returncode == 0, done.output
    assert done.stdout == f"wrote {data}\n"
    run = database.run(done.started_id())
    assert run["experiment"]["name"] == "sadaan_data" and run["command"] == "generate_data"
    assert f"wrote {data}\n" in run["captured_out"]
    assert database.db.runs.count_documents({"experiment.name": "sadaan"}) == 0
