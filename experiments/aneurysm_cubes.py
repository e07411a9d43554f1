"""Aneurysm cubes: a 3D DynUNet on NPZ cubes with five-fold cross-validation.

    python experiments/aneurysm_cubes.py generate_volumes with volumes_dir=DIR  # synthetic CTAs
    python experiments/aneurysm_cubes.py prepare with volumes_dir=DIR cubes_dir=OUT
    python experiments/aneurysm_cubes.py with test viz          # sample panels, then exit
    python experiments/aneurysm_cubes.py with test              # 1 epoch on 10 % of the cubes
    python experiments/aneurysm_cubes.py with full val_fold=1   # 200 epochs, fold 1 validates
    python experiments/aneurysm_cubes.py with positive_only val_fold=1
    python experiments/aneurysm_cubes.py cross_validate with full   # 5 runs + fold ensemble
    python experiments/aneurysm_cubes.py predict with predict_input=X.nii.gz predict_checkpoints=[A]
    python experiments/aneurysm_cubes.py print_config
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ingredients.augmentation import CubeAugmentationIngredient
from ingredients.checkpoint import CheckpointIngredient, run_directory
from ingredients.dataset import (
    AneurysmCubesDatasetIngredient,
    AneurysmPrepareIngredient,
    AneurysmVolumesIngredient,
)
from ingredients.experiment import MedsegExperiment
from ingredients.fields import Field
from ingredients.loss_weights import CubeLossWeightsIngredient
from ingredients.model import DynUNetModelIngredient
from ingredients.optimizer import OptimizerIngredient
from ingredients.pipeline import PipelineRun
from ingredients.tracking import LoggingIngredient, SacredReporter, TrackingIngredient
from ingredients.training import TrainingIngredient
from medseg import config as c
from medseg.data.npz_cubes import NUM_FOLDS
from medseg.data.prepare_cubes import (
    check_prediction_input,
    read_prediction_input,
    save_probability,
)
from medseg.engine.checkpoint import plain
from medseg.errors import ConfigError, MedsegError
from medseg.models.ensemble import ProbabilityEnsemble
from medseg.tasks.aneurysm import (
    BLEND_MODES,
    METRICS,
    SCORE_METHODS,
    AneurysmTask,
    evaluate_cubes,
    load_models,
    predict_probability,
)
from medseg.tasks.aneurysm_cv import run_folds, summarise_folds
from medseg.viz.cubes import plot_cube_sample

EXPERIMENT = "aneurysm_cubes"
BEST_CHECKPOINT = "best_model.pth"
LAST_CHECKPOINT = "last_model.pth"

dataset = AneurysmCubesDatasetIngredient()
prepare_ = AneurysmPrepareIngredient()
synthetic = AneurysmVolumesIngredient()
model = DynUNetModelIngredient()
loss_weights = CubeLossWeightsIngredient()
augmentation = CubeAugmentationIngredient()
optimizer = OptimizerIngredient(type="adam", weight_decay=0.0, lr_scheduler="reduce_on_plateau")
checkpoint = CheckpointIngredient(best_name=BEST_CHECKPOINT, last_name=LAST_CHECKPOINT,
                                  periodic_name="checkpoint_epoch_{epoch}.pth")
training = TrainingIngredient(batch_size=4, learning_rate=1e-4, num_epochs=200,
                              early_stopping_patience=0, gradient_clip_norm=0.0, warmup_epochs=0,
                              gradient_accumulation_steps=1, memory_cleanup_frequency=0,
                              monitor="val_loss", monitor_mode="min")
logging_ = LoggingIngredient()
tracking = TrackingIngredient()

ex = MedsegExperiment(EXPERIMENT, ingredients=[dataset, prepare_, synthetic, model, loss_weights,
                                               augmentation, optimizer, checkpoint, training,
                                               logging_, tracking])

TOP_LEVEL = {
    "cubes_dir": Field("aneurysm_cubes", c.text(),
                       "Cubes folder: fold_0 ... fold_4 (+ test/); `prepare` writes it"),
    "volumes_dir": Field("aneurysm_volumes", c.text(),
                         "NIfTI volumes + aneurysm_centres.csv: `prepare` reads, "
                         "`generate_volumes` writes",
                         resume_may_change=True),
    "val_fold": Field(0, c.integer(minimum=0, maximum=NUM_FOLDS - 1),
                      "Validation fold (the other four train)"),
    "pos_thr": Field(0.1, c.number(minimum=0, maximum=0.999),
                     "A cube is called positive when some voxel's probability exceeds this"),
    "classification_score": Field("max", c.choice(*SCORE_METHODS),
                                  "Score ranking cubes for AUC: 'max' probability or "
                                  "'fraction' of voxels above pos_thr"),
    "sw_batch_size": Field(4, c.integer(minimum=1), "Sliding-window inference: windows per pass",
                           resume_may_change=True),
    "sw_overlap": Field(0.25, c.number(minimum=0, maximum=0.95),
                        "Sliding-window inference: overlap of neighbouring windows"),
    "sw_mode": Field("gaussian", c.choice(*BLEND_MODES),
                     "Sliding-window inference: blending of overlapping windows"),
    "viz_samples": Field(0, c.integer(minimum=0),
                         "Write this many training-sample panels to viz_dir and exit (0: train)"),
    "viz_dir": Field("outputs/aneurysm_cubes_viz", c.text(), "Folder of the sample panels",
                     resume_may_change=True),
    "cv_id": Field(None, c.optional(c.text()),
                   "Cross-validation id: groups the five fold runs; cross_validate with an "
                   "existing id continues it",
                   resume_may_change=True),
    "predict_checkpoints": Field([], c.sequence(c.text()),
                                 "predict: checkpoint(s); several are averaged (fold ensemble)",
                                 resume_may_change=True),
    "predict_input": Field(None, c.optional(c.text()), "predict: an NPZ cube or a NIfTI volume",
                           resume_may_change=True),
    "predict_output_dir": Field("outputs/aneurysm_predictions", c.text(),
                                "predict: folder of the probability NIfTI and score JSON",
                                resume_may_change=True),
}
ex.add_fields(TOP_LEVEL)

# The seed's presets: `--test --viz` is `with test viz`.
ex.add_named_config("test", training={"num_epochs": 1}, dataset={"small_dataset": True})
ex.add_named_config("viz", viz_samples=5)
ex.add_named_config("full", training={"num_epochs": 200}, dataset={"small_dataset": False})
ex.add_named_config("positive_only", dataset={"only_positive": True, "only_positive_val": True},
                    loss_weights={"pos_weight": 10.0})
# CPU in about a quarter of an hour (benchmarks/bench_aneurysm_quality.py): 48-slice
# synthetic volumes, 16x64x64 cubes, crops of all 16 slices and half the plane, a network of
# a quarter of the width, a learning rate for few epochs, and pos_weight 2 (with 128 the
# model calls far more vessel voxels aneurysm: validation Dice 0.25 against 0.48 at epoch 20).
DEMO_VOLUMES, DEMO_CUBES = "data/aneurysm_demo_volumes", "data/aneurysm_demo_cubes"
ex.add_named_config(
    "demo", volumes_dir=DEMO_VOLUMES, cubes_dir=DEMO_CUBES,
    synthetic={"num_series": 240, "volume_shape": [48, 192, 192], "spacing": [1.2, 0.9, 0.9]},
    dataset={"cube_shape": [16, 64, 64]}, augmentation={"crop_size": [16, 32, 32]},
    model={"filters": [8, 16, 32, 64]}, loss_weights={"pos_weight": 2.0},
    training={"num_epochs": 25, "learning_rate": 2e-3, "num_workers": 1},
    checkpoint={"save_frequency": 0})


@ex.config_validator
def check_config(config, command_name):
    if command_name in ("main", "cross_validate", "predict"):
        _check_crop(config)
    if command_name in ("main", "cross_validate"):
        _check_monitor(config)
        dataset.scan(config["cubes_dir"])
    elif command_name == "prepare":
        prepare_.check_inputs(config["volumes_dir"], config["cubes_dir"])
    elif command_name == "generate_volumes":
        synthetic.check_output(config["volumes_dir"])
    elif command_name == "predict":
        _check_predict(config)


def _check_crop(config):
    crop, cube = config["augmentation"]["crop_size"], config["dataset"]["cube_shape"]
    if any(c_ > s for c_, s in zip(crop, cube)):
        raise ConfigError(f"augmentation.crop_size {crop} is larger than dataset.cube_shape "
                          f"{cube}; the crop is cut out of a cube")
    factor = model.downsampling(config)
    if any(size % factor for size in crop):
        raise ConfigError(f"augmentation.crop_size {crop} must be divisible by {factor} on every "
                          f"axis: model.strides {config['model']['strides']} downsample by that")


def _check_monitor(config):
    monitor = config["training"]["monitor"]
    names = [f"val_{name}" for name in METRICS]
    if monitor not in names:
        raise ConfigError(f"training.monitor={monitor!r} is not a metric of this pipeline; "
                          f"choose one of {', '.join(names)}")
    if config["dataset"]["only_positive_val"] and monitor in ("val_auc", "val_neg_accuracy"):
        raise ConfigError(f"training.monitor={monitor!r} is undefined with "
                          "dataset.only_positive_val (no negative validation cubes)")


def _check_predict(config):
    if not config["predict_checkpoints"]:
        raise ConfigError("predict_checkpoints is empty; give one checkpoint or the five fold "
                          "checkpoints, e.g. predict_checkpoints=[checkpoints/.../best_model.pth]")
    for path in config["predict_checkpoints"]:
        if not Path(path).is_file():
            raise ConfigError(f"predict_checkpoints: no checkpoint file at {path}")
    source = config["predict_input"]
    if source is None:
        raise ConfigError("predict_input is not set; give an NPZ cube or a NIfTI volume")
    if not Path(source).is_file():
        raise ConfigError(f"predict_input: no file at {source}")
    check_prediction_input(source)


@ex.data_command
def generate_volumes(volumes_dir):
    """Write synthetic head CT angiographies (NIfTI) and aneurysm_centres.csv to volumes_dir."""
    path = synthetic.generate(volumes_dir)
    print(f"wrote {path}")


@ex.data_command
def prepare(_run, _config, volumes_dir, cubes_dir):
    """Cut cubes from the volumes in volumes_dir into cubes_dir (the seed's
    prepare_aneurysm_cubes.py --output-dir cubes_dir --cube-shape D H W)."""
    summary = prepare_.run(volumes_dir, cubes_dir, _config["dataset"]["cube_shape"])
    _run.info["cubes"] = summary.cubes
    _run.info["series"] = summary.series
    print(f"wrote {summary.output_dir}: " + ", ".join(
        f"{name} {counts['positive']}+/{counts['negative']}-"
        for name, counts in sorted(summary.cubes.items())))
    return {"cubes": summary.cubes, "negatives_not_placed": summary.negatives_not_placed}


def _task(config) -> AneurysmTask:
    return AneurysmTask(loss_weights.make_loss(), roi_size=config["augmentation"]["crop_size"],
                        sw_batch_size=config["sw_batch_size"], sw_overlap=config["sw_overlap"],
                        sw_mode=config["sw_mode"], pos_thr=config["pos_thr"],
                        score_method=config["classification_score"])


def _cubes(records, train):
    return dataset.open_cubes(records, augmentation.make_transform(train=train))


def write_sample_panels(_run, records, count, directory, seed):
    """The `viz` preset: positives and negatives in turn, each as stored and as augmented."""
    positives = [r for r in records if r.label == 1]
    negatives = [r for r in records if r.label == 0]
    chosen = [r for pair in zip(positives, negatives) for r in pair]
    chosen += positives[len(chosen) // 2:] + negatives[len(chosen) // 2:]
    stored = dataset.open_cubes(chosen[:count], None)
    transform = augmentation.make_transform(train=True)
    transform.set_random_state(seed)
    paths = []
    for index in range(len(stored)):
        sample = stored[index]
        augmented = transform(dict(sample))
        name = f"sample_{index:02d}_{Path(sample['name']).stem}.png"
        path = plot_cube_sample(sample["image"][0], sample["mask"][0],
                                augmented["image"][0].numpy(), augmented["mask"][0].numpy(),
                                Path(directory) / name,
                                title=f"{sample['name']} (label {int(sample['label'])})")
        _run.add_artifact(str(path))
        paths.append(str(path))
    print(f"wrote {len(paths)} sample panels to {directory}")
    return paths


def cv_root(config, cv_id) -> Path:
    """Where a cross-validation keeps its folds: the checkpoint folder template with the
    run id replaced by ``cv_<cv_id>``."""
    return run_directory(config["checkpoint"]["save_dir"], EXPERIMENT, f"cv_{cv_id}")


def train_fold_in_subprocess(config, cv_id, fold, directory):
    """One fold as its own tracked run, in a fresh process (as the seed's shell loop runs
    them): the run's config is this one with val_fold, cv_id and the checkpoint folder set;
    an interrupted fold resumes from its last checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / LAST_CHECKPOINT
    updates = plain(config)
    updates.update(val_fold=fold, cv_id=cv_id, viz_samples=0)
    updates["checkpoint"].update(save_dir=str(directory),
                                 resume=str(last) if last.is_file() else None)
    config_file = directory / "fold_config.json"
    config_file.write_text(json.dumps(updates, indent=1))
    command = [sys.executable, os.path.abspath(__file__), "with", str(config_file),
               "-c", f"cross-validation {cv_id}, fold {fold}"]
    print(f"== fold {fold}: {' '.join(command)}", flush=True)
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise MedsegError(f"fold {fold} of cross-validation {cv_id} failed (exit status "
                          f"{returncode}, output above); run `cross_validate with cv_id={cv_id}` "
                          "to continue with the unfinished folds")


