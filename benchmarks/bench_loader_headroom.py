"""Loader headroom: each pipeline's training loader against what its model consumes.

For every pipeline the experiment itself builds the training set, model and task: its data
commands write generated data into a temporary folder, then its ``main`` runs with the named
config below until the training loop would start (``Trainer.fit`` is replaced by a capture),
so the loader measured is the one a run trains from: its dataset, augmentation and batch
size. Then, in this process:

- loader rate: samples/s of one pass over (up to ``BATCHES``) batches with 0 and 2 workers;
- one worker's rate (``one_worker``): the 0-worker pass again, run as a DataLoader worker runs
  (PyTorch gives each worker one thread) and timed in CPU seconds of this process, so that it
  counts what one core loads. The 0-worker column runs with this process's threads: on this
  shared 2-core machine their small parallel regions waited for each other (measured: the
  aneurysm loader at 20 samples/s with 2 threads, 163 with 1), which is not what a worker
  does; and wall time on a machine busy with other runs counts their share too;
- consumed on this CPU: samples/s of the task's training steps (forward, loss, backward,
  optimizer step) on batches already loaded;
- consumed on one GPU (estimated): only seed 000 gives a GPU figure (an epoch of 368 cubes in
  8-10 s on an RTX 3090, ~40 cubes/s at 32x128x128, batch 4). Its ratio to this CPU's rate for
  the same model and cube size (measured here) is taken as the GPU's speed-up for every
  pipeline's model: an assumption (the same ratio for every convolutional network), stated in
  the results; and no step is taken faster than 15 ms (:data:`GPU_STEP_FLOOR_S`), the floor
  of a small network's step on a GPU. The floor is counted in the rates' samples (a batch's
  first dimension, ``samples_per_step``): earlier results divided the loader's batch size by
  it, which for SMALabeller (2 volumes of 2 crops each per step) put the GPU's rate in volumes
  against loader rates in crops, half what the GPU would take;
- headroom = loader rate / consumed rate, and the workers needed for 5x on the GPU, assuming
  the loader scales linearly with workers from one worker's rate (one core per worker; earlier
  results took the 0-worker rate, which the thread contention above made 2-8x too low).

    python -m benchmarks loader_headroom                  # the pipelines' demo shapes
    LOADER_HEADROOM_TINY=1 python -m benchmarks loader_headroom   # tiny data: a check
    # one pipeline (25-45 s), with the speed-up measured before instead of timing seed 000's
    # network again (minutes): how benchmarks/results/loader_headroom.json was made
    LOADER_HEADROOM_PIPELINES=sadaan LOADER_HEADROOM_SPEEDUP=1876.6 \
        python -m benchmarks loader_headroom
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from medseg.data.loaders import EpochLoader
from medseg.engine import trainer as trainer_module

QUICK = False   # generates five pipelines' data: minutes
WORKERS = (0, 2)
#: Batches timed for one worker's rate (over as many epochs as that takes).
ONE_WORKER_BATCHES = 40
TARGET = 5.0
SEED000_GPU_CUBES_PER_S = 368 / 9.0   # an epoch of 368 cubes in 8-10 s on an RTX 3090
#: A small network's training step on one GPU is bound by kernel launches and the optimizer
#: step, not by its arithmetic: an assumed 15 ms at the least, whatever the speed-up says.
GPU_STEP_FLOOR_S = 0.015

RAW = "data/neuroverse3d_raw"
#: name: (experiment, named configs, [(data command, its own config updates)])
PIPELINES = {
    "sadaan": ("sadaan", ["demo"], [("generate_data", {})]),
    "aneurysm_cubes": ("aneurysm_cubes", ["demo"], [("generate_volumes", {}), ("prepare", {})]),
    "lung_tumor": ("lung_tumor", ["demo"], [("generate_msd", {}), ("convert", {})]),
    "neuroverse3d": ("neuroverse3d", ["cpu"], [
        ("generate_data", {"data_dir": RAW}),
        ("prepare", {"input_dir": RAW, "output_dir": "data/neuroverse3d",
                     "dataset_name": "x", "modality": "MRI"})]),
    "smalabeller": ("smalabeller", ["demo"], [("generate_data", {})]),
    # SADAAN with its augmentation on the training device: the loader only reads and resizes.
    "sadaan_on_device": ("sadaan", ["demo"], [("generate_data", {})]),
}
#: Config updates of ``main`` only (the data commands do not know them).
MAIN_UPDATES = {"sadaan_on_device": {"augmentation": {"on_device": True}}}
#: Fewer generated cases than the named configs write (their shapes are kept): enough batches
#: to measure, less generation time.
FEWER = {
    "sadaan": {"synthetic": {"num_train": 22, "num_val": 2, "num_test": 2}},
    "aneurysm_cubes": {"synthetic": {"num_series": 10}},
    "lung_tumor": {"synthetic": {"num_volumes": 8}},
    "neuroverse3d": {},
    "smalabeller": {},
}
FEWER["sadaan_on_device"] = FEWER["sadaan"]
#: Smaller generated data for LOADER_HEADROOM_TINY (the test's check that every pipeline runs).
TINY = {
    "sadaan": {"synthetic": {"num_train": 4, "num_val": 2, "num_test": 2}},
    "aneurysm_cubes": {"synthetic": {"num_series": 10}},
    "lung_tumor": {"synthetic": {"num_volumes": 4, "volume_size": [64, 64, 16]},
                   "training": {"image_size": [64, 64]}},
    "neuroverse3d": {"synthetic": {"cases_per_dataset": 4, "volume_shape": [24, 24, 24]},
                     "image_size": [16, 16, 16]},
    "smalabeller": {"synthetic": {"num_cases": 4}},
}
TINY["sadaan_on_device"] = TINY["sadaan"]


class _Captured(Exception):
    pass


def capture(pipeline: str, tmp: Path, tiny: bool) -> trainer_module.Trainer:
    """The Trainer the pipeline's ``main`` builds, stopped before its first step."""
    module, named, commands = PIPELINES[pipeline]
    experiment = importlib.import_module(f"experiments.{module}").ex
    quiet = _merge((TINY if tiny else FEWER)[pipeline], {"tracking": {"observer": "none"}})
    for command, updates in commands:
        experiment.run(command, named_configs=named, config_updates=_merge(quiet, updates))
    found = {}

    def stop(self):
        found["trainer"] = self
        raise _Captured

    original = trainer_module.Trainer.fit
    trainer_module.Trainer.fit = stop
    try:
        no_bar = {} if pipeline == "smalabeller" else {"logging": {"progress_bar": False}}
        updates = _merge(_merge(quiet, no_bar), MAIN_UPDATES.get(pipeline, {}))
        experiment.run("main", named_configs=named, config_updates=updates)
    except _Captured:
        pass
    finally:
        trainer_module.Trainer.fit = original
    if "trainer" not in found:
        raise RuntimeError(f"{pipeline}: main did not reach the training loop")
    return found["trainer"]


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (_merge(merged[key], value) if isinstance(value, dict)
                       and isinstance(merged.get(key), dict) else value)
    return merged


