"""Grid helpers shared by the lung and lesion steps: block-wise down- and upsampling of (z, y, x) volumes,
and the bounding box of a mask.

In: a volume (or mask) and integer block ``factors`` per axis; out: the coarse volume, or a coarse volume
brought back to the full grid by nearest-neighbour repetition.
"""

from __future__ import annotations

import numpy as np


def bounding_box(volume: np.ndarray) -> tuple[slice, ...] | None:
    """The box of a 2D or 3D array's nonzero elements, from max projections (``ndi.find_objects`` is slow
    on full volumes; the other axes are projected within the first axis's extent only); None when all are
    zero."""
    first = np.flatnonzero(volume.reshape(volume.shape[0], -1).max(axis=1))
    if first.size == 0:
        return None
    rest = volume[first[0]: first[-1] + 1].max(axis=0)
    others = [np.flatnonzero(rest.max(axis=tuple(a for a in range(rest.ndim) if a != axis)))
              for axis in range(rest.ndim)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in [first, *others])


def coarse_factors(spacing_mm: tuple[float, float, float], target_mm: float = 2.5) -> tuple[int, int, int]:
    """Integer stride per axis (z, y, x) that brings voxels close to ``target_mm``."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing_mm)


def block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Downsample a volume by the mean of whole blocks of ``factors`` (float32).

    Trailing voxels that do not fill a whole block are dropped.
    """
    crop = tuple(n - n % f for n, f in zip(volume.shape, factors))
    blocks = volume[: crop[0], : crop[1], : crop[2]].reshape(
        crop[0] // factors[0], factors[0], crop[1] // factors[1], factors[1], crop[2] // factors[2], factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def block_mean_edge(volume: np.ndarray, factors: tuple[int, int, int], slab_blocks: int = 8) -> np.ndarray:
    """Block means of an integer or boolean volume (float32), a trailing partial block padded with its edge voxel.

    The same values, to the bit, as ``block_mean(np.pad(volume, pad, mode="edge"), factors)`` with the pad that
    completes the last block, without the padded copy, while block sums stay below 2**24 in magnitude (blocks of
    up to 512 voxels of 16-bit values; there numpy's float32 sum is exact too): sums are taken in int32, axis by
    axis with strided adds, and divided as numpy's mean divides. Works in slabs of ``slab_blocks`` blocks along
    axis 0, so that the temporaries stay small.
    """
    if not (np.issubdtype(volume.dtype, np.integer) or volume.dtype == bool) or volume.dtype.itemsize > 2:
        raise TypeError(f"block_mean_edge needs an integer volume of at most 16 bits, not {volume.dtype}")
    shape = tuple(-(-n // f) for n, f in zip(volume.shape, factors))
    out = np.empty(shape, dtype=np.float32)
    slab = slab_blocks * factors[0]
    for b0 in range(0, shape[0], slab_blocks):
        total = volume[b0 * factors[0]: b0 * factors[0] + slab]
        for axis, f in enumerate(factors):
            total = _block_sum_axis(total, f, axis)
        out[b0: b0 + slab_blocks] = total
    return np.true_divide(out, np.intp(np.prod(factors)), out=out, casting="unsafe")


def _block_sum_axis(volume: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """int32 sums of ``factor`` neighbours along ``axis``; a trailing partial block repeats its edge voxel."""
    n = volume.shape[axis]
    n_blocks = -(-n // factor)
    summed = None
    for k in range(factor):
        part = volume[(slice(None),) * axis + (slice(k, None, factor),)]
        if part.shape[axis] < n_blocks:
            edge = volume[(slice(None),) * axis + (slice(n - 1, n),)]
            part = np.concatenate([part, edge], axis=axis)
        if summed is None:
            summed = part.astype(np.int32)
        else:
            summed += part
    return summed


def block_majority(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Downsample a boolean volume by whole blocks of ``factors``: a block is set when at least half of it is.

    Trailing voxels that do not fill a whole block are dropped (as in :func:`block_mean`, whose
    ``>= 0.5`` it equals to the voxel); the counts are integer sums, not float means.
    """
    crop = tuple(n - n % f for n, f in zip(mask.shape, factors))
    counts = mask[: crop[0], : crop[1], : crop[2]].astype(bool, copy=False).view(np.uint8)
    for axis, f in enumerate(factors):
        if f > 1:
            counts = _block_sum_axis(counts, f, axis)
    return 2 * counts >= int(np.prod(factors))


def upsample_blocks(coarse: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...],
                    pad_mode: str = "edge") -> np.ndarray:
    """Nearest-neighbour upsampling of a block-wise volume back to ``shape``.

    Voxels beyond the last whole block are padded with ``pad_mode`` (``edge`` or ``constant``: zero).
    """
    fz, fy, fx = factors
    nz, ny, nx = coarse.shape
    full = np.repeat(coarse, fx, axis=2) if fx > 1 else coarse  # x first, on the small array
    if fz > 1 or fy > 1:  # z and y by broadcasting whole rows: one copy instead of a full-size repeat per axis
        full = np.broadcast_to(full[:, None, :, None, :], (nz, fz, ny, fy, nx * fx)).reshape(nz * fz, ny * fy, -1)
    full = full[: shape[0], : shape[1], : shape[2]]
    pad = [(0, n - m) for n, m in zip(shape, full.shape)]
    return np.pad(full, pad, mode=pad_mode) if any(p[1] for p in pad) else full
