"""Neuroverse3D: 3D in-context-learning segmentation with mini-context processing (nnU-Net data).

    python experiments/neuroverse3d.py generate_data with data_dir=data/neuroverse3d_raw
    python experiments/neuroverse3d.py prepare with input_dir=data/neuroverse3d_raw \\
        output_dir=data/neuroverse3d dataset_name=MyDataset modality=MRI
    python experiments/neuroverse3d.py with stage=1 data_dir=data/neuroverse3d context_size=3
    python experiments/neuroverse3d.py with stage2 weights=checkpoints/neuroverse3d/1/best.ckpt
    python experiments/neuroverse3d.py predict with weights=... target=case.nii.gz context_dir=...
    python experiments/neuroverse3d.py evaluate with weights=... context_sizes=[1,2,4,8]
    python experiments/neuroverse3d.py with cpu      # seconds per epoch on a laptop CPU
"""

from ingredients.checkpoint import CheckpointIngredient
from ingredients.experiment import MedsegExperiment
from ingredients.fields import Field
from ingredients.neuroverse3d import (
    Neuroverse3DAugmentationIngredient,
    Neuroverse3DModelIngredient,
    Neuroverse3DSyntheticIngredient,
    build_model,
    check_config,
    open_episodes,
)
from ingredients.optimizer import OptimizerIngredient
from ingredients.pipeline import PipelineRun
from ingredients.tracking import LoggingIngredient, TrackingIngredient
from ingredients.training import TrainingIngredient
from medseg import config as c
from medseg.data.nnunet import NnunetDataset, prepare_nnunet
from medseg.data.synthetic.neuroverse3d import generate_neuroverse3d_data
from medseg.losses.neuroverse3d import SmoothL3L1Loss
from medseg.tasks import neuroverse3d as nv

model = Neuroverse3DModelIngredient()
augmentation = Neuroverse3DAugmentationIngredient()
synthetic = Neuroverse3DSyntheticIngredient()
# The original: Adam, ReduceLROnPlateau(factor 0.5, patience 100, min_lr 0.01 x lr) on val_loss.
optimizer = OptimizerIngredient(type="adam", weight_decay=0.0, lr_scheduler="reduce_on_plateau",
                                plateau_factor=0.5, plateau_patience=100, min_lr=1e-7)
checkpoint = CheckpointIngredient(best_name="best.ckpt", last_name="last.ckpt",
                                  periodic_name="epoch_{epoch}.ckpt", save_frequency=0)
# The seed's stage-1 command: batch 1, lr 1e-5, 50 epochs; clipping 0.25 as the original.
training = TrainingIngredient(batch_size=1, learning_rate=1e-5, num_epochs=50,
                              gradient_clip_norm=0.25, warmup_epochs=0,
                              gradient_accumulation_steps=1, early_stopping_patience=0,
                              memory_cleanup_frequency=0, monitor="val_loss", monitor_mode="min")
logging_ = LoggingIngredient()
tracking = TrackingIngredient()

ex = MedsegExperiment("neuroverse3d", ingredients=[model, augmentation, synthetic, optimizer,
                                                   checkpoint, training, logging_, tracking])

