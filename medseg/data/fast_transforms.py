"""Cheaper ways to run MONAI training transforms that give the same samples.

Profiling the training loaders (``python -m benchmarks loader_headroom``) showed most of a
sample's time going into work whose result is thrown away:

- MONAI's metadata tracking: every transform wraps its output in a ``MetaTensor`` and records
  itself (affine updates, the applied-operations list), while the pipelines end with
  ``EnsureTyped(track_meta=False)``, which drops all of it. :class:`UntrackedCompose` runs the
  transforms with tracking off (MONAI's own switch, :func:`monai.data.set_track_meta`); the
  arrays and the random draws are unchanged.
- MONAI's elastic transforms, when their probability says "not this time", still resample
  every key through an identity grid (which returns the input unchanged) and, in 3D, smooth
  the random displacement field with a 3D convolution that is slow on a CPU.
  :class:`FastRand2DElasticd` and :class:`FastRand3DElasticd` draw exactly what MONAI's draw,
  skip the identity resampling, and smooth with SciPy's 1D correlation along each axis.
- Rotating each of SADAAN's binary structure masks separately with nearest neighbours:
  :class:`PackMasksd` folds them into one channel of bit flags first (nearest-neighbour
  sampling moves all channels alike, so the bits travel together), :class:`UnpackMasksd`
  unfolds them after the spatial transforms.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.data import get_track_meta, set_track_meta
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import Compose, MapTransform, Rand2DElasticd, Rand3DElasticd
from monai.transforms.utils import create_grid
from monai.utils import convert_to_tensor, fall_back_tuple
from scipy.ndimage import correlate1d

_state = threading.Condition()
# Per thread: how many untracked blocks (tracking is off while any runs) and tracked heads (they
# need it on) it is inside. A thread waits only for the others: its own nesting is its own.
_untracked_by: collections.Counter[int] = collections.Counter()
_tracked_by: collections.Counter[int] = collections.Counter()
_saved = True


def _others(counts: collections.Counter[int]) -> int:
    me = threading.get_ident()
    return sum(n for thread, n in counts.items() if thread != me)


def _leave(counts: collections.Counter[int], me: int) -> None:
    counts[me] -= 1
    if not counts[me]:
        del counts[me]


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """MONAI's metadata tracking off for the block, restored after it.

    The switch is process-wide: a count restores it once the last of several nested (or
    concurrent, e.g. ``CacheDataset``'s caching threads) blocks ends, and a block waits while
    another thread runs a :func:`tracked` head (which reads the metadata). Inside this
    thread's own tracked head (an ``UntrackedCompose`` nested in another's head) it does not
    wait: no other thread's block can be running then.
    """
    global _saved
    me = threading.get_ident()
    with _state:
        _state.wait_for(lambda: _others(_tracked_by) == 0)
        if not _untracked_by:
            _saved = get_track_meta()
            set_track_meta(False)
        _untracked_by[me] += 1
    try:
        yield
    finally:
        with _state:
            _leave(_untracked_by, me)
            if not _untracked_by:
                set_track_meta(_saved)
                _state.notify_all()


@contextlib.contextmanager
def tracked() -> Iterator[None]:
    """Wait until no other thread runs an :func:`untracked` block, and keep new ones out during
    the block: transforms that read the metadata (``LoadImaged``, ``EnsureChannelFirstd``) must
    not run while another thread has tracking off (found: a ``CacheDataset`` thread's
    ``EnsureChannelFirstd`` failed for want of metadata).

    A head inside this thread's own untracked block would need tracking back on while other
    threads may rely on it being off, and two such threads would wait for each other for
    ever: that is refused with an error instead.
    """
    me = threading.get_ident()
    with _state:
        if _untracked_by[me]:
            raise RuntimeError("a tracked transform head cannot run inside an untracked block "
                               "of the same thread: put the metadata-reading transforms first")
        _state.wait_for(lambda: _others(_untracked_by) == 0)
        _tracked_by[me] += 1
    try:
        yield
    finally:
        with _state:
            _leave(_tracked_by, me)
            if not _tracked_by:
                _state.notify_all()


class UntrackedCompose(Compose):
    """A ``Compose`` whose transforms from index ``tracked_head`` on run without MONAI's
    metadata tracking (see :func:`untracked`): they return plain tensors, not ``MetaTensor``.

    The first ``tracked_head`` transforms run as configured: those that read the metadata
    (``LoadImaged``, ``Orientationd``, ``Spacingd`` use the affine) belong there. The
    transforms and their random states are those of a plain ``Compose`` of the same list, so
    a seed draws the same samples.
    """

    def __init__(self, transforms: Sequence | None = None, *, tracked_head: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(transforms, **kwargs)
        if tracked_head < 0:
            raise ValueError(f"tracked_head must be >= 0, got {tracked_head}")
        self.tracked_head = tracked_head

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        end = len(self.transforms) if end is None else end
        split = min(max(self.tracked_head, start), end)
        if split > start:
            with tracked():
                input_ = super().__call__(input_, start=start, end=split, threading=threading,
                                          lazy=lazy)
        if end > split:
            with untracked():
                input_ = super().__call__(input_, start=split, end=end, threading=threading,
                                          lazy=lazy)
        return input_


def prepend(transform: Compose | None, steps: Sequence) -> Compose:
    """``steps`` followed by ``transform``'s transforms, as the same kind of ``Compose`` (an
    :class:`UntrackedCompose` keeps its tracked head, now counted after ``steps``)."""
    transforms = [*steps, *(transform.transforms if transform is not None else [])]
    if isinstance(transform, UntrackedCompose):
        head = transform.tracked_head + len(steps) if transform.tracked_head else 0
        return UntrackedCompose(transforms, tracked_head=head)
    return Compose(transforms)


def _unchanged(d: dict, transform: MapTransform) -> dict:
    # What MONAI's identity resampling returns: the input, as a float32 tensor (``Resample``
    # returns float32 whatever it computes in).
    for key in transform.key_iterator(d):
        d[key] = convert_to_tensor(d[key], dtype=torch.float32, track_meta=get_track_meta())
    return d


class FastRand2DElasticd(Rand2DElasticd):
    """MONAI's ``Rand2DElasticd`` (same arguments, same random draws, same results) that
    leaves the keys as they are when the transform is not applied, instead of resampling
    them through an identity grid (measured: 80 % of its time at probability 0.2)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return super().__call__(data)
        state = self.R.get_state()
        self.randomize(None)
        if self._do_transform:
            self.R.set_state(state)   # MONAI's call draws it again
            return super().__call__(data)
        size = fall_back_tuple(self.rand_2d_elastic.spatial_size, d[first].shape[1:])
        self.rand_2d_elastic.randomize(size)   # drawn by MONAI whether applied or not
        return _unchanged(d, self)


