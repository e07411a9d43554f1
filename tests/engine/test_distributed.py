"""The pieces of training under torchrun that need no second process: how batches and
validation cases are shared among ranks, the checks that refuse a job that cannot work, and
the engine in a process group of one (DDP wrapped, checkpoints as one process writes them)."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medseg.data.loaders import EpochLoader
from medseg.engine import distributed
from medseg.engine.checkpoint import CheckpointManager, load_checkpoint
from medseg.engine.fit import LoaderSettings, OptimizerSettings, fit
from medseg.engine.trainer import StepOutput, TrainerSettings


def _one_process_batches(size: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    loader = EpochLoader(TensorDataset(torch.arange(size)), batch_size=batch, shuffle=True,
                         num_workers=0, seed=seed)
    loader.set_epoch(epoch)
    return [b[0].tolist() for b in loader]


@pytest.mark.parametrize("size, batch, world", [(8, 4, 2), (12, 6, 3), (10, 4, 2)])
def test_ranks_share_each_batch_of_one_process(size, batch, world):
    ranks = []
    for rank in range(world):
        loader = EpochLoader(TensorDataset(torch.arange(size)), batch_size=batch,
                             shuffle=True, num_workers=0, seed=3)
        loader.distribute(rank, world, batch // world)
        loader.set_epoch(2)
        ranks.append([b[0].tolist() for b in loader])
    assert len({len(batches) for batches in ranks}) == 1  # every rank takes as many steps
    joined = [sorted(sum((batches[k] for batches in ranks), [])) for k in range(len(ranks[0]))]
    assert joined == [sorted(b) for b in _one_process_batches(size, batch, 3, 2)]


def test_an_uneven_split_is_padded_so_that_every_rank_steps_alike():
    sampler = [list(distributed.RankShuffleSampler(5, torch.Generator().manual_seed(0), r, 2))
               for r in range(2)]
    assert [len(s) for s in sampler] == [3, 3]
    assert sorted(set(sampler[0] + sampler[1])) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size, batch, world", [(7, 2, 2), (3, 1, 4), (10, 3, 3)])
def test_every_validation_case_is_scored_once_in_its_one_process_batch(size, batch, world):
    one = [list(range(i, min(i + batch, size))) for i in range(0, size, batch)]
    shards = []
    for rank in range(world):
        indices = distributed.validation_indices(size, batch, rank, world)
        shards.append([indices[i:i + batch] for i in range(0, len(indices), batch)])
    assert sorted(sum(shards, [])) == sorted(one)
    assert sorted(sum(sum(shards, []), [])) == list(range(size))  # unpadded


def test_batch_must_split_evenly_over_the_ranks():
    assert distributed.per_rank_batch(8, 2) == 4
    with pytest.raises(ValueError, match="^batch_size 1 is smaller than the 2 processes"):
        distributed.per_rank_batch(1, 2)
    with pytest.raises(ValueError, match="^batch_size 5 does not split evenly over 2"):
        distributed.per_rank_batch(5, 2)


def test_more_processes_than_gpus_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = distributed.Launch(rank=0, world_size=2, local_rank=0, local_world_size=2)
    with pytest.raises(ValueError, match=r"^torchrun started 2 processes on this node but only "
                                         r"1 CUDA device\(s\) are visible; start at most 1 "
                                         r"\(--nproc_per_node=1\)"):
        distributed.check_launch(torch.device("cuda"), started=started)
    with pytest.raises(ValueError, match="^backend='nccl' needs CUDA devices"):
        distributed.check_launch(torch.device("cpu"), "nccl", started=started)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="^device cuda:1 names one GPU for all 2 processes"):
        distributed.check_launch(torch.device("cuda:1"), started=started)
    assert distributed.rank_device(torch.device("cuda"), distributed.Launch(1, 2, 1, 2)) == \
        torch.device("cuda", 1)


def test_without_torchrun_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch() is None
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert distributed.shared_seed(lambda: 42) == 42
    assert distributed.gather("x") == ["x"] and distributed.from_main(3) == 3


class _Regression:
    def metric_names(self):
        return ["loss"]

    def training_step(self, model, batch, device):
        x, y = batch
        return StepOutput(nn.functional.mse_loss(model(x), y), {}, x.shape[0])

    def validate(self, model, loader, device, precision):
        losses = [float(nn.functional.mse_loss(model(x), y)) for x, y in loader]
        return {"loss": sum(losses) / len(losses)}


@pytest.fixture
def group_of_one(monkeypatch):
    """A gloo process group of one process, as ``torchrun --nproc_per_node=1`` makes it."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    try:
        yield distributed.setup(torch.device("cpu"))
    finally:
        distributed.shutdown()
        distributed._store = None


def test_training_in_a_process_group_writes_one_process_checkpoints(group_of_one, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))
    model = nn.Linear(3, 1)
    from medseg.engine.reporting import RecordingReporter

    reporter = RecordingReporter()
    result = fit(model, _Regression(), data, data,
                 TrainerSettings(num_epochs=3, progress_bar=False, log_frequency=1),
                 reporter, optimizer=OptimizerSettings(learning_rate=0.1),
                 loaders=LoaderSettings(batch_size=4), device=group_of_one, precision="none",
                 checkpoints=CheckpointManager(tmp_path))
    history = [h["train_loss_epoch"] for h in result.history]
    assert history[-1] < history[0]
    assert reporter.info["distributed"] == {"world_size": 1, "backend": "gloo",
                                            "per_rank_batch_size": 4,
                                            "gradient_accumulation_steps": 1,
                                            "effective_batch_size": 4}
    saved = load_checkpoint(tmp_path / "last_model.pth")["model"]
    assert sorted(saved) == ["bias", "weight"]  # not DDP's "module." names
    nn.Linear(3, 1).load_state_dict(saved)


def test_one_process_on_several_gpus_says_to_use_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["experiments/sadaan.py", "with", "training.batch_size=8"]
    assert distributed.torchrun_hint(torch.device("cuda"), argv, visible=2) == (
        "2 CUDA devices are visible and this single process trains on cuda; to train on all "
        "of them start it with torchrun: torchrun --standalone --nproc_per_node=2 "
        "experiments/sadaan.py with training.batch_size=8")
    assert distributed.torchrun_hint(torch.device("cuda"), argv, visible=1) is None
    assert distributed.torchrun_hint(torch.device("cpu"), argv, visible=2) is None
