"""Training under ``torchrun``: the config entries of the process group (backend, timeout), the
checks that refuse a job that cannot work (in config keys, before a run is recorded), and
the Sacred side of a job of several processes: one seed for all, observers on rank 0 only,
and a rank's failure recorded as the run's.

The engine side (process group, sharded batches, reductions) is
:mod:`medseg.engine.distributed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ingredients.fields import Field
from medseg import config as c
from medseg.engine import distributed
from medseg.errors import ConfigError, MedsegError

FIELDS = {
    "distributed_backend": Field(
        "auto", c.choice(*distributed.BACKENDS),
        "Process group under torchrun: 'auto' (NCCL on CUDA, gloo on CPU), 'nccl', 'gloo'",
        resume_may_change=True),
    "distributed_timeout": Field(
        int(distributed.DEFAULT_TIMEOUT_S), c.number(above=0),
        "Seconds a process under torchrun waits for the others in a collective before the run "
        "fails, naming the process that stopped answering",
        resume_may_change=True),
}

#: Where the timeout is set: each pipeline's training group.
TIMEOUT_KEY = "training.distributed_timeout"


class RankFailed(MedsegError):
    """Another rank of the job failed; its error is the message."""


def check_launch(device: torch.device, backend: str, batch_size: int, *, path: str = "training",
                 batch_key: str | None = None) -> None:
    """The job torchrun started fits the devices and the batch (config keys in the line)."""
    started = distributed.launch()
    if started is None:
        return
    batch_key = batch_key or f"{path}.batch_size"
    if distributed.resolve_backend(backend, device) == "nccl" and device.type != "cuda":
        raise ConfigError(f"{path}.distributed_backend='nccl' needs CUDA devices, but "
                          f"{path}.device is {device.type!r}; use 'gloo' (or 'auto') on CPU")
    try:
        distributed.check_launch(device, backend, started=started)
    except ValueError as error:
        raise ConfigError(f"{path}.device={str(device)!r}: {error}") from None
    try:
        distributed.per_rank_batch(batch_size, started.world_size)
    except ValueError:
        raise ConfigError(f"{batch_key}={batch_size} is the batch of one step across all "
                          f"{started.world_size} processes torchrun started and must be a "
                          f"multiple of {started.world_size} (at least one sample per "
                          "process)") from None


def check_training(config: Mapping[str, Any], path: str, device: torch.device) -> None:
    training = config[path]
    check_launch(device, training.get("distributed_backend", "auto"), training["batch_size"],
                 path=path)


def agreed_seed(seed: int) -> int | None:
    """Rank 0's seed when it is not ``seed``, this rank's (None without torchrun, or when the
    ranks already agree). Each process resolves its config first, so a seed that a config
    file or named config sets is the same everywhere; only a seed Sacred drew differs, one
    per process, and then rank 0's is the job's."""
    if distributed.launch() is None or distributed.world_size() == 1:
        return None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"RANK and WORLD_SIZE are set (a job of {distributed.world_size()} "
                          f"processes) but {' and '.join(missing)} not: start the job with "
                          "torchrun, which sets them all")
    shared = distributed.shared_seed(lambda: seed)
    return None if shared == seed else shared


def drop_observers(run) -> None:
    """Only rank 0 records: the others' runs have no observer (``-F``/``-m`` included), and
    log warnings and errors only (the terminal shows rank 0's progress once, not N times)."""
    if not distributed.is_main():
        run.observers = []
        run.unobserved = True
        for logger in (run.run_logger, logging.getLogger("medseg")):
            logger.setLevel(logging.WARNING)


def recording_failures(function):
    """``function`` (a run's main function) leaving its error for the other ranks, and on
    rank 0 raising the error of a rank that failed first when this one was stopped for it
    (torchrun's SIGTERM, or a collective the failed rank left). A collective that timed out
    (a rank hangs, ``training.distributed_timeout``) ends the run with the line naming the
    ranks that no longer answer."""
    import functools

    @functools.wraps(function)
    def main(*args):
        try:
            result = function(*args)
        except BaseException as error:
            if distributed.launch() is None or distributed.world_size() == 1:
                raise
            # Stopped because another rank went (torchrun's SIGTERM, a broken collective):
            # that rank writes its error just before it exits, so wait for it a moment.
            caused = _caused_by_peer(error)
            peer = distributed.peer_failure(wait_s=3.0 if caused else 0.0)
            if peer is None and caused and distributed.timed_out(error):
                peer = _stopped_answering()
                if peer is not None:  # for rank 0, when another rank found it silent
                    distributed.report(peer)
            if peer is not None:
                raise RankFailed(peer) from error
            if not isinstance(error, KeyboardInterrupt):  # Ctrl-C stops every rank alike
                distributed.report_failure(error)
            raise
        # Every collective of the run is done: the process group ends with it (NCCL warns
        # at exit, and may hang there, when it is left up).
        distributed.shutdown()
        return result

    return main


def _stopped_answering() -> str | None:
    """The line naming the ranks that did not answer, after a collective timed out."""
    silent = distributed.silent_ranks()
    if not silent:
        return None
    who = (f"rank {silent[0]}" if len(silent) == 1
           else f"ranks {', '.join(map(str, silent))}")
    return (f"{who} stopped answering: no reply to a collective within "
            f"{distributed.timeout_s():g} s ({TIMEOUT_KEY}); the job is ended")


def _caused_by_peer(error: BaseException) -> bool:
    return (isinstance(error, (KeyboardInterrupt, torch.distributed.DistError))
            or "gloo" in str(error).lower() or "nccl" in str(error).lower())
