"""How Neuroverse3D trains and is scored: the engine's task, weights from medseg or from the
original's Lightning checkpoints, Dice against context size, and prediction to NIfTI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import Check
from medseg.data.episodes import EpisodeDataset, minmax
from medseg.data.nnunet import (
    NnunetDataset,
    load_image,
    restore_geometry,
    write_labels,
)
from medseg.engine.evaluation import (EvaluationReport, LossMeter, ShardedValidation,
                                     mean_case_score, validation_pass)
from medseg.engine.precision import Precision
from medseg.engine.trainer import StepOutput
from medseg.errors import DataError, describe
from medseg.losses.neuroverse3d import SmoothL3L1Loss
from medseg.models.neuroverse3d import Neuroverse3D

THRESHOLD = 0.5
VAL_SEED = 12345


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """2 TP / (|pred| + |target|) of boolean tensors; both empty gives 1 (MetricsReloaded's
    convention, as the original's validation)."""
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & target).sum()) / total


class Neuroverse3DTask(ShardedValidation):
    """Batches are :class:`~medseg.data.episodes.EpisodeDataset` items; the context stays on
    the CPU and the model moves it group by group. ``gs``: mini-context size for training,
    ``val_gs`` for validation."""

    def __init__(self, loss: SmoothL3L1Loss, *, gs: int = 3, val_gs: int = 4) -> None:
        self.loss, self.gs, self.val_gs = loss, gs, val_gs

    def metric_names(self) -> list[str]:
        return ["loss", "loss_smooth_l3_l1", "dice"]

    def _forward(self, model, batch, device, gs):
        return model(batch["target_in"].to(device), batch["context_in"], batch["context_out"], gs=gs)

    def training_step(self, model: nn.Module, batch, device: torch.device) -> StepOutput:
        output = self._forward(model, batch, device, self.gs)
        total, terms = self.loss(output, batch["target_out"].to(device))
        return StepOutput(total, terms, output.shape[0])

    def validation_state(self, model: nn.Module, loader: Iterable, device: torch.device,
                         precision: Precision) -> tuple[LossMeter, list[float]]:
        """Loss sums and each target's Dice over ``loader`` (one rank's share of the
        episodes under torchrun; :meth:`summarise_validation` joins the ranks')."""
        dices: list[float] = []

        def score(batch, output, *_) -> None:
            for pred, ref in zip(output.float() > THRESHOLD, batch["target_out"] > 0.5):
                dices.append(dice(pred, ref))

        def forward(target_in, context_in, context_out):
            with precision.autocast():  # the context stays on the CPU (moved group by group)
                return model(target_in, context_in, context_out, gs=self.val_gs)

        losses = validation_pass(model, loader, device=device, precision=precision,
                                 loss=lambda output, batch: self.loss(output, batch["target_out"]),
                                 on_batch=score, keys=("target_in", "target_out"),
                                 inputs=("target_in", "context_in", "context_out"),
                                 forward=forward)
        return losses, dices

    def summarise_validation(self, states: Sequence[tuple[LossMeter, list[float]]]
                             ) -> dict[str, float]:
        return mean_case_score(states)


