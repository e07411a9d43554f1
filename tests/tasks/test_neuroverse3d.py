"""Neuroverse3D episodes, loss, checkpoints (the original's Lightning layout) and scoring."""

import argparse
from collections import Counter
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from ingredients.neuroverse3d import AUGMENTATION_FIELDS, build_augmentation
from medseg.data.episodes import (
    AugmentationSettings,
    EpisodeAugmentation,
    EpisodeDataset,
    EpisodeSettings,
    VolumeStore,
    draw_episode,
    select_tasks,
    split_cases,
)
from medseg.data.nnunet import find_datasets, prepare_nnunet
from medseg.data.synthetic.neuroverse3d import generate_neuroverse3d_data
from medseg.errors import DataError
from medseg.losses.neuroverse3d import SmoothL3L1Loss
from medseg.models.neuroverse3d import Neuroverse3D
from medseg.tasks import neuroverse3d as nv

SIZE = (16, 16, 16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nv")
    generate_neuroverse3d_data(root / "raw", num_datasets=3, cases_per_dataset=4,
                               volume_shape=(16, 20, 16))
    prepare_nnunet(root / "raw", root / "nn", dataset_name="unused", modality="MRI")
    return root / "nn"


def _dataset(data_dir, settings=EpisodeSettings(), names=None, weights=None, episodes=6, aug=None):
    tasks = select_tasks(find_datasets(data_dir), names, weights)
    cases = {t.dataset.name: t.dataset.cases for t in tasks}
    return EpisodeDataset(VolumeStore(SIZE), tasks, cases, settings, episodes=episodes, seed=3,
                          augmentation=aug)


def test_each_volume_takes_its_turn_as_target(data_dir):
    data = _dataset(data_dir, EpisodeSettings(context_size=3))
    assert len(data) == 6 * 4
    turns = [data[i] for i in range(4)]  # the four turns of episode 0
    images, labels = data.episode_volumes(data.plan[0])
    for turn, item in enumerate(turns):
        assert item["context_in"].shape == (3, 1, *SIZE)
        torch.testing.assert_close(item["target_in"][0], images[turn])
        torch.testing.assert_close(item["target_out"][0], labels[turn])
    torch.testing.assert_close(turns[0]["context_in"][0], turns[2]["target_in"][None][0])


def test_labels_are_binarised_with_the_episode_classes(data_dir):
    data = _dataset(data_dir)
    episode = data.plan[1]
    _, labels = data.episode_volumes(episode)
    entry = data.tasks[episode.task]
    raw = torch.cat([data.store.labels(entry.dataset, c) for c in episode.cases])
    torch.testing.assert_close(labels, torch.isin(raw, torch.tensor(episode.classes)).float())
    assert set(torch.unique(labels).tolist()) <= {0.0, 1.0}


def test_epochs_are_reproducible_and_differ(data_dir):
    data = _dataset(data_dir)
    data.set_epoch_seed(2)
    plan = list(data.plan)
    data.set_epoch_seed(5)
    assert data.plan != plan
    data.set_epoch_seed(2)
    assert data.plan == plan


def _draws(data_dir, settings, weights=None, names=None, count=400):
    tasks = select_tasks(find_datasets(data_dir), names, weights)
    cases = {t.dataset.name: t.dataset.cases for t in tasks}
    rng = np.random.default_rng(0)
    return tasks, [draw_episode(rng, tasks, cases, settings) for _ in range(count)]


def test_sample_rate_weights_the_tasks(data_dir):
    _, uniform = _draws(data_dir, EpisodeSettings())
    _, weighted = _draws(data_dir, EpisodeSettings(), weights=[8, 1, 1])
    assert 0.25 < Counter(e.task for e in uniform)[0] / 400 < 0.42
    assert Counter(e.task for e in weighted)[0] / 400 > 0.7


def test_datasets_choose_the_tasks_and_unknown_names_are_named(data_dir):
    tasks = select_tasks(find_datasets(data_dir), ["Dataset002", "Dataset001_SynBrainA:0"])
    assert [t.name for t in tasks] == ["Dataset002_SynBrainB:0", "Dataset001_SynBrainA:0"]
    with pytest.raises(DataError, match="'Dataset009' does not exist.*found: Dataset001_SynBrainA"):
        select_tasks(find_datasets(data_dir), ["Dataset009"])


def test_context_size_range_probability_and_background_pool(data_dir):
    _, fixed = _draws(data_dir, EpisodeSettings(context_size=3))
    assert {len(e.cases) for e in fixed} == {4}
    _, seed_range = _draws(data_dir, EpisodeSettings(context_size=3, random_context_range=(2, 9),
                                                     random_context_probability=1.0))
    assert {len(e.cases) - 1 for e in seed_range} == set(range(2, 10))
    _, original = _draws(data_dir, EpisodeSettings(context_size=3, random_context_range=(1, 8),
                                                   random_context_probability=0.5))
    share_fixed = sum(len(e.cases) == 4 for e in original) / len(original)
    assert 0.45 < share_fixed < 0.65  # 0.5 + 0.5/8
    assert any(0 in e.classes for e in fixed)
    _, no_background = _draws(data_dir, EpisodeSettings(background_in_pool=False))
    assert not any(0 in e.classes for e in no_background)
    assert max(len(e.classes) for e in _draws(data_dir, EpisodeSettings(max_classes=1))[1]) == 1


def test_split_is_the_last_tenth_in_name_order():
    assert split_cases([f"c{i:02d}" for i in range(20)], 0.1) == (
        [f"c{i:02d}" for i in range(18)], ["c18", "c19"])
    assert split_cases(["a", "b", "c"], 0.1) == (["a", "b"], ["c"])


PROBABILITIES = [n for n in AUGMENTATION_FIELDS if n not in ("enabled", "volume_rotate90_datasets")]


def _episode_volumes():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, *SIZE, generator=g)
    labels = torch.zeros(3, *SIZE)
    labels[:, 4:9, 3:12, 5:10] = 1
    return images, labels