_names = c.optional(c.sequence(c.text(), min_length=1))
ex.add_fields({
    "stage": Field(1, c.choice(1, 2), "1: fixed context_size; 2: from `weights`, random sizes"),
    "data_dir": Field("data/neuroverse3d", c.text(),
                      "nnU-Net data: one dataset (dataset.json) or a folder of DatasetNNN_Name"),
    "image_size": Field([128, 128, 128], c.sequence(c.integer(minimum=4), length=3),
                        "Size volumes are resized to on loading (the original: 128^3)"),
    "context_size": Field(3, c.integer(minimum=1),
                          "Context pairs per episode (stage 1, validation)"),
    "random_context_range": Field([2, 9], c.sequence(c.integer(minimum=1), length=2),
                                  "Stage 2: range L is drawn from, inclusive (the seed: 2-9; the "
                                  "original drew 1-8: named config original_stage2)"),
    "random_context_probability": Field(1.0, c.number(minimum=0, maximum=1),
                                        "Stage 2: probability that L is drawn from "
                                        "random_context_range rather than context_size (the "
                                        "original: 0.5)"),
    "datasets": Field(None, _names, "Tasks trained on: DatasetNNN[_Name] (all its channels) or "
                                    "DatasetNNN_Name:C; null: every dataset in data_dir"),
    "sample_rate": Field(None, nv.SAMPLE_RATE_CHECK,
                         "Relative sampling weight of each `datasets` entry (a list); one number "
                         "weighs all alike (the seed's form); null: uniform. The original "
                         "ignored it"),
    "max_classes": Field(5, c.integer(minimum=1),
                         "Most label values drawn as one episode's foreground"),
    "background_in_pool": Field(True, c.boolean(),
                                "Label 0 may be drawn among the foreground values (the original)"),
    "episodes_per_epoch": Field(1000, c.integer(minimum=1),
                                "Training episodes per epoch (each gives L+1 steps, one per turn)"),
    "val_episodes": Field(50, c.integer(minimum=1),
                          "Validation episodes (each scored on every turn)"),
    "val_fraction": Field(0.1, c.number(minimum=0, maximum=0.5),
                          "Last share of each dataset's cases (name order) kept for validation"),
    "keep_rate": Field(1.0, c.number(above=0, maximum=1),
                       "Share of each dataset's training cases kept, the first in name order "
                       "(the original's keep_rate, for sensitivity analysis); validation cases "
                       "stay"),
    "weights": Field(None, c.optional(c.text()),
                     "Checkpoint to start from (stage 2, fine-tuning; medseg or the original's "
                     "Lightning .ckpt) and to use in predict / evaluate"),
    "input_dir": Field("data/neuroverse3d_raw", c.text(), "prepare: folder of image/mask pairs"),
    "output_dir": Field("data/neuroverse3d", c.text(), "prepare: nnU-Net folder written"),
    "image_pattern": Field("*_img.nii.gz", c.text(), "prepare: glob of the images"),
    "mask_pattern": Field("*_gt.nii.gz", c.text(), "prepare: glob of the masks"),
    "dataset_name": Field("MyDataset", c.text(), "prepare: dataset.json name (pairs in input_dir)"),
    "modality": Field("MRI", c.text(), "prepare: channel name in dataset.json (MRI, CT ...)"),
    "overwrite": Field(False, c.boolean(), "prepare: replace an existing output_dir"),
    "target": Field(None, c.optional(c.text()), "predict: the NIfTI volume to segment"),
    "context_dir": Field(None, c.optional(c.text()),
                         "predict: nnU-Net dataset whose image/label pairs are the context"),
    "max_context": Field(8, c.integer(minimum=1),
                         "predict: most context pairs used (the original: 8)"),
    "prediction": Field("predictions/neuroverse3d_pred.nii.gz", c.text(),
                        "predict: output file (the target's affine and shape)"),
    "context_sizes": Field([1, 2, 4, 8], c.sequence(c.integer(minimum=1), min_length=1),
                           "evaluate: context sizes L scored"),
    "eval_datasets": Field(None, _names, "evaluate: datasets scored (null: those not in "
                                         "`datasets`, else every validation split)"),
    "eval_episodes": Field(20, c.integer(minimum=1), "evaluate: targets scored per context size"),
})

# The seed's commands, by name. Stage 2 also needs weights=<stage-1 checkpoint>.
ex.add_named_config("stage1", stage=1, context_size=3,
                    training={"num_epochs": 50, "learning_rate": 1e-5})
