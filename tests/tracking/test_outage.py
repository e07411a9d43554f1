"""The database stopped for 30 s in the middle of a real SADAAN run, then started again: the
run finishes, and the database ends up with every metric step, every artifact and the final
status, as if nothing had happened."""

import subprocess
import threading
import time

import pytest

from medseg import db
from tests.tracking.support import SADAAN, command, environment, open_database, sadaan_updates

pytestmark = pytest.mark.slow

OUTAGE_S = 30
EPOCHS = 12
STEPS_PER_EPOCH = 4  # 4 training cases, one per step


def collect(stream, lines: list[str]) -> threading.Thread:
    """Read a process's output in the background so it never blocks on a full pipe."""
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


def test_database_away_for_30_s_mid_run_loses_nothing(tmp_path, sadaan_data):
    server = db.start_on_free_port(tmp_path / "server")
    database = open_database(server.url, "outage")
    updates = sadaan_updates(sadaan_data, database, f"training.num_epochs={EPOCHS}",
                             "logging.visualize_predictions=True", "checkpoint.save_frequency=1",
                             "tracking.flush_timeout_s=120")
    process = subprocess.Popen(command(SADAAN, *updates), cwd=tmp_path,
                               env=environment(MEDSEG_MONGO_URL=server.url),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = collect(process.stdout, lines)
    try:
        first_epoch = tmp_path / "checkpoints" / "sadaan" / "1" / "checkpoint_epoch_1.pth"
        deadline = time.monotonic() + 300
        while not first_epoch.exists():
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "epoch 1 did not finish in time"
            time.sleep(0.2)
        server.stop()
        stopped = time.monotonic()
        time.sleep(OUTAGE_S)
        epochs_during_outage = len(list(first_epoch.parent.glob("checkpoint_epoch_*.pth"))) - 1
        server.start()
        process.wait(timeout=600)
        reader.join(timeout=10)
        output = "".join(lines)
        assert process.returncode == 0, output[-3000:]
        print(f"database away {OUTAGE_S} s; {epochs_during_outage} epochs trained meanwhile; "
              f"run ended {time.monotonic() - stopped:.0f} s after the stop")

        run = database.run(1)
        assert run["status"] == "COMPLETED"
        assert run["result"]["epochs_run"] == EPOCHS
        metrics = database.metrics(1)
        assert metrics["val_dice"]["steps"] == list(range(1, EPOCHS + 1))
        assert metrics["train_loss"]["steps"] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
        assert all(m["steps"] == list(range(1, EPOCHS + 1))
                   for name, m in metrics.items() if name.startswith("val_") or name == "lr")
        assert metrics["test_dice"]["steps"] == [0]
        names = [a["name"] for a in run["artifacts"]]
        assert [n for n in names if n.startswith("predictions_epoch_")] == [
            f"predictions_epoch_{epoch:03d}.png" for epoch in range(1, EPOCHS + 1)]
        assert {"training_curves.png", "best_model.pth", "last_model.pth",
                "test_metrics.json"} <= set(names)
        assert database.artifact_bytes(1, "predictions_epoch_012.png") == (
            first_epoch.parent / "predictions_epoch_012.png").read_bytes()
        assert "epoch 12/12" in run["captured_out"]

        said = [line.strip() for line in output.splitlines() if "tracking:" in line]
        assert len(said) == 3, said  # where the run goes, the outage, the return
        assert "does not answer (" in said[1] and "sent when it answers again" in said[1]
        assert "answers again after" in said[2] and "run 1 is up to date there" in said[2]
        assert not (tmp_path / "sacred_runs").exists()
    finally:
        if process.poll() is None:
            process.kill()
        database.client.close()
        server.stop()