def _all_off(**changes):
    return AugmentationSettings(**{**{n: 0.0 for n in PROBABILITIES}, **changes})


@pytest.mark.parametrize("name", PROBABILITIES)
def test_every_augmentation_probability_has_its_effect(name):
    images, labels = _episode_volumes()
    off = _all_off(volume_rotate90_datasets=None)
    same_images, same_labels = EpisodeAugmentation(off)(images, labels, seed=1)
    torch.testing.assert_close(same_images, images)
    torch.testing.assert_close(same_labels, labels)
    on = replace(off, **{name: 1.0})
    new_images, new_labels = EpisodeAugmentation(on)(images, labels, seed=1)
    assert not (torch.equal(new_images, images) and torch.equal(new_labels, labels))
    assert build_augmentation({"enabled": False, **vars(on)}) is None


def test_gin_remaps_intensities_non_linearly_and_keeps_labels():
    images, labels = _episode_volumes()
    new_images, new_labels = EpisodeAugmentation(_all_off(gin=1.0))(images, labels, seed=4)
    assert torch.equal(new_labels, labels)
    # Not an affine map of the input (a voxel-wise linear fit leaves a residual) ...
    x, y = images.flatten(), new_images.flatten()
    design = torch.stack([x, torch.ones_like(x)], 1)
    fit = torch.linalg.lstsq(design, y[:, None]).solution
    assert (design @ fit - y[:, None]).abs().mean() > 1e-3 * y.abs().mean()
    # ... each volume keeps its norm, and the same seed gives the same remapping.
    torch.testing.assert_close(new_images.flatten(1).norm(dim=1), images.flatten(1).norm(dim=1))
    again, _ = EpisodeAugmentation(_all_off(gin=1.0))(images, labels, seed=4)
    torch.testing.assert_close(again, new_images)


def test_volume_rotations_turn_each_volume_alone_in_the_datasets_named():
    images, labels = _episode_volumes()
    settings = _all_off(volume_rotate90=1.0)  # default datasets: names with "_syn_type"
    augment = EpisodeAugmentation(settings)
    same_images, same_labels = augment(images, labels, seed=2, dataset="Dataset001_SynBrainA")
    assert torch.equal(same_images, images) and torch.equal(same_labels, labels)
    new_images, new_labels = augment(images, labels, seed=2, dataset="Dataset987_syn_type")
    for i in range(3):  # each volume is some 90-degree rotation of itself, image with label
        turns = [(k, axes) for k in (1, 2, 3) for axes in ((0, 1), (0, 2), (1, 2))
                 if torch.equal(torch.rot90(images[i], k, axes), new_images[i])]
        assert turns, f"volume {i} is not a 90-degree rotation of itself"
        k, axes = turns[0]
        assert torch.equal(torch.rot90(labels[i], k, axes), new_labels[i])
    every = EpisodeAugmentation(replace(settings, volume_rotate90_datasets=None))
    assert not torch.equal(every(images, labels, seed=2, dataset="X")[0], images)
    with pytest.raises(ValueError, match="gin must be a probability"):
        AugmentationSettings(gin=2.0)


def test_keep_rate_keeps_the_first_training_cases(data_dir):
    def train_cases(keep_rate):
        data = nv.open_episode_data(data_dir, image_size=SIZE, settings=EpisodeSettings(),
                                    datasets=["Dataset001"], episodes=40, val_episodes=1,
                                    val_fraction=0.25, keep_rate=keep_rate)
        drawn = {c for e in data["train"].plan for c in e.cases}
        return data["statistics"], drawn, data["val"].cases
    full, drawn_full, val_full = train_cases(1.0)
    half, drawn_half, val_half = train_cases(0.5)
    assert full["train_cases"] == {"Dataset001_SynBrainA": 3}
    assert half["train_cases"] == {"Dataset001_SynBrainA": 2}
    assert drawn_half == {"case_000", "case_001"} < drawn_full
    assert val_half == val_full
    with pytest.raises(ValueError, match="keep_rate must be in"):
        train_cases(0.0)


def test_loss_values():
    loss = SmoothL3L1Loss()
    total, terms = loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
    expected = (0.5 ** 3 / 3 + (3 - 2 / 3)) / 2
    assert float(terms["smooth_l3_l1"]) == pytest.approx(expected)
    assert float(total) == pytest.approx(50 * expected)


