"""The Neuroverse3D experiment's own entries each change what a user can observe.

Each row: a probe run inside the experiment (so the config reaches the builders as it does in a
run), its observation with the base config and with one entry changed, which must differ. The
shared ingredients' entries (training.*, optimizer.*, checkpoint.*, logging.*, tracking.*) are
shown by the other pipelines' effect tests; prepare/predict/evaluate entries by the shell test
(tests/experiments/test_neuroverse3d.py) and tests/data/test_nnunet.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from support import add_effect_probe, load_experiment

from ingredients.neuroverse3d import (
    AUGMENTATION_FIELDS,
    build_augmentation,
    build_model,
    open_episodes,
)
from medseg.data.nnunet import prepare_nnunet
from medseg.data.synthetic.neuroverse3d import generate_neuroverse3d_data

nv_exp = load_experiment("neuroverse3d")
ex = nv_exp.ex
_probe = add_effect_probe(ex)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nv_effects")
    generate_neuroverse3d_data(root / "raw", num_datasets=3, cases_per_dataset=10,
                               volume_shape=(16, 16, 16))
    prepare_nnunet(root / "raw", root / "nn", dataset_name="x", modality="MRI")
    return root / "nn"


def episodes(config):
    data = open_episodes(config)
    train, val = data["train"], data["val"]
    plan = train.plan
    return {"tasks": Counter(train.tasks[e.task].name for e in plan),
            "sizes": sorted(Counter(len(e.cases) - 1 for e in plan).items()),
            "classes": sorted(Counter(len(e.classes) for e in plan).items()),
            "background": sum(0 in e.classes for e in plan),
            "items": len(train), "val_items": len(val),
            "val_cases": data["statistics"]["val_cases"],
            "train_cases": data["statistics"]["train_cases"],
            "shape": tuple(train[0]["target_in"].shape)}


def model(config):
    net = build_model(config["model"])
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16)
    ctx = torch.rand(1, 4, 1, 16, 16, 16)
    calls = []
    original = net.context_unet.forward
    net.context_unet.forward = lambda p, s: calls.append(p.shape[1]) or original(p, s)
    net.train()
    task = nv_exp.nv.Neuroverse3DTask(None, gs=config["model"]["gs"], val_gs=config["model"]["val_gs"])
    orders = set()
    for _ in range(6):
        calls.clear()
        with torch.no_grad():
            task._forward(net, {"target_in": x, "context_in": ctx, "context_out": ctx}, "cpu", task.gs)
        orders.add(tuple(calls))
    val_calls = []
    net.eval()
    net.context_unet.forward = lambda p, s: val_calls.append(p.shape[1]) or original(p, s)
    with torch.no_grad():
        task._forward(net, {"target_in": x, "context_in": ctx, "context_out": ctx}, "cpu", task.val_gs)
    return sum(p.numel() for p in net.parameters()), sorted(orders), val_calls


def augmentation(config):
    return build_augmentation(config["augmentation"]) is None


def augmented(config):
    """One episode's volumes of a dataset named as the generated ones, augmented."""
    augment = build_augmentation(config["augmentation"])
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(3, 8, 8, 8, generator=g), torch.zeros(3, 8, 8, 8)
    labels[:, 2:5, 1:6, 3:7] = 1
    new_images, new_labels = augment(images, labels, seed=5, dataset="Dataset001_SynBrainA")
    return new_images.sum().item(), new_labels.flatten().nonzero().flatten().tolist()


_NO_AUGMENTATION = {"enabled": True, **{k: 0.0 for k in AUGMENTATION_FIELDS
                                        if k not in ("enabled", "volume_rotate90_datasets")}}


BASE = {"image_size": [16, 16, 16], "datasets": ["Dataset001", "Dataset002"],
        "episodes_per_epoch": 60, "val_episodes": 3, "model": {"channels": [4, 8, 16]},
        "augmentation": {"enabled": False}, "tracking": {"observer": "none"}}