ex.add_named_config("stage2", stage=2, training={"num_epochs": 100, "learning_rate": 2e-6})
ex.add_named_config("original_stage2", random_context_range=[1, 8], random_context_probability=0.5)
# Seconds per epoch on a laptop CPU: 32^3 volumes, three levels of 8-16-32 channels (270,945
# parameters), the generated data's held-out dataset left for `evaluate`. Learning rate 5e-4:
# at 2e-3 the loss of this net (no normalisation layers) blew up after ~200 steps (0.02 -> 8.9).
ex.add_named_config("cpu", data_dir="data/neuroverse3d", image_size=[32, 32, 32],
                    datasets=["Dataset001", "Dataset002", "Dataset003"],
                    episodes_per_epoch=24, val_episodes=6,
                    model={"channels": [8, 16, 32], "gs": 2, "val_gs": 4},
                    training={"learning_rate": 5e-4, "num_epochs": 10, "num_workers": 0},
                    optimizer={"plateau_patience": 3, "min_lr": 1e-5},
                    logging={"log_frequency": 10})


@ex.config_validator
def check_inputs(config, command_name):
    check_config(config, command_name)


@ex.data_command
def generate_data(data_dir, synthetic):
    """Write synthetic *_img / *_gt pairs, one folder per dataset, to data_dir."""
    folders = generate_neuroverse3d_data(data_dir, **synthetic)
    print(f"wrote {len(folders)} datasets to {data_dir}: {', '.join(f.name for f in folders)}")


@ex.data_command
def prepare(input_dir, output_dir, dataset_name, modality, image_pattern, mask_pattern, overwrite):
    """Convert image/mask pairs to the nnU-Net v2 layout (the seed's
    prepare_neuroverse3d_data.py)."""
    written = prepare_nnunet(input_dir, output_dir, dataset_name=dataset_name, modality=modality,
                             image_pattern=image_pattern, mask_pattern=mask_pattern,
                             overwrite=overwrite)
    print(f"wrote {len(written)} nnU-Net dataset(s) to {output_dir}")
    return {"datasets": [m["name"] for m in written],
            "cases": sum(m["numTraining"] for m in written)}


@ex.command
def predict(_config, weights, target, context_dir, max_context, prediction):
    """Segment target from the image/label pairs of context_dir; a NIfTI with target's geometry."""
    device, _ = training.device_and_precision()
    net = nv.model_from_checkpoint(weights, _config["model"]["channels"]).to(device)
    result = nv.predict_case(net, target, NnunetDataset.open(context_dir),
                             size=_config["image_size"], max_context=max_context,
                             gs=_config["model"]["val_gs"], device=device, output=prediction)
    print(f"wrote {result['output']} (labels {result['labels']}, shape {result['shape']})")
    return result


@ex.command
def evaluate(_run, _config, weights, data_dir, context_sizes, eval_episodes):
    """Dice against context size on the datasets not trained on: metrics, JSON and a PNG."""
    pipeline = PipelineRun(_run, training, optimizer, checkpoint)
    net = nv.model_from_checkpoint(weights, _config["model"]["channels"]).to(pipeline.device)
    cases = nv.open_evaluation_data(data_dir, image_size=_config["image_size"],
                                    eval_datasets=_config["eval_datasets"],
                                    trained_on=_config["datasets"],
                                    val_fraction=_config["val_fraction"])
    score = nv.context_size_evaluation(cases, context_sizes, episodes=eval_episodes,
                                       gs=_config["model"]["val_gs"])
    return pipeline.evaluate(score, net, None, None, "heldout")


@ex.automain
def main(_run, _config, data_dir, weights):
    """Train one stage; best and last checkpoints by val_loss, training curves."""
    pipeline = PipelineRun(_run, training, optimizer, checkpoint)
    data = open_episodes(_config)
    pipeline.record_dataset(data_dir, data["statistics"])
    net = build_model(_config["model"])
    if weights:
        nv.load_weights(net, weights)
    task = nv.Neuroverse3DTask(SmoothL3L1Loss(), gs=_config["model"]["gs"],
                               val_gs=_config["model"]["val_gs"])
    return pipeline.fit(net, task, data["train"], data["val"], curve_metrics=["val_dice"])