# ---------------------------------------------------------------------------- weights
def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    """Model weights and (when the file says) channels from a medseg checkpoint or from the
    original's Lightning layout (``state_dict`` with ``net.``-prefixed keys,
    ``hyper_parameters`` with ``nb_inner_channels``). Loaded with ``weights_only=True``; the
    Lightning layout's argparse ``Namespace`` is the one class allowed besides tensors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or truncated files
        raise DataError(f"checkpoint {path} could not be read safely ({describe(error)})") from None
    if not isinstance(state, Mapping):
        raise DataError(f"checkpoint {path} is not a mapping of weights")
    if "state_dict" in state:  # Lightning: LightningModel.net is the Neuroverse3D
        hyper = state.get("hyper_parameters") or {}
        hyper = vars(hyper) if isinstance(hyper, argparse.Namespace) else dict(hyper)
        weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items()
                   if k.startswith("net.")}
        if not weights:
            raise DataError(f"checkpoint {path} has a state_dict without 'net.' keys; expected "
                            "the original Neuroverse3D Lightning layout")
        channels = hyper.get("nb_inner_channels")
        return weights, [int(c) for c in channels] if channels else None
    if "model" in state:
        config = state.get("config") or {}
        channels = (config.get("model") or {}).get("channels")
        return dict(state["model"]), [int(c) for c in channels] if channels else None
    raise DataError(f"checkpoint {path} has neither 'model' (medseg) nor 'state_dict' "
                    "(Lightning) weights")


def load_weights(model: Neuroverse3D, path: str | Path) -> None:
    """Load ``path`` into ``model``; a checkpoint of another architecture is named as such."""
    weights, channels = read_weights(path)
    if channels is not None and list(channels) != list(model.channels):
        raise DataError(f"checkpoint {path} was trained with channels {channels}, this model has "
                        f"{model.channels}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise DataError(f"checkpoint {path} does not fit a Neuroverse3D with channels "
                        f"{model.channels} ({str(error).splitlines()[0]})") from None


def model_from_checkpoint(path: str | Path, default_channels: Sequence[int], **kwargs) -> Neuroverse3D:
    """A Neuroverse3D with the channels the checkpoint records (else ``default_channels``)."""
    _, channels = read_weights(path)
    model = Neuroverse3D(channels=channels or list(default_channels), **kwargs)
    load_weights(model, path)
    return model


# ---------------------------------------------------------------------------- evaluation
def context_size_curve(model: Neuroverse3D, dataset: EpisodeDataset, context_sizes: Sequence[int],
                       *, episodes: int, gs: int, device: torch.device, seed: int = 0
                       ) -> dict[str, Any]:
    """Dice against context size on ``dataset``'s cases: for each of ``episodes`` targets
    (one label value each, not background), nested contexts of the dataset's other cases (the
    first L of one shuffled list), so a larger L only adds pairs. Also the Dice of segmenting every
    labelled structure (what a model that ignores the context labels could do best without
    knowing which one is asked)."""
    rng = np.random.default_rng(seed)
    largest = max(context_sizes)
    rows = []
    model.eval()
    for index in range(episodes):
        entry = dataset.tasks[int(rng.integers(len(dataset.tasks)))]
        cases = list(dataset.cases[entry.dataset.name])
        target = cases[int(rng.integers(len(cases)))]
        # Context pairs may be any other case of the dataset (training cases included).
        others = [c for c in entry.dataset.cases if c != target]
        if not others:
            raise DataError(f"{entry.dataset.name} needs at least 2 cases to evaluate, has 1")
        order = [others[int(i)] for i in rng.permutation(len(others))]
        order = (order * (largest // len(order) + 1))[:largest]
        values = [v for v in entry.dataset.info.labels if v != 0]
        value = int(rng.choice(values))
        store = dataset.store
        image = minmax(store.image(entry.dataset, target, entry.channel))
        raw = store.labels(entry.dataset, target)
        truth = raw == value
        ctx_in = minmax(torch.cat([store.image(entry.dataset, c, entry.channel) for c in order]))
        ctx_out = torch.cat([(store.labels(entry.dataset, c) == value).float() for c in order])
        row = {"dataset": entry.dataset.name, "case": target, "label": value,
               "all_structures_dice": dice(raw > 0, truth)}
        for size in context_sizes:
            with torch.no_grad():
                out = model(image[None].to(device), ctx_in[:size, None][None],
                            ctx_out[:size, None][None], gs=gs)
            row[f"dice_context_{size}"] = dice(out[0].cpu() > THRESHOLD, truth)
        rows.append(row)
    summary = {key: float(np.mean([r[key] for r in rows]))
               for key in rows[0] if key.startswith(("dice_", "all_"))}
    return {"summary": summary, "cases": rows}


def evaluate_context_sizes(model, dataset: EpisodeDataset, context_sizes: Sequence[int], *,
                           episodes: int, gs: int, device, output_dir: Path) -> EvaluationReport:
    """:func:`context_size_curve`, with ``per_case_dice.json`` and ``dice_vs_context_size.png``."""
    from medseg.viz.curves import plot_series

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    curve = context_size_curve(model, dataset, context_sizes, episodes=episodes, gs=gs,
                               device=device)
    per_case = output_dir / "per_case_dice.json"
    per_case.write_text(json.dumps(curve, indent=1))
    summary = curve["summary"]
    figure = plot_series(list(context_sizes), [summary[f"dice_context_{s}"] for s in context_sizes],
                         output_dir / "dice_vs_context_size.png", xlabel="context size L",
                         ylabel="Dice", title="Dice against context size",
                         baseline=summary["all_structures_dice"],
                         baseline_label="segment every structure")
    return EvaluationReport(metrics=summary, headline=list(summary), artifacts=[per_case, figure],
                            info={"episodes": episodes, "context_sizes": list(context_sizes)})


# ---------------------------------------------------------------------------- prediction
def predict_case(model: Neuroverse3D, target: str | Path, context: NnunetDataset, *,
                 size: Sequence[int], max_context: int, gs: int, device: torch.device,
                 output: str | Path, channel: int = 0) -> dict[str, Any]:
    """Segment ``target`` (a NIfTI file) from the pairs of ``context`` (an nnU-Net dataset):
    one forward per label value present in the context labels (background excluded), the value
    written where the output exceeds 0.5 (later values over earlier ones, as the original), resized
    back to the target's shape and saved with its affine and header."""
    from medseg.data.episodes import VolumeStore

    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    store = VolumeStore(size)
    cases = context.cases[:max_context]
    ctx_in = minmax(torch.cat([store.image(context, c, channel) for c in cases]))[:, None][None]
    ctx_labels = torch.cat([store.labels(context, c) for c in cases])
    values = [int(v) for v in torch.unique(ctx_labels) if int(v) != 0]
    if not values:
        raise DataError(f"the context labels of {context.root} are all background; nothing to "
                        "segment")
    image, geometry = load_image(Path(target), size)
    result = torch.zeros(tuple(size), dtype=torch.int64)
    model.eval()
    with torch.no_grad():
        for value in values:
            ctx_out = (ctx_labels == value).float()[:, None][None]
            out = model(minmax(image)[None].to(device), ctx_in, ctx_out, gs=gs)[0, 0].cpu()
            result[out > THRESHOLD] = value
    path = write_labels(restore_geometry(result, geometry), geometry, output)
    return {"output": str(path), "labels": values, "context_cases": list(cases),
            "shape": list(geometry.shape)}