def loader_rate(loader, workers: int, batches: int) -> tuple[float, float]:
    """Samples/s of batches 2 to ``batches`` of an epoch with ``workers`` workers (the steady
    rate), and the seconds to the first batch (workers start every epoch)."""
    rebuilt = EpochLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                          num_workers=workers, seed=0)
    rebuilt.set_epoch(1)
    started, samples, first = time.perf_counter(), 0, None
    for index, batch in enumerate(rebuilt):
        if first is None:
            first = time.perf_counter()
        else:
            samples += _batch_size(batch)
        if index + 1 >= batches:
            break
    return samples / max(time.perf_counter() - first, 1e-9), first - started


def one_worker_rate(loader, batches: int) -> float:
    """Samples per CPU second of batches 2 to ``batches`` loaded in this process with one
    PyTorch thread, as each DataLoader worker loads them. Epochs follow each other until that
    many batches are loaded: the demos' small training sets (9 SMALabeller volumes, 12
    aneurysm cubes) would otherwise time a handful of samples, too few for a transform with
    probability 0.15 (SMALabeller's elastic deformation, its costliest) to count as often as
    it does in training."""
    rebuilt = EpochLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                          num_workers=0, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples, first, loaded, epoch = 0, None, 0, 0
        while loaded < batches:
            epoch += 1
            rebuilt.set_epoch(epoch)
            for batch in rebuilt:
                loaded += 1
                if first is None:
                    first = time.process_time()
                else:
                    samples += _batch_size(batch)
                if loaded >= batches:
                    break
        return samples / max(time.process_time() - first, 1e-9)
    finally:
        torch.set_num_threads(threads)


def _batch_size(batch) -> int:
    tensors = batch.values() if isinstance(batch, dict) else batch
    return next(int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor))


def consumed_rate(trainer, batches: list, steps: int) -> float:
    """Samples/s of training steps (forward, loss, backward, optimizer step) on loaded
    batches, after one warm-up step."""
    model, task, optimizer = trainer.model, trainer.task, trainer.optimizer
    model.train()

    def step(batch) -> int:
        with trainer.precision.autocast():
            output = task.training_step(model, batch, trainer.device)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        return _batch_size(batch)   # the loader's samples (SMALabeller trains on their slices)

    step(batches[0])
    started, samples = time.perf_counter(), 0
    for index in range(steps):
        samples += step(batches[(index + 1) % len(batches)])
    return samples / (time.perf_counter() - started)