@ex.command
def cross_validate(_run, _config, cv_id):
    """Train the five folds as five runs sharing `cv_id`, summarise Dice and AUC over the
    folds, and score the mean of the five fold models on test/ (when prepared)."""
    cv_id = cv_id or time.strftime("%Y%m%d-%H%M%S")
    root = cv_root(_config, cv_id)
    _run.info["cross_validation"] = {"cv_id": cv_id, "directory": str(root)}
    outcomes = run_folds(root, range(NUM_FOLDS),
                         lambda fold, directory: train_fold_in_subprocess(_config, cv_id, fold,
                                                                          directory),
                         best_name=BEST_CHECKPOINT)
    summary = summarise_folds(outcomes)
    reporter = SacredReporter(_run)
    for name, value in summary.items():
        reporter.log_scalar(name, value, 0)
    _run.info["folds"] = {f"fold_{o.fold}": {"checkpoint": str(o.checkpoint), **o.metrics}
                          for o in outcomes}
    result = {"cv_id": cv_id, **summary}
    index = dataset.scan(_config["cubes_dir"])
    test_records = dataset.test_records(index)
    if test_records:
        result.update(_ensemble_on_test(_run, _config, root, outcomes, test_records))
    (root / "cross_validation.json").write_text(json.dumps(result, indent=2, allow_nan=True))
    _run.add_artifact(str(root / "cross_validation.json"))
    return result


