"""SADAAN: spatial-attention multi-structure segmentation with presence detection (HDF5).

    python experiments/sadaan.py generate_data with dataset_path=DIR   # synthetic.* data
    python experiments/sadaan.py with training.batch_size=8            # train
    python experiments/sadaan.py evaluate with eval_checkpoint=PATH    # score a checkpoint
    python experiments/sadaan.py print_config                          # every entry
"""

from pathlib import Path

from ingredients.augmentation import SADAANAugmentationIngredient
from ingredients.checkpoint import CheckpointIngredient
from ingredients.dataset import HDF5DatasetIngredient, SADAANSyntheticIngredient
from ingredients.experiment import MedsegExperiment
from ingredients.fields import Field
from ingredients.loss_weights import SADAANLossWeightsIngredient
from ingredients.model import SADAANModelIngredient
from ingredients.optimizer import OptimizerIngredient
from ingredients.pipeline import PipelineRun
from ingredients.tracking import LoggingIngredient, TrackingIngredient
from ingredients.training import TrainingIngredient, image_size_field
from medseg import config as c
from medseg.data.hdf5 import SPLITS
from medseg.data.staging import refuse_to_overwrite
from medseg.data.synthetic.sadaan import HIGH_ABSENCE_PROBABILITY, generate_sadaan_dataset
from medseg.errors import ConfigError
from medseg.tasks.sadaan import SADAANTask, evaluate_sadaan

dataset = HDF5DatasetIngredient()
synthetic = SADAANSyntheticIngredient()
model = SADAANModelIngredient()
loss_weights = SADAANLossWeightsIngredient()
augmentation = SADAANAugmentationIngredient()
optimizer = OptimizerIngredient()
checkpoint = CheckpointIngredient(best_name="best_model.pth", last_name="last_model.pth",
                                  periodic_name="checkpoint_epoch_{epoch}.pth")
training = TrainingIngredient(extra_fields={"image_size": image_size_field([128, 128, 64])},
                              monitor="val_dice", monitor_mode="max")
logging_ = LoggingIngredient()
tracking = TrackingIngredient()

ex = MedsegExperiment("sadaan", ingredients=[dataset, synthetic, model, loss_weights,
                                             augmentation, optimizer, checkpoint, training,
                                             logging_, tracking])


ex.add_fields({
    "dataset_path": Field("./synthetic_medical_dataset_hdf5", c.text(),
                          "Folder with metadata.json, train.h5, val.h5 (and test.h5)"),
    "eval_split": Field("test", c.choice(*SPLITS),
                        "Split scored after training (when its file exists) and by `evaluate`",
                        resume_may_change=True),
    "eval_checkpoint": Field(None, c.optional(c.text()), "Checkpoint scored by `evaluate`",
                             resume_may_change=True),
})


# The seed's documented recipes, by name: `python experiments/sadaan.py with debug`.
ex.add_named_config("debug", training={"num_epochs": 5, "batch_size": 2},
                    logging={"log_frequency": 1}, checkpoint={"save_frequency": 1})
ex.add_named_config("high_memory", training={"batch_size": 16, "num_workers": 8,
                                             "image_size": [256, 256, 128], "learning_rate": 1e-3})
ex.add_named_config("memory_constrained", training={"batch_size": 2, "gradient_accumulation_steps": 8,
                                                    "memory_cleanup_frequency": 2, "num_workers": 2})
ex.add_named_config("research", training={"num_epochs": 500, "early_stopping_patience": 50},
                    loss_weights={"attention_supervision": 1.5},
                    optimizer={"lr_scheduler": "cosine_annealing"}, augmentation={"enabled": True},
                    logging={"visualize_predictions": True})
ex.add_named_config("for_speed", training={"num_workers": 8, "memory_cleanup_frequency": 10},
                    augmentation={"enabled": False})
ex.add_named_config("for_accuracy", loss_weights={"dice": 3.0}, training={"gradient_clip_norm": 1.0},
                    optimizer={"weight_decay": 1e-5}, augmentation={"noise_std": 1.0})