def smooth(field: torch.Tensor, sigma: Sequence[float] | float, truncated: float) -> torch.Tensor:
    """MONAI's ``GaussianFilter(spatial_dims, sigma, truncated)`` (the ``erf`` kernel, zero
    padding) of ``field`` [B, C, *spatial], as SciPy's 1D correlation along each spatial axis
    in turn with MONAI's kernel: the same sums (up to float rounding), measured 15-30x faster
    on a CPU than MONAI's 3D convolutions with [k, 1, 1] kernels (and 3x faster than
    PyTorch's ``conv1d`` over the lines)."""
    dims = field.ndim - 2
    sigmas = [float(s) for s in sigma] if isinstance(sigma, Sequence) else [float(sigma)] * dims
    out = field.detach().cpu().numpy()
    for axis, s in enumerate(sigmas):
        kernel = gaussian_1d(torch.tensor(s), truncated=truncated, approx="erf").numpy()
        out = correlate1d(out, kernel, axis=axis + 2, mode="constant", cval=0.0)
    return torch.from_numpy(out).to(field)


class FastRand3DElasticd(Rand3DElasticd):
    """MONAI's ``Rand3DElasticd`` (same arguments, same random draws) that leaves the keys as
    they are when not applied (MONAI resamples them through an identity grid) and smooths the
    random offsets with :func:`smooth` instead of MONAI's 3D convolutions (measured: 70-160 ms
    of a 48 x 48 x 16 crop, against about 5 ms). The displacement field equals MONAI's up to
    float rounding (about 1e-8 of a voxel before the magnitude)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return super().__call__(data)
        elastic = self.rand_3d_elastic
        # MONAI's sequence of draws and steps, with the two changes above.
        self.randomize(None)
        size = fall_back_tuple(elastic.spatial_size, d[first].shape[1:])
        elastic.randomize(size)
        if not self._do_transform:
            return _unchanged(d, self)
        device = elastic.device
        if device is None and isinstance(d[first], torch.Tensor):
            device = d[first].device
            elastic.set_device(device)
        grid = create_grid(spatial_size=size, device=device, backend="torch")
        offset = torch.as_tensor(elastic.rand_offset, device=device).unsqueeze(0)
        grid[:3] += smooth(offset, elastic.sigma, truncated=3.0)[0] * elastic.magnitude
        grid = elastic.rand_affine_grid(grid=grid)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = elastic.resampler(d[key], grid, mode=mode, padding_mode=padding_mode)
        return d


#: float32 holds integers exactly up to 2 ** 24: that many masks fit in one channel.
MAX_PACKED_MASKS = 24
#: The key PackMasksd records its channel counts under (for a pipeline that keeps them packed).
PACKED_CHANNELS_KEY = "_packed_mask_channels"


class PackMasksd(MapTransform):
    """Binary masks [S, *spatial] (values 0 and 1) folded into one float channel
    [1, *spatial] holding ``sum(mask[s] * 2 ** s)``; :class:`UnpackMasksd` unfolds them.

    Between the two, nearest-neighbour resampling, flips and rotations of the one channel give
    exactly what they give each mask (every channel is sampled at the same place), at the cost
    of one channel. Interpolating (bilinear) the packed channel would mix the bits: only
    nearest-neighbour spatial transforms may run on it. Masks of more than
    :data:`MAX_PACKED_MASKS` structures, or holding values other than 0 and 1, are left as
    they are (and then move channel by channel, as without packing).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = torch.as_tensor(d[key])
            count = int(masks.shape[0])
            if count > MAX_PACKED_MASKS:
                continue
            weights = 2.0 ** torch.arange(count, dtype=torch.float32)
            # A matrix-vector product (BLAS): every partial sum is an integer below 2 ** 24,
            # exact in float32 in any order; measured 4x faster than multiply-then-sum.
            flat = masks.to(torch.float32).reshape(count, -1)
            if not _binary(flat):
                continue
            d[key] = (weights @ flat).reshape(1, *masks.shape[1:])
            d.setdefault(PACKED_CHANNELS_KEY, {})[key] = count
        return d


