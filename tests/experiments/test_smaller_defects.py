"""Smaller defects, from the shell: no advice to load checkpoints unsafely, "did you mean"
hints that name the right entry, a checkpoint of another pipeline or a model entry that
differs from the checkpoint's named in one line, and checkpoints that also hold the names of
PyTorch's own resume recipe."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.tracking.support import REPO, SADAAN, TINY_SADAAN, environment

LUNG = REPO / "experiments" / "lung_tumor.py"


def shell(script, *arguments, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *arguments], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=600)


def refused(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sadaan_checkpoint(sadaan_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sadaan-checkpoint")
    done = shell(SADAAN, "with", f"dataset_path={sadaan_data}", *TINY_SADAAN,
                 "training.num_epochs=1", "tracking.observer=none", "checkpoint.save_dir=ck",
                 cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "ck" / "last_model.pth"


def test_the_hints_name_the_entry_meant(tmp_path):
    assert refused(shell(SADAAN, "with", "trainng.batch_size=2", cwd=tmp_path)) == (
        "error: unknown config entry trainng (did you mean training?); `print_config` lists "
        "them all")
    assert refused(shell(SADAAN, "with", "training={}", cwd=tmp_path)) == (
        "error: unknown config entry training (a group: set its entries, e.g. "
        "training.batch_size=...); `print_config` lists them all")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert refused(shell(SADAAN, "generate_data", "with", "dataset_path=taken",
                         cwd=tmp_path)) == (
        "error: taken already contains files; expected an empty or missing folder for the "
        "SADAAN dataset (set synthetic.overwrite=True to replace it)")


@pytest.mark.parametrize("script, entry, command", [
    (SADAAN, "synthetic.image_size=[128,128,64]", "generate_data"),
    (LUNG, "synthetic.noise_std=5.0", "generate_msd"),
])
def test_a_generator_setting_given_to_training_says_it_changes_nothing(tmp_path, script, entry,
                                                                       command):
    done = shell(script, "with", entry, "dataset_path=missing", cwd=tmp_path)
    key = entry.split("=")[0]
    assert f"{key} has no effect on training; it is a {command} setting" in done.stderr
    assert done.returncode != 0  # then the missing dataset stops it, as before


@pytest.mark.slow
def test_a_random_bytes_checkpoint_is_never_answered_with_weights_only_false(sadaan_data,
                                                                              tmp_path):
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 20)
    line = refused(shell(SADAAN, "evaluate", "with", f"dataset_path={sadaan_data}",
                         *TINY_SADAAN, "eval_checkpoint=random.pth", "tracking.observer=none",
                         cwd=tmp_path))
    assert line.startswith("error: checkpoint random.pth could not be read as a medseg "
                           "checkpoint (")
    assert "weights_only" not in line and "False" not in line


@pytest.mark.slow
def test_checkpoints_hold_the_seed_recipe_names(sadaan_checkpoint):
    state = torch.load(sadaan_checkpoint, weights_only=True)
    for name in state["model_state_dict"]:
        assert torch.equal(state["model_state_dict"][name], state["model"][name])
    assert state["optimizer_state_dict"]["param_groups"] == state["optimizer"]["param_groups"]
    # The seed's snippet, on a network and optimizer built as the run built them.
    sys.path.insert(0, str(REPO))
    from medseg.models.sadaan import SADAAN as Network

    net = Network(in_channels=1, num_structures=3, base_channels=4)
    net.load_state_dict(state["model_state_dict"])
    torch.optim.Adam(net.parameters()).load_state_dict(state["optimizer_state_dict"])


@pytest.mark.slow
def test_lung_predict_with_a_sadaan_checkpoint_or_another_model_is_named(sadaan_checkpoint,
                                                                         lung_checkpoint,
                                                                         tmp_path):
    image = next((lung_checkpoint / "dataset" / "images").iterdir())
    line = refused(shell(LUNG, "predict", "with", f"weights={sadaan_checkpoint}",
                         f"source={image}", "tracking.observer=none", cwd=tmp_path))
    assert line == (f"error: weights: checkpoint {sadaan_checkpoint} was written by another "
                    "pipeline: its model entries are base_channels, in_channels, "
                    "presence_threshold, this pipeline's architecture, channels, "
                    "deep_supervision, dropout")
    weights = lung_checkpoint / "ck" / "weights" / "best.pt"
    done = shell(LUNG, "predict", "with", f"weights={weights}", f"source={image}",
                 "model.channels=[8,16,32]", "predict_dir=out", "tracking.observer=none",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("WARNING - medseg - model.channels=[8, 16, 32] is replaced by the checkpoint's "
            f"[4, 8, 16]: the network is rebuilt as the checkpoint {weights} was trained"
            ) in done.stderr
