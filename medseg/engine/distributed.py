"""Training across processes started by ``torchrun`` (DistributedDataParallel).

``torchrun`` starts one process per device and tells each its place in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). This module reads that, joins the processes in a process group (NCCL for
CUDA tensors with gloo beside it for CPU ones, gloo alone on CPU) with a timeout on every
collective, gives each rank its device, and offers the few collectives the trainer needs:
sums across ranks, one object from rank 0, every rank's object.

A rank that hangs (a stuck loader, a deadlocked device) does not leave the others waiting
for ever: their collective fails after the timeout, and :func:`silent_ranks` then asks every
rank to answer a monitored barrier (torch's ``monitored_barrier``, on a gloo group of its
own, since the main group may be left broken by the failed collective), which names the
ranks that do not.

Before the process group exists (while the command line and the config are read) the ranks
already share one thing: the key-value store torchrun's rendezvous runs (``MASTER_ADDR``:
``MASTER_PORT``). Through it rank 0 hands its random seed to the others, and a rank that
fails leaves its error there, so that rank 0 (stopped by torchrun a moment later, or by a
broken collective) records the run FAILED with that rank's error instead of an interruption.

Without torchrun every function here answers for one process: rank 0 of 1.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

BACKENDS = ("auto", "nccl", "gloo")
#: Seconds a collective (or the store) waits for the other ranks before it fails, until
#: :func:`setup` is given another (torch's own default for gloo, and NCCL's with its watchdog).
DEFAULT_TIMEOUT_S = 1800.0
#: The longest wait for the ranks to answer :func:`silent_ranks`.
MONITOR_WAIT_S = 60.0
_STORE_PREFIX = "medseg"
_FAILURE_KEY = "failure"


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def launch() -> Launch | None:
    """This process's place in a torchrun job; None when it was not started by one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return Launch(rank=int(os.environ["RANK"]), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        return dist.get_rank()
    started = launch()
    return started.rank if started else 0


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    started = launch()
    return started.world_size if started else 1


def is_main() -> bool:
    """Whether this process records the run: global rank 0 (or no torchrun at all)."""
    return rank() == 0


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def check_launch(device: torch.device, backend: str = "auto", *,
                 started: Launch | None = None) -> None:
    """Refuse a job that cannot work: NCCL without CUDA, more processes on a node than it
    has GPUs, or one named GPU for several processes."""
    started = started or launch()
    if started is None:
        return
    if resolve_backend(backend, device) == "nccl" and device.type != "cuda":
        raise ValueError("backend='nccl' needs CUDA devices, but the device is "
                         f"{device.type!r}; use backend 'gloo' (or 'auto') on CPU")
    if device.type != "cuda":
        return
    available = torch.cuda.device_count()
    if started.local_world_size > available:
        raise ValueError(f"torchrun started {started.local_world_size} processes on this node "
                         f"but only {available} CUDA device(s) are visible; start at most "
                         f"{available} (--nproc_per_node={available}) or train on CPU")
    if device.index is not None and started.world_size > 1:
        raise ValueError(f"device {device} names one GPU for all {started.world_size} "
                         "processes; give 'cuda' (each rank takes the GPU of its LOCAL_RANK)")


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each rank's share of ``batch_size`` (the batch of one optimizer step across ranks)."""
    if batch_size < world:
        raise ValueError(f"batch_size {batch_size} is smaller than the {world} processes; "
                         "each needs at least one sample per batch")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {world} processes")
    return batch_size // world


def rank_device(device: torch.device, started: Launch | None = None) -> torch.device:
    """One device per rank: ``cuda`` becomes the GPU of this process's local rank."""
    started = started or launch()
    if started is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", started.local_rank)


# ---------------------------------------------------------------------------- the store
_store: Any = None
_seed_requests = 0
_timeout_s = DEFAULT_TIMEOUT_S
_monitor: Any = None  # the gloo group of silent_ranks()


def timeout_s() -> float:
    """The longest wait for another rank, in seconds: :func:`setup`'s ``timeout``
    (:data:`DEFAULT_TIMEOUT_S` before it is called)."""
    return _timeout_s


def store():
    """The job's key-value store (torchrun's own when its agent hosts one, else rank 0's)."""
    global _store
    if _store is None:
        started = launch()
        if started is None:
            raise RuntimeError("not started by torchrun: there is no store to join")
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        tcp = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                            int(os.environ["MASTER_PORT"]), started.world_size,
                            is_master=started.rank == 0 and not agent_hosts,
                            timeout=timedelta(seconds=timeout_s()), wait_for_workers=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _store = dist.PrefixStore(f"{_STORE_PREFIX}/{attempt}/", tcp)
    return _store


def shared_seed(draw) -> int:
    """``draw()`` on rank 0, the same value on every rank (each would draw its own)."""
    global _seed_requests
    started = launch()
    if started is None or started.world_size == 1:
        return int(draw())
    _seed_requests += 1
    key = f"seed/{_seed_requests}"
    if started.rank == 0:
        value = int(draw())
        store().set(key, str(value))
        return value
    return int(store().get(key).decode())


def report_failure(error: BaseException) -> None:
    """Leave this rank's error where rank 0 finds it (the first failure is kept)."""
    started = launch()
    if started is None or started.world_size == 1:
        return
    line = str(error).splitlines()[0] if str(error) else ""
    report(f"rank {started.rank} failed: {type(error).__name__}: {line}")