def _ensemble_on_test(_run, config, root, outcomes, test_records):
    pipeline = PipelineRun(_run, training, optimizer, checkpoint)
    pipeline.output_dir = root
    members = load_models([o.checkpoint for o in outcomes], model.from_config, pipeline.device)
    loader = training.make_loader(_cubes(test_records, False), train=False)
    scores = pipeline.evaluate(evaluate_cubes, ProbabilityEnsemble(members), _task(config),
                               loader, "ensemble_test")
    single = [o.directory / "evaluation_test" / "test_metrics.json" for o in outcomes]
    fold_auc = [json.loads(p.read_text())["test_auc"] for p in single if p.is_file()]
    if fold_auc:
        scores["fold_models_test_auc_mean"] = float(sum(fold_auc) / len(fold_auc))
    return scores


@ex.command
def predict(_run, _config, predict_checkpoints, predict_input, predict_output_dir):
    """Probability map (NIfTI) and classification score of an NPZ cube or a NIfTI volume,
    from one checkpoint or the mean of several (e.g. the five fold models)."""
    device, precision = training.device_and_precision()
    members = load_models(predict_checkpoints, model.from_config, device)
    net = members[0] if len(members) == 1 else ProbabilityEnsemble(members)
    task = _task(_config)
    source = read_prediction_input(predict_input,
                                   intensity_window=_config["prepare"]["intensity_window"],
                                   target_spacing=_config["prepare"]["target_spacing"])
    probability = predict_probability(net, source.volume, task=task,
                                      cube_shape=_config["dataset"]["cube_shape"], device=device,
                                      precision=precision)
    score, positive = task.score_cube(torch.from_numpy(probability))
    stem = Path(predict_input).name.removesuffix(".gz").removesuffix(".nii").removesuffix(".npz")
    output = Path(predict_output_dir)
    map_path = save_probability(probability, source, output / f"{stem}_probability.nii.gz")
    record = {"input": str(predict_input), "checkpoints": list(predict_checkpoints),
              "probability_map": str(map_path), "score_method": task.score_method,
              "score": score, "max_probability": float(probability.max()),
              "pos_thr": task.pos_thr, "predicted_label": int(positive),
              "label": source.label}
    json_path = output / f"{stem}_prediction.json"
    json_path.write_text(json.dumps(record, indent=2))
    for path in (map_path, json_path):
        _run.add_artifact(str(path))
    print(f"{predict_input}: score {score:.4f} -> {'positive' if positive else 'negative'}; "
          f"wrote {map_path}")
    return record


