import torch

from medseg.engine import memory
from medseg.engine.memory import MemoryMonitor, rss_mb, rss_peak_mb


def test_cpu_epochs_report_process_memory_only():
    monitor = MemoryMonitor(torch.device("cpu"))
    monitor.start_epoch()
    block = bytearray(64 * 2**20)  # touch 64 MB so the peak window sees it
    block[::4096] = b"x" * len(block[::4096])
    metrics = monitor.epoch_metrics()
    assert set(metrics) == {"rss_mb", "rss_peak_mb"}
    assert metrics["rss_peak_mb"] >= metrics["rss_mb"] - 1 and metrics["rss_mb"] > 64
    del block


def test_peak_window_resets_each_epoch():
    monitor = MemoryMonitor(torch.device("cpu"))
    monitor.start_epoch()
    block = bytearray(128 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    first = monitor.epoch_metrics()["rss_peak_mb"]
    del block
    monitor.start_epoch()
    second = monitor.epoch_metrics()["rss_peak_mb"]
    assert second < first - 64
    assert rss_peak_mb() >= rss_mb() - 1


def test_cuda_epochs_report_allocator_peaks_in_megabytes(monkeypatch):
    """The CUDA branch, with the allocator's counters stubbed (no GPU in CI)."""
    calls = []
    monkeypatch.setattr(memory.torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(d))
    monkeypatch.setattr(memory.torch.cuda, "max_memory_allocated", lambda d: 3 * 2**20)
    monkeypatch.setattr(memory.torch.cuda, "max_memory_reserved", lambda d: 5 * 2**20)
    monitor = MemoryMonitor(torch.device("cuda", 0))
    monitor.start_epoch()
    metrics = monitor.epoch_metrics()
    assert calls == [torch.device("cuda", 0)]
    assert metrics["gpu_mem_max_allocated_mb"] == 3 and metrics["gpu_mem_max_reserved_mb"] == 5


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_cleanups_in_a_window_collect_new_cycles_and_hand_back_what_they_froze():
    import gc
    import weakref

    from medseg.engine.memory import cleanup_memory, cleanup_window

    cpu = torch.device("cpu")
    with cleanup_window():
        cleanup_memory(cpu)
        assert gc.get_freeze_count() > 0  # the survivors are out of the next scan
        garbage = _Cycle()
        alive = weakref.ref(garbage)
        del garbage
        cleanup_memory(cpu)
        assert alive() is None  # a cycle made since the last cleanup is collected
    assert gc.get_freeze_count() == 0


def test_a_window_leaves_objects_frozen_by_others_alone():
    import gc

    from medseg.engine.memory import cleanup_memory, cleanup_window

    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with cleanup_window():
            cleanup_memory(torch.device("cpu"))
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