def _tiny():
    torch.manual_seed(0)
    return Neuroverse3D(channels=[4, 8, 16])


def test_lightning_layout_loads_safely(tmp_path):
    net = _tiny()
    path = tmp_path / "neuroverse3D.ckpt"
    torch.save({"epoch": 7, "global_step": 700, "pytorch-lightning_version": "2.1.0",
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": argparse.Namespace(nb_inner_channels=[4, 8, 16], lr=1e-5,
                                                       context_size=3),
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}],
                "lr_schedulers": [{"mode": "min", "factor": 0.5}]}, path)
    loaded = nv.model_from_checkpoint(path, default_channels=[32, 64, 128, 256, 512])
    assert loaded.channels == [4, 8, 16]
    x = torch.rand(1, 1, *SIZE)
    ctx = torch.rand(1, 2, 1, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x, ctx, ctx), net.eval()(x, ctx, ctx))
    other = Neuroverse3D(channels=[4, 8, 8])
    with pytest.raises(DataError, match="trained with channels \\[4, 8, 16\\], this model has \\[4, 8, 8\\]"):
        nv.load_weights(other, path)


class Payload:  # a pickled class: the safe loader refuses it
    pass


def test_foreign_objects_and_other_architectures_are_refused(tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, evil)
    with pytest.raises(DataError, match="could not be read safely"):
        nv.read_weights(evil)
    plain = tmp_path / "plain.pth"
    torch.save({"model": Neuroverse3D(channels=[4, 8]).state_dict()}, plain)
    with pytest.raises(DataError, match="does not fit a Neuroverse3D with channels \\[4, 8, 16\\]"):
        nv.load_weights(_tiny(), plain)


def test_context_size_curve_and_predict_with_multi_class_context(data_dir, tmp_path):

    from medseg.data.nnunet import NnunetDataset

    net = _tiny().eval()
    cases = nv.open_evaluation_data(data_dir, image_size=SIZE, eval_datasets=["Dataset003"],
                                    trained_on=["Dataset001", "Dataset002"])
    curve = nv.context_size_curve(net, cases, [1, 2], episodes=3, gs=1, device=torch.device("cpu"))
    assert set(curve["summary"]) == {"dice_context_1", "dice_context_2", "all_structures_dice"}
    assert len(curve["cases"]) == 3 and curve["cases"][0]["dataset"] == "Dataset003_HeldOut"
    context = NnunetDataset.open(data_dir / "Dataset003_HeldOut")
    calls = []
    original = net.forward
    net.forward = lambda *a, **k: calls.append(a[2].sum()) or original(*a, **k)
    result = nv.predict_case(net, context.image_path("case_000"), context, size=SIZE, max_context=2,
                             gs=1, device=torch.device("cpu"), output=tmp_path / "p.nii.gz")
    assert len(calls) == len(result["labels"]) >= 2  # one forward per label value
    written, source = nib.load(result["output"]), nib.load(context.image_path("case_000"))
    assert written.shape == source.shape == (16, 20, 16)
    np.testing.assert_allclose(written.affine, source.affine)


def test_structure_radius_sets_the_size_of_the_generated_structures(tmp_path):
    from medseg.data.synthetic.neuroverse3d import _structure_specs, synthetic_case

    def foreground(radius):
        rng = np.random.default_rng(0)
        specs = _structure_specs(rng, 2, held_out=False, radius=radius)
        return float((synthetic_case(rng, (16, 16, 16), specs, 0.0)[1] > 0).mean())
    assert foreground((0.3, 0.32)) > 3 * foreground((0.12, 0.14))
    with pytest.raises(ValueError, match="structure_radius must be"):
        generate_neuroverse3d_data(tmp_path / "x", structure_radius=(0.3, 0.1))


def test_structures_of_a_dataset_are_told_apart_by_intensity(tmp_path):
    """Which structure a context asks for must be knowable: within every generated dataset
    the structures' intensities (measured in the written images, before the bias field and
    noise are undone) differ from one another and from the brain around them."""
    generate_neuroverse3d_data(tmp_path / "raw", num_datasets=3, cases_per_dataset=2,
                               volume_shape=(24, 24, 24), structures=4, noise_std=0.0,
                               structure_radius=(0.25, 0.3), seed=5)
    for folder in sorted((tmp_path / "raw").iterdir()):
        image = nib.load(folder / "case_000_img.nii.gz").get_fdata() / 1000
        labels = np.asarray(nib.load(folder / "case_000_gt.nii.gz").dataobj)
        centre = np.zeros(labels.shape, bool)
        centre[tuple(slice(s // 2 - 3, s // 2 + 3) for s in labels.shape)] = True
        means = [np.median(image[labels == v]) for v in range(1, 5) if (labels == v).any()]
        brain = np.median(image[(labels == 0) & centre])
        assert len(means) == 4, folder.name
        gaps = np.diff(np.sort(means))
        assert gaps.min() > 0.1, (folder.name, means)  # 0.22 apart, less the +-15 % bias field
        assert min(abs(m - brain) for m in means) > 0.05, (folder.name, means, brain)