@ex.automain
def main(_run, _config, _seed, cubes_dir, val_fold, viz_samples, viz_dir, cv_id):
    """Train on four folds, validate on `val_fold`, then score the best epoch on the
    validation fold (`fold_*` metrics) and on test/ when it exists (`test_*`)."""
    index = dataset.scan(cubes_dir)
    train_records, val_records = dataset.split(index, val_fold)
    if viz_samples:
        return {"viz_panels": write_sample_panels(_run, train_records, viz_samples, viz_dir, _seed)}
    pipeline = PipelineRun(_run, training, optimizer, checkpoint)
    pipeline.record_dataset(cubes_dir, {**dataset.statistics(index),
                                        "train_cubes": len(train_records),
                                        "val_cubes": len(val_records)})
    if cv_id is not None:
        _run.info["cross_validation"] = {"cv_id": cv_id, "fold": val_fold}
    net = model.make_model()
    task = _task(_config)
    result = pipeline.fit(net, task, _cubes(train_records, True), _cubes(val_records, False),
                          curve_metrics=[f"val_{name}" for name in METRICS if name != "loss"])
    for split, records in (("fold", val_records), ("test", dataset.test_records(index))):
        if records:
            loader = training.make_loader(_cubes(records, False), train=False)
            result.update(pipeline.evaluate(evaluate_cubes, net, task, loader, split))
    result["checkpoint"] = str(pipeline.checkpoints.best_path)
    return result