ROWS = [
    ("image_size", episodes, {"image_size": [8, 8, 8]}),
    ("context_size", episodes, {"context_size": 2}),
    ("stage", episodes, {"stage": 2, "weights": "W"}),
    ("random_context_range", episodes, {"stage": 2, "weights": "W", "random_context_range": [1, 2]}),
    ("random_context_probability", episodes, {"stage": 2, "weights": "W",
                                              "random_context_probability": 0.3}),
    ("datasets", episodes, {"datasets": ["Dataset001"]}),
    ("sample_rate", episodes, {"sample_rate": [9, 1]}),
    ("max_classes", episodes, {"max_classes": 1}),
    ("background_in_pool", episodes, {"background_in_pool": False}),
    ("episodes_per_epoch", episodes, {"episodes_per_epoch": 10}),
    ("val_episodes", episodes, {"val_episodes": 1}),
    ("val_fraction", episodes, {"val_fraction": 0.5}),
    ("keep_rate", episodes, {"keep_rate": 0.5}),
    ("model.channels", model, {"model": {"channels": [4, 8, 8]}}),
    ("model.conv_layers_per_stage", model, {"model": {"conv_layers_per_stage": 1}}),
    ("model.gs", model, {"model": {"gs": 1}}),
    ("model.val_gs", model, {"model": {"val_gs": 1}}),
    ("model.shuffle_groups", model, {"model": {"shuffle_groups": False}}),
    ("augmentation.enabled", augmentation, {"augmentation": {"enabled": True}}),
    ("augmentation.gin", augmented, {"augmentation": {"gin": 1.0}}),
    ("augmentation.volume_rotate90", augmented,
     {"augmentation": {"volume_rotate90": 1.0, "volume_rotate90_datasets": None}}),
    ("augmentation.volume_rotate90_datasets", augmented,
     {"augmentation": {"volume_rotate90": 1.0, "volume_rotate90_datasets": "SynBrain"}}),
]


def _observe(data_dir, tmp_path, function, updates):
    from support import merge

    weights = tmp_path / "w.ckpt"
    torch.save({"model": build_model({"channels": [4, 8, 16], "conv_layers_per_stage": 2, "gs": 3,
                                      "shuffle_groups": True}).state_dict(),
                "config": {"model": {"channels": [4, 8, 16]}}}, weights)
    config = merge(merge(BASE, {"data_dir": str(data_dir)}), updates)
    if config.get("weights") == "W":
        config["weights"] = str(weights)
    if "model" in updates:
        config["model"] = {**BASE["model"], **updates["model"]}
    _probe["function"] = function
    return ex.run("effect_probe", config_updates=config, named_configs=["cpu"]).result


@pytest.mark.parametrize("key, function, change", ROWS, ids=[r[0] for r in ROWS])
def test_entry_has_its_effect(data_dir, tmp_path, key, function, change):
    base_updates = {"model": {"gs": 3}} if key.startswith("model.") else {}
    if key in ("random_context_range", "random_context_probability"):
        base_updates = {"stage": 2, "weights": "W"}
    if function is augmented:  # every augmentation off, then the row's entry on
        base_updates = {"augmentation": dict(_NO_AUGMENTATION, volume_rotate90_datasets=None)}
        if key == "augmentation.volume_rotate90_datasets":  # rotations on, in no dataset
            base_updates["augmentation"].update(volume_rotate90=1.0,
                                                volume_rotate90_datasets="_syn_type")
    before = _observe(data_dir, tmp_path, function, base_updates)
    from support import merge

    after = _observe(data_dir, tmp_path, function,
                     merge(base_updates, change) if function is augmented else {**base_updates, **change})
    assert before != after


def test_every_own_entry_has_a_row():
    own = {k for k, _, _ in ex.describe_entries()
           if k.split(".")[0] not in ("training", "optimizer", "checkpoint", "logging", "tracking",
                                      "synthetic", "augmentation", "tags", "seed")}
    shown_elsewhere = {"data_dir", "weights", "input_dir", "output_dir", "image_pattern",
                       "mask_pattern", "dataset_name", "modality", "overwrite", "target",
                       "context_dir", "max_context", "prediction", "context_sizes",
                       "eval_datasets", "eval_episodes"}
    assert own - shown_elsewhere <= {r[0] for r in ROWS}


def test_synthetic_structure_radius_sizes_the_generated_structures(tmp_path):
    import nibabel as nib

    def foreground(radius, folder):
        synthetic = {"num_datasets": 2, "cases_per_dataset": 2, "volume_shape": [16, 16, 16],
                     "structures": 2, "structure_radius": radius}
        ex.run("generate_data", config_updates={"data_dir": str(tmp_path / folder),
                                                "synthetic": synthetic,
                                                "tracking": {"observer": "none"}})
        masks = sorted((tmp_path / folder).rglob("*_gt.nii.gz"))
        return sum(float((nib.load(m).get_fdata() > 0).mean()) for m in masks)
    assert foreground([0.3, 0.32], "large") > 3 * foreground([0.12, 0.14], "small")