def report(message: str) -> None:
    """Leave ``message`` (why the job fails) where the other ranks find it with
    :func:`peer_failure`; the first one left is kept."""
    started = launch()
    if started is None or started.world_size == 1:
        return
    try:
        store().compare_set(_FAILURE_KEY, "", f"{started.rank}|{message}")
    except Exception:  # the store went with the job; nothing left to tell
        pass


def peer_failure(wait_s: float = 3.0) -> str | None:
    """The error another rank left in the store (:func:`report`), waiting up to ``wait_s``
    for it (the rank that broke a collective writes it just before it exits)."""
    started = launch()
    if started is None or started.world_size == 1:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store().check([_FAILURE_KEY]):
                reporter, _, message = store().get(_FAILURE_KEY).decode().partition("|")
                return None if reporter == str(started.rank) else message
        except Exception:  # the store is gone too: its host (rank 0 or the agent) ended
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


# ---------------------------------------------------------------------------- process group
def setup(device: torch.device, backend: str = "auto",
          timeout: float | None = None) -> torch.device:
    """Join the job's process group (once) and return this rank's device; without torchrun
    ``device`` unchanged. NCCL carries CUDA tensors, gloo the CPU ones beside it. Every
    collective (and the store) waits at most ``timeout`` seconds for the other ranks
    (:data:`DEFAULT_TIMEOUT_S` when None)."""
    global _timeout_s, _monitor
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    started = launch()
    if started is None:
        return device
    check_launch(device, backend, started=started)
    device = rank_device(device, started)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        if timeout is not None:
            _timeout_s = float(timeout)
        wait = timedelta(seconds=timeout_s())
        store().set_timeout(wait)
        name = resolve_backend(backend, device)
        dist.init_process_group("cpu:gloo,cuda:nccl" if name == "nccl" else "gloo",
                                store=store(), rank=started.rank,
                                world_size=started.world_size, timeout=wait)
        if started.world_size > 1:
            _monitor = dist.new_group(backend="gloo", timeout=wait)
    return device


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a collective (or the store) giving up waiting for another rank."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def silent_ranks(wait_s: float | None = None) -> list[int] | None:
    """The ranks that do not answer within ``wait_s`` seconds (the collective timeout, at
    most :data:`MONITOR_WAIT_S`, when None): ``[]`` when all do, None when it cannot be told
    (no process group). Every rank that can answers (each one whose collective timed out
    calls this); rank 0 hears from each of the others, and the others from rank 0 alone."""
    if _monitor is None or not is_initialized():
        return None
    wait = min(timeout_s(), MONITOR_WAIT_S) if wait_s is None else wait_s
    try:
        dist.monitored_barrier(group=_monitor, timeout=timedelta(seconds=wait),
                               wait_all_ranks=True)
    except Exception as error:  # gloo names the silent ranks in its message
        text = str(error)
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if missing:
            return [int(r) for r in re.findall(r"\d+", missing.group(1))]
        missing = re.search(r"send/recv from rank (\d+)", text)  # rank 0, seen by the others
        return [int(missing.group(1))] if missing else None
    return []


def backend_name() -> str | None:
    if not is_initialized():
        return None
    return "nccl" if "nccl" in str(dist.get_backend()) else str(dist.get_backend())


def shutdown() -> None:
    global _monitor, _timeout_s
    if is_initialized():
        dist.destroy_process_group()
    _monitor, _timeout_s = None, DEFAULT_TIMEOUT_S


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when a process group is up (else itself).
    """
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over every rank (``values`` itself on one)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return values
    summed = values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, so all validate one model."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


# ---------------------------------------------------------------------------- samplers
class RankShuffleSampler(Sampler[int]):
    """This rank's share of one shuffled order that every rank draws alike.

    Not :class:`~torch.utils.data.DistributedSampler`: that draws its order from
    ``seed + epoch``, so the batches of N ranks differ from one process's. Here the order is
    the one-process loader's (``randperm`` from the loader's generator, seeded per epoch) and
    rank ``r`` takes every ``world``-th index from ``r``, so one process's batch ``k`` is
    the union of the ranks' batches ``k`` (for a batch split evenly over the ranks): the same
    steps whatever the number of ranks, and a checkpoint resumes under another. As in
    DistributedSampler the order is padded with its first indices to a multiple of ``world``
    (every rank takes as many steps).
    """

    def __init__(self, size: int, generator: torch.Generator, rank: int, world: int) -> None:
        self.size, self.generator, self.rank, self.world = size, generator, rank, world

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator).tolist()
        padded = order + order[:len(self) * self.world - self.size]
        return iter(padded[self.rank::self.world])


def validation_indices(size: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The cases of this rank's validation batches: one process's batches (in order,
    ``batch_size`` each) dealt out in turn, unpadded, so every case is scored exactly once
    in the batch it has in one process."""
    batches = range(rank, -(-size // batch_size), world)
    return [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, size))]


def torchrun_hint(device: torch.device, argv: list[str], visible: int | None = None) -> str | None:
    """For one process (no torchrun) on CUDA with several GPUs visible: the line saying it
    uses one of them and the torchrun command that uses them all; None otherwise."""
    visible = torch.cuda.device_count() if visible is None else visible
    if launch() is not None or device.type != "cuda" or visible < 2:
        return None
    script, *rest = argv
    return (f"{visible} CUDA devices are visible and this single process trains on "
            f"{device}; to train on all of them start it with torchrun: torchrun --standalone "
            f"--nproc_per_node={visible} {' '.join([script, *rest])}")