def aneurysm_seed_cpu_rate(steps: int) -> float:
    """This CPU's training rate for seed 000's model at its cube size (32x128x128, batch 4):
    the denominator of the GPU speed-up."""
    from ingredients.model import DynUNetModelIngredient, build_dynunet

    torch.manual_seed(0)
    defaults = {name: field.default for name, field in DynUNetModelIngredient().fields.items()}
    model = build_dynunet(**defaults)   # the aneurysm pipeline's default: the seed's network
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = torch.nn.BCEWithLogitsLoss()  # a negligible share of the step next to the network
    image, mask = torch.rand(4, 1, 32, 128, 128), (torch.rand(4, 1, 32, 128, 128) > 0.99).float()

    def step():
        output = model(image)
        output = output[:, :1] if output.ndim == 5 else output[:, 0, :1]
        total = loss(output, mask)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return 4 * steps / (time.perf_counter() - started)


def run() -> dict:
    tiny = os.environ.get("LOADER_HEADROOM_TINY") == "1"
    names = os.environ.get("LOADER_HEADROOM_PIPELINES", ",".join(PIPELINES)).split(",")
    batches, steps = (3, 1) if tiny else (10, 2)
    result: dict = {"tiny": tiny, "load_average_1min_at_start": round(os.getloadavg()[0], 2),
                    "threads": torch.get_num_threads(), "pipelines": {}}
    given = os.environ.get("LOADER_HEADROOM_SPEEDUP")   # a speed-up measured before
    if tiny:
        speedup = None
    elif given:
        speedup = float(given)
        result["gpu_estimate"] = {"speedup": speedup, "given": "LOADER_HEADROOM_SPEEDUP"}
    else:
        cpu = aneurysm_seed_cpu_rate(1)
        speedup = SEED000_GPU_CUBES_PER_S / cpu
        result["gpu_estimate"] = {
            "seed_000_rtx3090_cubes_per_s": round(SEED000_GPU_CUBES_PER_S, 1),
            "this_cpu_cubes_per_s_same_model_and_size": round(cpu, 3),
            "speedup": round(speedup, 1),
            "assumption": "every pipeline's model runs this much faster on one GPU than on "
                          "this CPU, as seed 000's DynUNet does"}
    for name in names:
        importlib.import_module(f"experiments.{PIPELINES[name][0]}")  # before leaving the root
        with tempfile.TemporaryDirectory() as tmp, _inside(Path(tmp)):
            torch.manual_seed(0)
            trainer = capture(name, Path(tmp), tiny)
            loader = trainer.train_loader
            measured = {f"workers_{w}": loader_rate(loader, w, batches) for w in WORKERS}
            rates = {key: rate for key, (rate, _) in measured.items()}
            rates["one_worker"] = one_worker_rate(loader, ONE_WORKER_BATCHES if not tiny else 4)
            loaded = []
            for batch in loader:
                loaded.append(batch)
                if len(loaded) >= 2:
                    break
            consumed = consumed_rate(trainer, loaded, steps)
        # What one step trains on, in the unit the rates count (a batch's first dimension):
        # SMALabeller's batch of 2 volumes holds 2 crops of each, 4 samples.
        per_step = _batch_size(loaded[0])
        entry = {"batch_size": loader.batch_size, "samples_per_step": per_step,
                 "training_samples": len(loader.dataset),
                 "loader_samples_per_s": {k: round(v, 2) for k, v in rates.items()},
                 "loader_first_batch_s": {k: round(v, 2) for k, (_, v) in measured.items()},
                 "consumed_samples_per_s_cpu": round(consumed, 3),
                 "headroom_cpu": {k: round(v / consumed, 1) for k, v in rates.items()}}
        if speedup is not None:
            entry.update(gpu_estimate(consumed, rates, speedup, per_step))
        result["pipelines"][name] = entry
        print(name, entry, flush=True)
    return result


def gpu_estimate(consumed_cpu: float, rates: dict[str, float], speedup: float,
                 batch_size: int) -> dict:
    """What one GPU would consume (``speedup`` times this CPU, but no step faster than
    :data:`GPU_STEP_FLOOR_S`), the loader's headroom over it, and the workers for
    :data:`TARGET` times that rate if each worker adds one worker's rate (``one_worker``;
    ``workers_0`` where that was not measured)."""
    gpu = min(consumed_cpu * speedup, batch_size / GPU_STEP_FLOOR_S)
    per_worker = rates.get("one_worker", rates["workers_0"])
    return {"consumed_samples_per_s_gpu_estimate": round(gpu, 2),
            "headroom_gpu_estimate": {k: round(v / gpu, 3) for k, v in rates.items()},
            "workers_for_5x_gpu": max(1, math.ceil(TARGET * gpu / per_worker))}


@contextlib.contextmanager
def _inside(folder: Path):
    """Run in ``folder``: the named configs' relative data/ and runs/ folders land there."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
