"""The high-absence quality benchmark runs the documented recipe on `high_absence` data, and
its environment settings shorten it (the short run the README reports)."""

from __future__ import annotations

from benchmarks import bench_sadaan_quality, bench_sadaan_quality_absence


def test_by_default_it_trains_the_sadaan_quality_recipe_on_high_absence_data(monkeypatch):
    for name in ("SADAAN_QUALITY_EPOCHS", "SADAAN_QUALITY_SIZE", "SADAAN_QUALITY_TRAIN",
                 "SADAAN_QUALITY_EVAL"):
        monkeypatch.delenv(name, raising=False)
    generate, training = bench_sadaan_quality_absence.settings()
    assert generate == ["high_absence", "synthetic.image_size=[64,64,32]",
                        "synthetic.num_train=160", "synthetic.num_val=32", "synthetic.num_test=32"]
    assert sorted(training) == sorted(bench_sadaan_quality.TRAINING)


def test_environment_shortens_it(monkeypatch):
    monkeypatch.setenv("SADAAN_QUALITY_EPOCHS", "3")
    monkeypatch.setenv("SADAAN_QUALITY_SIZE", "32,32,16")
    monkeypatch.setenv("SADAAN_QUALITY_TRAIN", "12")
    monkeypatch.setenv("SADAAN_QUALITY_EVAL", "5")
    generate, training = bench_sadaan_quality_absence.settings()
    assert {"synthetic.num_train=12", "synthetic.image_size=[32,32,16]", "synthetic.num_val=5",
            "synthetic.num_test=5"} <= set(generate)
    assert {"training.num_epochs=3", "training.image_size=[32,32,16]"} <= set(training)
    assert not {"training.num_epochs=40", "training.image_size=[64,64,32]"} & set(training)


def test_per_structure_figures_keep_the_metrics_apart():
    test = {"dice": 0.8, "dice_present": 0.9, "dice_liver": 0.7, "dice_present_liver": 0.95,
            "presence_accuracy_liver": 1.0, "presence_balanced_accuracy_liver": 0.5}
    assert bench_sadaan_quality.per_structure(test, "dice", ("dice_present",)) == {"liver": 0.7}
    assert bench_sadaan_quality.per_structure(test, "dice_present") == {"liver": 0.95}
    assert bench_sadaan_quality.per_structure(test, "presence_accuracy") == {"liver": 1.0}


def test_the_balanced_variant_adds_only_the_absence_balance(monkeypatch):
    from benchmarks import bench_sadaan_quality_absence_balanced as balanced

    seen = {}
    monkeypatch.setattr(bench_sadaan_quality_absence, "train_and_score",
                        lambda generate, training: seen.update(generate=generate,
                                                               training=training) or {})
    try:
        balanced.run()
    except KeyError:
        pass  # the fake result has no test metrics; only the commands matter here
    plain_generate, plain_training = bench_sadaan_quality_absence.settings()
    assert seen["generate"] == plain_generate
    assert seen["training"] == [*plain_training, "loss_weights.absence_balance=True"]
