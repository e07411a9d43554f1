"""The pieces of training under torchrun that need no second process: how batches and
validation cases are shared among ranks, the checks that refuse a job that cannot work, and
the engine in a process group of one (DDP wrapped, checkpoints as one process writes them)."""

from __future__ import annotations

import math
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
    assert distributed.silent_ranks() is None  # no other process to wait for


def test_the_collective_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"^timeout must be a number of seconds > 0, got 0$"):
        distributed.setup(torch.device("cpu"), timeout=0)
    assert distributed.timed_out(RuntimeError("[gloo] Timed out waiting 5000ms for recv"))
    assert not distributed.timed_out(RuntimeError("Connection closed by peer"))


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


# ------------------------------------------------------------------ sharded validation
class _Brightness(nn.Module):
    """Tumour logit of a slice: its brightness (right on some pixels, wrong on others)."""

    def forward(self, image):
        return torch.cat([torch.zeros_like(image), (image - 0.6) * 10], dim=1)


class _ContextConv(nn.Module):
    """A stand-in for Neuroverse3D: the target's convolution shifted by the context labels'
    mean (the context stays on the CPU, as the model's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, target, context_in, context_out, gs):
        return self.conv(target) + context_out.float().mean(dim=1).to(target)


def _lung():
    from medseg.losses.dice_bce import SegmentationLoss
    from medseg.tasks.lung_tumor import LungTumorTask

    # Ten slices of three volumes: in batches of 2 dealt to the ranks, v0's slices (0, 3, 6,
    # 9) lie on every rank, so its Dice needs the ranks' counts added, not their Dice.
    images = torch.rand(10, 1, 8, 8)
    cases = [{"image": image, "mask": (image + 0.4 * torch.rand_like(image) > 0.8).float(),
              "volume": f"v{i % 3}"} for i, image in enumerate(images)]
    return LungTumorTask(SegmentationLoss("dice_bce")), _Brightness(), cases


def _neuroverse3d():
    from medseg.losses.neuroverse3d import SmoothL3L1Loss
    from medseg.tasks.neuroverse3d import Neuroverse3DTask

    cases = [{"target_in": torch.rand(1, 4, 4, 4), "context_in": torch.rand(2, 1, 4, 4, 4),
              "context_out": (torch.rand(2, 1, 4, 4, 4) > 0.5).float(),
              "target_out": (torch.rand(1, 4, 4, 4) > 0.5).float()} for _ in range(7)]
    return Neuroverse3DTask(SmoothL3L1Loss(), val_gs=1), _ContextConv(), cases


def _smalabeller():
    from medseg.tasks.smalabeller import SegmentationLoss, SMALabellerTask

    cases = [{"image": torch.rand(1, 8, 8, 3), "label": (torch.rand(1, 8, 8, 3) > 0.7).float()}
             for _ in range(5)]
    return (SMALabellerTask(SegmentationLoss("combination"), spatial_dims=2),
            nn.Conv2d(1, 1, 3, padding=1), cases)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("pipeline", [_lung, _neuroverse3d, _smalabeller])
def test_validation_shared_by_ranks_scores_as_one_process(pipeline, world):
    """What each rank of a torchrun job scores (its share of the batches), joined as the
    trainer joins the gathered states, gives one process's validation metrics."""
    from medseg.engine.precision import resolve_precision

    torch.manual_seed(0)
    task, model, cases = pipeline()
    cpu, fp32 = torch.device("cpu"), resolve_precision("none", torch.device("cpu"))
    loader = EpochLoader(cases, batch_size=2, shuffle=False, num_workers=0, seed=0)
    with torch.no_grad():
        one = task.validate(model.eval(), loader, cpu, fp32)
        states = [task.validation_state(model, loader.validation_shard(rank, world), cpu, fp32)
                  for rank in range(world)]
    shared = task.summarise_validation(states)
    headline = "tumor_dice_per_volume" if pipeline is _lung else "dice"
    assert set(shared) == set(one) >= {"loss", headline}
    assert all(math.isfinite(value) for value in one.values())
    assert shared == pytest.approx(one, rel=1e-9, abs=1e-12)


_SEED_SCRIPT = '''import os
from ingredients.experiment import MedsegExperiment

ex = MedsegExperiment("seeds")


@ex.capture
def data_seed(_seed):
    return _seed


@ex.main
def main(seed):
    print(f"rank {os.environ['RANK']}: seed {seed} data {data_seed()}", flush=True)


if __name__ == "__main__":
    ex.run_commandline()
'''


@pytest.mark.parametrize("given", [None, "file"])
def test_every_rank_runs_with_rank_0s_seed_or_the_config_files(tmp_path, given):
    """Sacred draws a seed per process: under torchrun every rank takes rank 0's, and a seed
    a config file sets is the one every rank uses (it was overridden by rank 0's draw)."""
    import re
    import subprocess
    import sys

    script = tmp_path / "seeds.py"
    script.write_text(_SEED_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script)]
    if given == "file":
        (tmp_path / "seed.yaml").write_text("seed: 5\n")
        command += ["with", str(tmp_path / "seed.yaml")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = dict((int(r), (int(s), int(d))) for r, s, d in
                re.findall(r"rank (\d): seed (\d+) data (\d+)", done.stdout))
    assert set(seen) == {0, 1}
    assert seen[0] == seen[1]
    if given == "file":
        assert seen[0][0] == 5


def test_a_job_environment_without_its_address_is_one_line(tmp_path):
    """RANK and WORLD_SIZE set by hand (not by torchrun) without MASTER_ADDR/PORT."""
    import os
    import subprocess
    import sys

    script = tmp_path / "seeds.py"
    script.write_text(_SEED_SCRIPT)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**environment, "RANK": "1",
                                                       "WORLD_SIZE": "2"})
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert ("RANK and WORLD_SIZE are set (a job of 2 processes) but MASTER_ADDR and "
            "MASTER_PORT not: start the job with torchrun") in done.stderr
