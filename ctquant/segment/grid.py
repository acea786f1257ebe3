"""Grid helpers shared by the lung and lesion steps: block-wise down- and upsampling of (z, y, x) volumes.

In: a volume (or mask) and integer block ``factors`` per axis; out: the coarse volume, or a coarse volume
brought back to the full grid by nearest-neighbour repetition.
"""

from __future__ import annotations

import numpy as np


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


def block_majority(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Downsample a boolean volume by whole blocks of ``factors``: a block is set when most of it is."""
    return block_mean(mask, factors) >= 0.5


def upsample_blocks(coarse: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...],
                    pad_mode: str = "edge") -> np.ndarray:
    """Nearest-neighbour upsampling of a block-wise volume back to ``shape``.

    Voxels beyond the last whole block are padded with ``pad_mode`` (``edge`` or ``constant``: zero).
    """
    full = coarse
    for axis, f in enumerate(factors):
        if f > 1:
            full = np.repeat(full, f, axis=axis)
    full = full[: shape[0], : shape[1], : shape[2]]
    pad = [(0, n - m) for n, m in zip(shape, full.shape)]
    return np.pad(full, pad, mode=pad_mode) if any(p[1] for p in pad) else full
