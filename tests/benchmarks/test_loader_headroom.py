"""``python -m benchmarks loader_headroom`` in its tiny mode: the pipeline's own training
loader and model are captured from its ``main`` and measured; and the GPU columns' arithmetic."""

from __future__ import annotations

import pytest

from benchmarks import bench_loader_headroom as bench


def test_tiny_mode_measures_the_lung_pipelines_own_loader_and_model(monkeypatch):
    monkeypatch.setenv("LOADER_HEADROOM_TINY", "1")
    monkeypatch.setenv("LOADER_HEADROOM_PIPELINES", "lung_tumor")
    result = bench.run()
    entry = result["pipelines"]["lung_tumor"]
    # The demo's batch of 8 from the tiny data's kept training slices.
    assert entry["batch_size"] == 8 and entry["training_samples"] > 8
    assert set(entry["loader_samples_per_s"]) == {"workers_0", "workers_2", "one_worker"}
    assert all(rate > 0 for rate in entry["loader_samples_per_s"].values())
    assert entry["consumed_samples_per_s_cpu"] > 0
    for key, rate in entry["loader_samples_per_s"].items():
        assert entry["headroom_cpu"][key] == pytest.approx(
            rate / entry["consumed_samples_per_s_cpu"], rel=0.06, abs=0.06)
    assert "gpu_estimate" not in result   # the seed-size timing is left out of the tiny mode


def test_sadaan_on_device_measures_a_loader_that_does_not_augment(monkeypatch):
    monkeypatch.setenv("LOADER_HEADROOM_TINY", "1")
    monkeypatch.setenv("LOADER_HEADROOM_PIPELINES", "sadaan_on_device")
    seen = []
    original = bench.capture

    def capture(pipeline, tmp, tiny):
        trainer = original(pipeline, tmp, tiny)
        seen.append(trainer.task.batch_augmentation)
        return trainer

    monkeypatch.setattr(bench, "capture", capture)
    entry = bench.run()["pipelines"]["sadaan_on_device"]
    assert seen and seen[0] is not None          # the training step augments on the device
    assert entry["consumed_samples_per_s_cpu"] > 0 and entry["batch_size"] == 2


def test_gpu_columns_scale_the_cpu_rate_and_count_workers_for_5x():
    columns = bench.gpu_estimate(2.0, {"workers_0": 30.0, "workers_2": 50.0}, speedup=10.0,
                                 batch_size=4)
    assert columns["consumed_samples_per_s_gpu_estimate"] == 20.0
    assert columns["headroom_gpu_estimate"] == {"workers_0": 1.5, "workers_2": 2.5}
    assert columns["workers_for_5x_gpu"] == 4   # 5 x 20 = 100 samples/s at 30 per worker
    assert bench.gpu_estimate(0.1, {"workers_0": 30.0}, speedup=1.0,
                              batch_size=4)["workers_for_5x_gpu"] == 1
    # A small network is not sped up past one step per 15 ms: batch 4 -> 267 samples/s.
    fast = bench.gpu_estimate(50.0, {"workers_0": 30.0}, speedup=100.0, batch_size=4)
    assert fast["consumed_samples_per_s_gpu_estimate"] == pytest.approx(4 / 0.015, abs=0.01)
    # Workers are counted from one worker's rate when it was measured: 5 x 20 / 50 = 2.
    assert bench.gpu_estimate(2.0, {"workers_0": 5.0, "one_worker": 50.0}, speedup=10.0,
                              batch_size=4)["workers_for_5x_gpu"] == 2


def test_one_worker_rate_runs_with_one_thread_over_enough_epochs_and_gives_the_threads_back():
    import torch

    seen = []

    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            seen.append(torch.get_num_threads())
            return {"x": torch.zeros(2)}

    before = torch.get_num_threads()
    torch.set_num_threads(2)   # as the benchmark's process runs (the tests pin one thread)
    try:
        loader = bench.EpochLoader(Threads(), batch_size=2, shuffle=True, num_workers=0, seed=0)
        assert bench.one_worker_rate(loader, batches=10) > 0
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert len(seen) == 20   # 10 batches of 2: two and a half epochs of 8 items
    finally:
        torch.set_num_threads(before)