# ---------------------------------------------------------------------------- data
def open_episode_data(data_dir: str | Path, *, image_size: Sequence[int], settings,
                      datasets: Sequence[str] | None = None, sample_rate=None,
                      val_fraction: float = 0.1, episodes: int = 1000, val_episodes: int = 50,
                      seed: int = 0, augmentation=None, keep_rate: float = 1.0) -> dict[str, Any]:
    """Training and validation :class:`EpisodeDataset` of the tasks ``datasets`` names in
    ``data_dir`` (every dataset when ``None``), weighted by ``sample_rate``. ``keep_rate``: the
    share of each dataset's training cases kept (the first in name order, at least one; the
    original's sensitivity-analysis option); validation cases are not affected. Validation
    episodes have the fixed ``settings.context_size`` and no augmentation. The volumes are
    loaded here, once, so that loader workers share them."""
    from dataclasses import replace

    from medseg.data.episodes import VolumeStore, select_tasks, split_cases
    from medseg.data.nnunet import find_datasets

    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    available = find_datasets(data_dir)
    tasks = select_tasks(available, datasets, sample_rate)
    splits = {t.dataset.name: split_cases(t.dataset.cases, val_fraction) for t in tasks}
    splits = {k: (train[:max(1, round(len(train) * keep_rate))], val)
              for k, (train, val) in splits.items()}
    store = VolumeStore(image_size)
    for task in tasks:
        for case in task.dataset.cases:
            store.image(task.dataset, case, task.channel)
            store.labels(task.dataset, case)
    train = EpisodeDataset(store, tasks, {k: v[0] for k, v in splits.items()}, settings,
                           episodes=episodes, seed=seed, augmentation=augmentation)
    fixed = replace(settings, random_context_range=None, random_context_probability=0.0)
    val_cases = {k: v[1] or v[0] for k, v in splits.items()}
    # The same validation episodes in every run (whatever its seed), so runs compare.
    val = EpisodeDataset(store, tasks, val_cases, fixed, episodes=val_episodes, seed=VAL_SEED)
    statistics = {"tasks": [t.name for t in tasks], "weights": [t.weight for t in tasks],
                  "train_cases": {k: len(v[0]) for k, v in splits.items()},
                  "val_cases": {k: len(v[1]) for k, v in splits.items()},
                  "image_size": list(image_size)}
    return {"train": train, "val": val, "statistics": statistics, "available": available}


def open_evaluation_data(data_dir: str | Path, *, image_size: Sequence[int],
                         eval_datasets: Sequence[str] | None,
                         trained_on: Sequence[str] | None, val_fraction: float = 0.1) -> EpisodeDataset:
    """The cases evaluation scores: all cases of a dataset not trained on, the validation
    cases of one that was (``eval_datasets`` ``None``: the datasets not in ``trained_on``, or
    every dataset's validation cases when all were trained on)."""
    from medseg.data.episodes import EpisodeSettings, VolumeStore, select_tasks, split_cases
    from medseg.data.nnunet import find_datasets

    available = find_datasets(data_dir)
    trained = {t.dataset.name for t in select_tasks(available, trained_on)}
    if eval_datasets is None:
        unseen = [d.name for d in available if d.name not in trained]
        eval_datasets = unseen or [d.name for d in available]
    tasks = select_tasks(available, eval_datasets)
    cases = {}
    for task in tasks:
        held_out = task.dataset.name not in trained
        cases[task.dataset.name] = (task.dataset.cases if held_out
                                    else split_cases(task.dataset.cases, val_fraction)[1])
    return EpisodeDataset(VolumeStore(image_size), tasks, cases, EpisodeSettings(), episodes=0, seed=0)


def _sample_rate_ok(value) -> bool:
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    return value is None or positive(value) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(positive(v) for v in value))

#: ``sample_rate``: null, a number > 0, or a list of numbers > 0.
SAMPLE_RATE_CHECK = Check("null, a number > 0 or a list of numbers > 0", _sample_rate_ok)


def context_size_evaluation(cases: EpisodeDataset, context_sizes: Sequence[int], *, episodes: int,
                            gs: int):
    """An evaluation function of the engine's form (``model, loader, *, device, output_dir,
    ...``) scoring Dice against context size on ``cases``."""
    def evaluate(model, loader, *, device, output_dir, **_):
        return evaluate_context_sizes(model, cases, context_sizes, episodes=episodes, gs=gs,
                                      device=device, output_dir=output_dir)
    return evaluate
