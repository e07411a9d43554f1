"""The CUDA paths this project's CPU machines cannot run, checked on one GPU (a few minutes).

    python -m benchmarks.gpu_check          # writes benchmarks/results/gpu_check.json

1. fp16 autocast with the gradient scaler: SADAAN, lung, Neuroverse3D and SMALabeller trained
   from the shell with ``training.mixed_precision=fp16`` (the run completes; its losses and
   GPU memory per epoch are recorded); the aneurysm pipeline in fp16 in check 4;
2. ``gpu_mem_max_allocated_mb`` / ``gpu_mem_max_reserved_mb`` recorded non-zero every epoch
   and reset at each epoch's start (an epoch that allocates 256 MB more, then one that does
   not: the second's peak is lower);
3. a one-GPU ``torchrun`` NCCL run of SADAAN (``info.distributed.backend == "nccl"``);
4. one aneurysm training epoch on 368 cubes of 32x128x128 at batch 4 (the default DynUNet,
   random 16x64x64 crops as in training, fp16), timed against the seed's 8-10 s on an RTX 3090;
5. SADAAN with ``augmentation.on_device=True`` from the shell (its epoch times beside check 1's),
   and the batch augmentation alone timed on the GPU at the demo's and the seed's default size.

Without a CUDA device it says so in one line and exits 0, writing nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "gpu_check.json"
SEED_EPOCH_S = (8.0, 10.0)


def _shell(arguments: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments[:4])} ... exited {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return done


def _required(figures: dict) -> dict:
    """Fail the check unless every epoch recorded GPU memory and finite losses."""
    import math

    memory = figures.get("gpu_mem_max_allocated_mb") or []
    if not memory or min(memory) <= 0:
        raise RuntimeError(f"gpu_mem_max_allocated_mb not recorded non-zero: {memory}")
    if not all(math.isfinite(v) for v in figures["train_loss_epoch"]):
        raise RuntimeError(f"non-finite training loss: {figures['train_loss_epoch']}")
    return figures


def _metrics(runs: Path) -> dict:
    (run,) = sorted(runs.glob("[0-9]*"))
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "info.json").read_text())


def _sadaan(work: Path, launcher: list[str], name: str, *extra: str) -> dict:
    data = work / "sadaan_data"
    if not data.exists():
        _shell([sys.executable, "experiments/sadaan.py", "generate_data", "with",
                f"dataset_path={data}", "synthetic.num_train=16", "synthetic.num_val=4",
                "synthetic.num_test=4", "tracking.observer=none"], ROOT)
    runs = work / f"runs_{name}"
    _shell([*launcher, "experiments/sadaan.py", "with", f"dataset_path={data}",
            "training.image_size=[64,64,32]", "training.num_epochs=2", "training.batch_size=4",
            "training.num_workers=2", "training.device=cuda", "training.mixed_precision=fp16",
            "logging.progress_bar=False", "tracking.observer=file", f"tracking.file_dir={runs}",
            f"checkpoint.save_dir={work}/ck_{name}/{{run_id}}", *extra], ROOT)
    metrics, info = _metrics(runs)
    if "nccl" in name and (info.get("distributed") or {}).get("backend") != "nccl":
        raise RuntimeError(f"the torchrun run did not train on NCCL: {info.get('distributed')}")
    return _required({"epochs": metrics["val_loss"]["steps"],
            "train_loss_epoch": metrics["train_loss_epoch"]["values"],
            "gpu_mem_max_allocated_mb": metrics["gpu_mem_max_allocated_mb"]["values"],
            "gpu_mem_max_reserved_mb": metrics["gpu_mem_max_reserved_mb"]["values"],
            "epoch_time_s": metrics["epoch_time_s"]["values"],
            "distributed": info.get("distributed"), "precision": info.get("precision")})


def _lung(work: Path) -> dict:
    lung = [sys.executable, str(ROOT / "experiments" / "lung_tumor.py")]
    _shell([*lung, "generate_msd", "with", "msd_dir=msd", "synthetic.num_volumes=6",
            "synthetic.volume_size=[64,64,32]", "tracking.observer=none"], work)
    _shell([*lung, "convert", "with", "msd_dir=msd", "dataset_path=lung",
            "tracking.observer=none"], work)
    _shell([*lung, "with", "dataset_path=lung", "training.image_size=[64,64]",
            "training.num_epochs=2", "training.batch_size=8", "training.device=cuda",
            "training.mixed_precision=fp16", "logging.progress_bar=False",
            "tracking.observer=file", "tracking.file_dir=runs_lung", "checkpoint.save_dir=ck_lung"],
           work)
    metrics, info = _metrics(work / "runs_lung")
    return _required({"train_loss_epoch": metrics["train_loss_epoch"]["values"],
                      "gpu_mem_max_allocated_mb": metrics["gpu_mem_max_allocated_mb"]["values"],
                      "precision": info.get("precision")})


def _fp16_runs(work: Path, experiment: str, arguments: list[str]) -> dict:
    """A pipeline trained two epochs from the shell in fp16 on the GPU."""
    runs = work / f"runs_{experiment}"
    _shell([sys.executable, str(ROOT / "experiments" / f"{experiment}.py"), "with", *arguments,
            "tracking.observer=file", f"tracking.file_dir={runs}"], work)
    metrics, info = _metrics(runs)
    return _required({"train_loss_epoch": metrics["train_loss_epoch"]["values"],
                      "gpu_mem_max_allocated_mb": metrics["gpu_mem_max_allocated_mb"]["values"],
                      "precision": info.get("precision")})


def _neuroverse3d(work: Path) -> dict:
    nv = [sys.executable, str(ROOT / "experiments" / "neuroverse3d.py")]
    _shell([*nv, "generate_data", "with", "data_dir=nv_raw", "synthetic.num_datasets=3",
            "synthetic.cases_per_dataset=4", "synthetic.volume_shape=[32,40,32]",
            "tracking.observer=none"], work)
    _shell([*nv, "prepare", "with", "input_dir=nv_raw", "output_dir=nv", "dataset_name=Syn",
            "modality=MRI", "tracking.observer=none"], work)
    return _fp16_runs(work, "neuroverse3d", [
        "data_dir=nv", "image_size=[32,32,32]", "episodes_per_epoch=8", "val_episodes=2",
        'datasets=["Dataset001","Dataset002"]', "training.num_epochs=2", "training.device=cuda",
        "training.mixed_precision=fp16", "logging.progress_bar=False",
        "checkpoint.save_dir=ck_nv"])


def _smalabeller(work: Path) -> dict:
    sma = [sys.executable, str(ROOT / "experiments" / "smalabeller.py")]
    _shell([*sma, "generate_data", "with", "data_dir=sma", "synthetic.num_cases=8",
            "tracking.observer=none"], work)
    return _fp16_runs(work, "smalabeller", [
        "epochs=2", "batch_size=4", "training_images=sma/imagesTr_resampled",
        "training_labels=sma/labelsTr_resampled", "runs_dir=sma_runs", "training.device=cuda",
        "training.mixed_precision=fp16", "training.progress_bar=False"])


def _memory_reset() -> dict:
    """Epoch 1 holds 256 MB more at one step than epoch 2; the recorded peaks show it."""
    from medseg.engine.fit import LoaderSettings, OptimizerSettings, fit
    from medseg.engine.trainer import Callback, StepOutput, TrainerSettings

    class Task:
        def metric_names(self):
            return ["loss"]

        def training_step(self, model, batch, device):
            x = batch[0].to(device)
            return StepOutput(model(x).square().mean(), {}, x.shape[0])

        def validate(self, model, loader, device, precision):
            return {"loss": 0.0}

    class Allocate(Callback):
        def on_optimizer_step(self, trainer):
            if trainer.epoch == 1:
                # 256 MB held for the first epoch only: the next epoch's peak must be lower.
                torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=trainer.device)

    data = torch.utils.data.TensorDataset(torch.randn(16, 8))
    result = fit(torch.nn.Linear(8, 8), Task(), data, data,
                 TrainerSettings(num_epochs=2, progress_bar=False), device="cuda",
                 precision="none", optimizer=OptimizerSettings(), loaders=LoaderSettings(4),
                 callbacks=[Allocate()])
    peaks = [h["gpu_mem_max_allocated_mb"] for h in result.history]
    if not peaks[1] < peaks[0] - 200:
        raise RuntimeError(f"the peak of epoch 1 (256 MB more) carried into epoch 2: {peaks}")
    return {"gpu_mem_max_allocated_mb": peaks}


def _aneurysm_epoch(count: int = 368, device: str = "cuda", precision: str = "fp16",
                    filters: tuple[int, ...] = (32, 64, 128, 256)) -> dict:
    from ingredients.model import build_dynunet
    from medseg.data.cube_transforms import cube_transforms
    from medseg.engine.fit import LoaderSettings, OptimizerSettings, fit
    from medseg.engine.trainer import TrainerSettings
    from medseg.losses.aneurysm import WeightedDiceCELoss
    from medseg.tasks.aneurysm import AneurysmTask

    generator = torch.Generator().manual_seed(0)
    cubes = [{"image": torch.randn(1, 32, 128, 128, generator=generator).numpy(),
              "mask": (torch.rand(1, 32, 128, 128, generator=generator) > 0.999).float().numpy(),
              "label": i % 2, "name": f"cube_{i}"} for i in range(count)]
    transform = cube_transforms(train=True, crop_size=(16, 64, 64))
    train = [transform(dict(cube)) for cube in cubes]
    model = build_dynunet(list(filters), 3, [1, 2, 2, 2], 0.1, "instance", False)
    task = AneurysmTask(WeightedDiceCELoss(), roi_size=(16, 64, 64))
    started = time.perf_counter()
    result = fit(model, task, train, train[:8], TrainerSettings(num_epochs=1, progress_bar=False),
                 device=device, precision=precision,
                 optimizer=OptimizerSettings(learning_rate=1e-4),
                 loaders=LoaderSettings(batch_size=4, num_workers=4 if device == "cuda" else 0))
    epoch_s = result.history[0]["epoch_time_s"]
    return {"cubes": count, "batch_size": 4, "train_time_s": result.history[0]["train_time_s"],
            "train_loss_epoch": result.history[0]["train_loss_epoch"],
            "epoch_time_s": epoch_s, "wall_s": time.perf_counter() - started,
            "seed_rtx3090_epoch_s": SEED_EPOCH_S, "vs_seed_slowest": epoch_s / SEED_EPOCH_S[1]}


def _batch_augmentation(device: str = "cuda",
                        sizes=((4, (64, 64, 32)), (8, (128, 128, 64)))) -> dict:
    """Milliseconds per batch of SADAAN's on-device augmentation (13 packed masks)."""
    from medseg.data.batch_augmentation import SADAANBatchAugmentation

    augment = SADAANBatchAugmentation(num_structures=13)
    figures = {}
    for batch, size in sizes:
        image = torch.randn(batch, 1, *size, device=device) * 50 + 100
        masks = torch.randint(0, 2 ** 13, (batch, 1, *size), device=device).float()
        augment(image, masks)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            augment(image, masks)
        if device == "cuda":
            torch.cuda.synchronize()
        figures[f"batch_{batch}_{'x'.join(map(str, size))}_ms"] = round(
            (time.perf_counter() - started) * 100, 2)
    return figures


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing checked, nothing written "
              "(run it where a GPU is lent)")
        return 0
    results: dict = {"device": torch.cuda.get_device_name(0), "checks": {}}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        checks = {
            "sadaan_fp16": lambda: _sadaan(work, [sys.executable], "fp16"),
            "lung_fp16": lambda: _lung(work),
            "neuroverse3d_fp16": lambda: _neuroverse3d(work),
            "smalabeller_fp16": lambda: _smalabeller(work),
            "gpu_memory_reset": _memory_reset,
            "torchrun_nccl_one_gpu": lambda: _sadaan(
                work, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node=1"], "nccl", "training.distributed_backend=nccl"),
            "aneurysm_epoch_368_cubes": _aneurysm_epoch,
            "sadaan_on_device_augmentation_fp16": lambda: _sadaan(
                work, [sys.executable], "on_device", "augmentation.on_device=True"),
            "batch_augmentation_ms": _batch_augmentation,
        }
        failed = []
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                results["checks"][name] = {"ok": True, **check()}
            except Exception as error:  # one failed check must not hide the others' figures
                results["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                failed.append(name)
            results["checks"][name]["wall_s"] = round(time.perf_counter() - started, 1)
            print(f"gpu_check: {name}: {'ok' if name not in failed else 'FAILED'}", flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"gpu_check: -> {RESULT.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