# A few minutes on a laptop CPU: small generated data, trained at its own size. Batch 2 gives
# twice the optimizer steps in the same time (test Dice 0.28 after 12 epochs, against 0.15 at 4).
ex.add_named_config("demo", dataset_path="data/sadaan_demo", eval_split="test",
                    synthetic={"num_train": 48, "num_val": 12, "num_test": 12},
                    training={"image_size": [64, 64, 32], "num_epochs": 12, "batch_size": 2,
                              "gradient_accumulation_steps": 1, "warmup_epochs": 1,
                              "learning_rate": 2e-3, "num_workers": 1},
                    optimizer={"lr_scheduler": "cosine_annealing"},
                    checkpoint={"save_frequency": 0})
# Data where absence is common (most cases had surgery), to judge presence detection where it
# matters: `generate_data with high_absence`, then train `with high_absence`.
ex.add_named_config("high_absence", dataset_path="data/sadaan_high_absence",
                    synthetic={"absent_probability": HIGH_ABSENCE_PROBABILITY})


@ex.config_validator
def dataset_exists(config, command_name):
    if command_name in ("main", "evaluate"):
        multiple, size = model.input_multiple(), config["training"]["image_size"]
        if any(s % multiple for s in size):
            raise ConfigError(f"training.image_size {list(size)} must be multiples of "
                              f"{multiple} (the SADAAN encoder halves every axis that often)")
        splits = ("train", "val") if command_name == "main" else (config["eval_split"],)
        dataset.check_splits(config["dataset_path"], splits, config["model"]["in_channels"],
                             check_cases=config["dataset"]["check_cases"])
        if (config["loss_weights"]["absence_balance"]
                and not dataset.has_split(config["dataset_path"], "train")):
            raise ConfigError("loss_weights.absence_balance=True weighs the absence term by the "
                              "training split's presence rates, but "
                              f"{Path(config['dataset_path']) / 'train.h5'} does not exist")
    elif command_name == "generate_data":
        refuse_to_overwrite(config["dataset_path"], config["synthetic"]["overwrite"],
                            "SADAAN dataset", "synthetic.overwrite")


@ex.data_command
def generate_data(dataset_path, synthetic):
    """Write a synthetic dataset in the seed's HDF5 layout to `dataset_path`."""
    path = generate_sadaan_dataset(dataset_path, **synthetic)
    print(f"wrote {path}")


def _task(config, structure_names, presence_rate=None):
    return SADAANTask(loss_weights.make_loss(presence_rate=presence_rate), structure_names,
                      presence_threshold=config["model"]["presence_threshold"],
                      batch_augmentation=augmentation.make_batch_augmentation(
                          num_structures=len(structure_names)))


def _pipeline(_run, config):
    metadata = dataset.check_splits(config["dataset_path"], ())
    pipeline = PipelineRun(_run, training, optimizer, checkpoint)
    net = model.make_model(num_structures=metadata["num_structures"])
    rate = None
    if config["loss_weights"]["absence_balance"]:
        rate = dataset.presence_rate(config["dataset_path"], metadata)
    return pipeline, metadata, net, _task(config, metadata["structure_names"], rate)


def _split(config, split, train):
    transform = augmentation.make_transform(config["training"]["image_size"], train=train)
    return dataset.open_split(config["dataset_path"], split, transform)


@ex.command
def evaluate(_run, _config, eval_split, eval_checkpoint):
    """Score a checkpoint on a split: metrics, per-case JSON and figures as artifacts."""
    pipeline, _, net, task = _pipeline(_run, _config)
    pipeline.load_weights(net, eval_checkpoint, "eval_checkpoint")
    loader = training.make_loader(_split(_config, eval_split, train=False), train=False)
    return pipeline.evaluate(evaluate_sadaan, net, task, loader, eval_split)


@ex.automain
def main(_run, _config, dataset_path, eval_split):
    """Train SADAAN, restore the best epoch, and score it on `eval_split` when it exists."""
    pipeline, metadata, net, task = _pipeline(_run, _config)
    pipeline.record_dataset(dataset_path, dataset.statistics(dataset_path, metadata))
    result = pipeline.fit(net, task, _split(_config, "train", True), _split(_config, "val", False),
                          curve_metrics=["val_dice", "val_dice_present", "val_iou",
                                         "val_presence_accuracy",
                                         "val_presence_balanced_accuracy"])
    if dataset.has_split(dataset_path, eval_split):
        loader = training.make_loader(_split(_config, eval_split, train=False), train=False)
        result.update(pipeline.evaluate(evaluate_sadaan, net, task, loader, eval_split))
    return result
