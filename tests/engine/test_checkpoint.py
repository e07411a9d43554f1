import pytest
import torch

from medseg.engine import checkpoint as checkpoint_module
from medseg.engine.checkpoint import (
    CheckpointManager,
    atomic_save,
    load_checkpoint,
    rebuilt_model,
)
from medseg.errors import DataError

STATE = {"model": {"w": torch.ones(2)}, "epoch": 0}


class Payload:
    """A pickled class: what the safe loader must refuse."""


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_best_last_and_periodic_files(tmp_path):
    manager = CheckpointManager(tmp_path, save_frequency=2)
    for epoch, best in [(1, True), (2, False), (3, True), (4, False)]:
        manager.save({**STATE, "epoch": epoch}, epoch=epoch, is_best=best)
    assert names(tmp_path) == ["best_model.pth", "checkpoint_epoch_2.pth",
                               "checkpoint_epoch_4.pth", "last_model.pth"]
    assert load_checkpoint(tmp_path / "best_model.pth")["epoch"] == 3
    assert load_checkpoint(tmp_path / "last_model.pth")["epoch"] == 4


def test_retention_keeps_the_newest_periodic_files_across_a_resume(tmp_path):
    manager = CheckpointManager(tmp_path, save_frequency=1, keep_periodic=2,
                                periodic_name="periodic_{epoch:04d}.pth")
    for epoch in (1, 2, 3):
        manager.save(STATE, epoch=epoch, is_best=False)
    resumed = CheckpointManager(tmp_path, save_frequency=1, keep_periodic=2,
                                periodic_name="periodic_{epoch:04d}.pth")
    resumed.save(STATE, epoch=4, is_best=False)
    assert [n for n in names(tmp_path) if n.startswith("periodic")] == [
        "periodic_0003.pth", "periodic_0004.pth"]


def test_keep_best_only_writes_nothing_else(tmp_path):
    manager = CheckpointManager(tmp_path, save_frequency=1, keep_best_only=True)
    manager.save(STATE, epoch=1, is_best=True)
    manager.save(STATE, epoch=2, is_best=False)
    assert names(tmp_path) == ["best_model.pth"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_save({"model": {}, "epoch": 1}, tmp_path / "last.pth")

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"model": {}, "epoch": 2}, path)
    assert names(tmp_path) == ["last.pth"]
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_loading_refuses_missing_foreign_and_unsafe_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="text.pth could not be read"):
        load_checkpoint(tmp_path / "text.pth")
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pth")
    with pytest.raises(DataError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "foreign.pth")
    torch.save({"model": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(DataError, match="unsafe.pth could not be read"):
        load_checkpoint(tmp_path / "unsafe.pth")


def test_rebuilt_model_is_built_from_the_stored_model_config_with_its_weights(tmp_path):
    built = []

    def build(model_config):
        built.append(model_config)
        return torch.nn.Linear(1, (model_config or {"out": 1})["out"])

    trained = torch.nn.Linear(1, 3)
    atomic_save({"model": trained.state_dict(), "config": {"model": {"out": 3}}, "epoch": 4},
                tmp_path / "a.pt")
    model, state = rebuilt_model(tmp_path / "a.pt", build)
    assert torch.equal(model.weight, trained.weight) and state["epoch"] == 4
    atomic_save({"model": torch.nn.Linear(1, 1).state_dict()}, tmp_path / "b.pt")
    rebuilt_model(tmp_path / "b.pt", build)
    assert built == [{"out": 3}, None]
    atomic_save({"model": trained.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(DataError, match=r"c\.pt does not fit its own model config"):
        rebuilt_model(tmp_path / "c.pt", build)