def _binary(flat: torch.Tensor) -> bool:
    """Whether every value of ``flat`` [S, N] is 0 or 1, by reductions (an elementwise test
    cost 15x the packing): values in [0, 1] are 0 or 1 exactly when each row's sum equals its
    sum of squares (v - v * v > 0 between 0 and 1). A departure below the sums' rounding
    (about 1e-7 of a row's count) would go unseen; the format's data checks catch those."""
    low, high = torch.aminmax(flat)
    if low < 0 or high > 1:
        return False
    squares = torch.stack([torch.dot(row, row) for row in flat])   # measured 8x faster than bmm
    return bool(torch.equal(flat.sum(1), squares))


class UnpackMasksd(MapTransform):
    """The masks :class:`PackMasksd` folded, unfolded into float32 [S, *spatial] of 0 and 1."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        counts = d.pop(PACKED_CHANNELS_KEY, {})
        for key in self.key_iterator(d):
            if key in counts:
                d[key] = unpack_masks(torch.as_tensor(d[key]), counts[key], channel_dim=0)
        return d


def unpack_masks(packed: torch.Tensor, count: int, channel_dim: int) -> torch.Tensor:
    """The ``count`` masks folded by :class:`PackMasksd` into the one channel at
    ``channel_dim`` of ``packed``, unfolded there as float32 0 and 1 (a sample [1, ...] or a
    batch [B, 1, ...] alike)."""
    # int32 holds the 24 bits; shifting int64 was measured 6x slower.
    whole = packed.round().to(torch.int32)
    shape = [1] * whole.ndim
    shape[channel_dim] = count
    bits = torch.arange(count, dtype=torch.int32, device=whole.device).view(shape)
    return ((whole >> bits) & 1).to(torch.float32)
