"""SMALabeller: a slice-wise 2D (or 3D) U-Net on 3D MRI, with BatchNorm calibration,
TensorBoard and Ray Tune sweeps.

    python experiments/smalabeller.py generate_data with data_dir=data/sma
    python experiments/smalabeller.py with training_images=data/sma/imagesTr_resampled \\
        training_labels=data/sma/labelsTr_resampled unet_dimensions=2D batch_size=2 \\
        epochs=100 val_set_size=0.2 tb_prefix=SMALabeller comment=cconelea
    python experiments/smalabeller.py with config.loss_function=combination config.max_lr=5e-3
    python experiments/smalabeller.py tune with tune.num_samples=20
    python experiments/smalabeller.py with demo          # minutes on a laptop CPU
    tensorboard --logdir ~/runs/SMALabeller
"""

from __future__ import annotations

from ingredients import smalabeller as sma
from ingredients.experiment import MedsegExperiment
from ingredients.fields import SyntheticIngredient
from ingredients.tracking import TrackingIngredient
from ingredients.tune import (TuneIngredient, add_tune_command, choice, loguniform,
                              reporting_to_tune, uniform)
from medseg.data.synthetic.smalabeller import generate_brain_dataset

# The original's search space (pytorch_model/model/tuning.py) and its ASHA settings.
tune = TuneIngredient(space={"config": {
    "lr": loguniform(1e-5, 1e-2), "max_lr": loguniform(1e-3, 1e-1),
    "loss_function": choice("dice", "cross_entropy", "combination"),
    "augmentations": choice(True, False), "dropout_rate": uniform(0.0, 0.5)}},
    name="SMALabellerApp-{experiment}", max_t=10, grace_period=1, reduction_factor=2)
ex = MedsegExperiment("smalabeller", ingredients=[
    sma.group("config", sma.CONFIG_FIELDS), sma.group("data", sma.DATA_FIELDS),
    sma.group("model", sma.MODEL_FIELDS), sma.group("bn_calibration", sma.BN_FIELDS),
    sma.group("early_stopping", sma.EARLY_STOPPING_FIELDS),
    sma.group("checkpoint", sma.CHECKPOINT_FIELDS), sma.group("training", sma.ENGINE_FIELDS),
    sma.group("tensorboard", sma.TENSORBOARD_FIELDS), SyntheticIngredient(sma.SYNTHETIC_FIELDS, {}, generator="generate_data"),
    tune, TrackingIngredient()])
ex.add_fields(sma.resumable(sma.ARGUMENT_FIELDS))
add_tune_command(ex, "experiments.smalabeller",
                 path_keys=("training_images", "training_labels", "runs_dir"))

# Minutes on a laptop CPU: small generated heads, a narrow U-Net, small crops.
DEMO = dict(data_dir="data/sma_demo", training_images="data/sma_demo/imagesTr_resampled",
            training_labels="data/sma_demo/labelsTr_resampled", epochs=12, num_workers=0,
            config={"lr": 4e-4, "max_lr": 1e-2, "loss_function": "dice", "dropout_rate": 0.1},
            data={"crop_size": [48, 48, 16], "crops_per_volume": 2},
            model={"channels": [8, 16, 32, 64]},
            synthetic={"num_cases": 12, "image_size": [48, 48], "depth_range": [20, 28]},
            bn_calibration={"warmup_batches": 4})
ex.add_named_config("demo", **DEMO)
# The demo's network on 40 generated heads (32 to train on), one crop each, 60 epochs: about
# five minutes on one CPU core, validation Dice above 0.85 (`python -m benchmarks
# smalabeller_quality`).
ex.add_named_config("cpu_quality", **{
    **DEMO, "data_dir": "data/sma_quality",
    "training_images": "data/sma_quality/imagesTr_resampled",
    "training_labels": "data/sma_quality/labelsTr_resampled", "epochs": 60,
    "data": {**DEMO["data"], "crops_per_volume": 1},
    "synthetic": {**DEMO["synthetic"], "num_cases": 40}})
# The trial settings of the original's tuning.py (its app_args).
ex.add_named_config("sweep", epochs=10, batch_size=4, num_workers=0, tb_prefix="raytune")


@ex.config_validator
def check_inputs(config, command_name):
    if command_name == "main":
        sma.check_training_inputs(config)


@ex.data_command
def generate_data(data_dir, synthetic, _config):
    """Write synthetic brain MRI with a cortical ribbon label to data_dir (the documented
    imagesTr_resampled/ and labelsTr_resampled/ folders)."""
    path = generate_brain_dataset(data_dir, num_cases=synthetic["num_cases"],
                                  settings=sma.brain_settings(_config),
                                  overwrite=synthetic["overwrite"])
    print(f"wrote {synthetic['num_cases']} cases to {path}")


class SMALabellerApp:
    """The original's programmatic entry: ``args`` are its command-line arguments,
    ``config`` its config dict; each training is a recorded Sacred run."""

    def __init__(self, args=None, named_configs=()):
        self.args, self.named_configs = dict(args or {}), list(named_configs)

    def do2dTraining(self, config, ray_tune=False):  # noqa: N802 (the original's name)
        """Train the 2D U-Net; ``ray_tune``: inside a Ray Tune trial, report each epoch."""
        return self._train(config, "2D", ray_tune)

    def do3dTraining(self, config, ray_tune=False):  # noqa: N802
        return self._train(config, "3D", ray_tune)

    def _train(self, config, dimensions, ray_tune):
        updates = {**self.args, "unet_dimensions": dimensions, "config": dict(config)}
        with reporting_to_tune(ray_tune):
            return ex.run(config_updates=updates, named_configs=self.named_configs)


@ex.automain
def main(_run, _config):
    """Train on the pairs of training_images/training_labels; TensorBoard logs and
    checkpoints under runs_dir/tb_prefix; returns the best epoch and validation figures."""
    return sma.train(_run, _config)
