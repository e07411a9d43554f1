import pytest
import torch

from medseg.engine.schedulers import LRSchedule


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def run_epochs(schedule, epochs, steps, metric=lambda e: 1.0):
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps):
            schedule.optimizer.step()
            schedule.after_optimizer_step()
        lrs.append(schedule.current_lr())
        schedule.after_epoch(metric(epoch))
    return lrs


def test_warmup_rises_linearly_then_cosine_falls_to_min_lr():
    schedule = LRSchedule(optimizer(), "cosine_annealing", num_epochs=6, steps_per_epoch=4,
                          warmup_epochs=2, min_lr=0.1)
    assert schedule.current_lr() == pytest.approx(0.01)
    seen = []
    for _ in range(8):
        schedule.optimizer.step()
        schedule.after_optimizer_step()
        seen.append(schedule.current_lr())
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    lrs = []
    for _ in range(4):
        schedule.after_epoch(None)
        lrs.append(schedule.current_lr())
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.1)


def test_reduce_on_plateau_halves_after_patience():
    schedule = LRSchedule(optimizer(), "reduce_on_plateau", num_epochs=10, steps_per_epoch=1,
                          plateau_patience=1, plateau_factor=0.5, monitor_mode="min")
    lrs = run_epochs(schedule, 6, 1, metric=lambda e: 1.0)
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25])


def test_onecycle_peaks_at_max_lr_and_warmup_sets_its_rise():
    def peak_step(warmup):
        schedule = LRSchedule(optimizer(0.01), "onecycle", num_epochs=10, steps_per_epoch=10,
                              max_lr=0.5, warmup_epochs=warmup)
        lrs = []
        for _ in range(100):
            schedule.optimizer.step()
            schedule.after_optimizer_step()
            lrs.append(schedule.current_lr())
        assert max(lrs) == pytest.approx(0.5, rel=1e-2)
        return lrs.index(max(lrs))

    assert peak_step(2) < peak_step(5)


def test_state_dict_round_trip_continues_the_same_curve():
    a = LRSchedule(optimizer(), "cosine_annealing", num_epochs=8, steps_per_epoch=2, warmup_epochs=1)
    run_epochs(a, 3, 2)
    b = LRSchedule(optimizer(), "cosine_annealing", num_epochs=8, steps_per_epoch=2, warmup_epochs=1)
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    b.load_state_dict(a.state_dict())
    assert run_epochs(a, 3, 2) == pytest.approx(run_epochs(b, 3, 2))


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match=r"^name must be one of .*'cosine'"):
        LRSchedule(optimizer(), "cosine", num_epochs=1, steps_per_epoch=1)


def test_a_warmup_as_long_as_the_run_leaves_the_last_epoch_at_full_rate():
    """The seed's debug recipe: 5 epochs with the default 5-epoch warm-up."""
    schedule = LRSchedule(optimizer(), "cosine_annealing", num_epochs=5, steps_per_epoch=2,
                          warmup_epochs=5)
    lrs = run_epochs(schedule, 5, 2)
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] == pytest.approx(1.0)
    assert schedule.warmup_steps == 8
