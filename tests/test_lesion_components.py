"""ctquant.segment.lesions: remove_small (cc3d) and opening_mm (ball morphology) against their scipy definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from ctquant.segment.lesions import remove_small


def _scipy_remove_small(mask: np.ndarray, min_voxels: float, connectivity: int) -> np.ndarray:
    comps, _ = ndi.label(mask, structure=ndi.generate_binary_structure(mask.ndim, connectivity))
    return (np.bincount(comps.ravel()) >= min_voxels)[comps] & mask


@pytest.mark.parametrize("shape", [(17, 23, 29), (40, 31)])
@pytest.mark.parametrize("density", [0.08, 0.15])
def test_remove_small_equals_scipy_components(shape, density):
    rng = np.random.default_rng(len(shape) * 100 + int(density * 100))
    mask = np.zeros((shape[0] + 6,) + shape[1:], bool)
    mask[3:-3] = rng.random(shape) < density  # empty border slices: the bounding-box path is taken
    for connectivity in range(1, mask.ndim + 1):
        comps, n = ndi.label(mask, structure=ndi.generate_binary_structure(mask.ndim, connectivity))
        sizes = np.bincount(comps.ravel())[1:]
        assert n > 5 and sizes.min() < 3 <= sizes.max()  # small and large components to tell apart
        for min_voxels in (2, 2.5, 3, 7.2, float(np.median(sizes)), float(sizes.max())):
            got = remove_small(mask, min_voxels, connectivity=connectivity)
            assert got.dtype == bool and got.shape == mask.shape
            np.testing.assert_array_equal(got, _scipy_remove_small(mask, min_voxels, connectivity))
        assert remove_small(mask, float(sizes.max()) + 1, connectivity=connectivity).sum() == 0


def test_remove_small_trivial_and_refused_inputs():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 1, 1] = True
    assert np.array_equal(remove_small(mask, 1.0), mask)  # nothing is smaller than one voxel
    assert not remove_small(mask, 2.0).any()
    assert not remove_small(np.zeros((3, 3, 3), bool), 5.0).any()
    with pytest.raises(ValueError):
        remove_small(mask, 2.0, connectivity=4)
    with pytest.raises(ValueError):
        remove_small(np.ones(10, bool), 2.0)


@pytest.mark.parametrize("diameter_mm, spacing_mm", [(3.0, (1.25, 0.7, 0.7)), (8.0, (3.0, 1.0, 1.0)), (5.0, (2.0, 2.0, 2.0))])
def test_opening_mm_is_the_distance_map_opening(diameter_mm, spacing_mm):
    """The ball erosion / dilation of opening_mm gives, voxel for voxel, the distance-map definition
    (keep what lies within the radius of a voxel at least the radius from the background), also where
    the mask touches the array's edge."""
    from ctquant.segment.grid import block_majority, upsample_blocks
    from ctquant.segment.lesions import opening_mm

    rng = np.random.default_rng(3)
    mask = ndi.gaussian_filter(rng.random((24, 60, 60)), 2.0) > 0.5
    mask[:, :, :3] = True                              # touches the edge
    radius = diameter_mm / 2.0
    factors = tuple(max(1, int(1.5 // s)) for s in spacing_mm)
    small = block_majority(mask, factors) if factors != (1, 1, 1) else mask
    spacing = tuple(s * f for s, f in zip(spacing_mm, factors))
    core = ndi.distance_transform_edt(small, sampling=spacing) >= radius
    expected = ndi.distance_transform_edt(~core, sampling=spacing) < radius
    if factors != (1, 1, 1):
        expected = upsample_blocks(ndi.binary_dilation(expected), factors, mask.shape, pad_mode="constant")
    expected &= mask
    got = opening_mm(mask, spacing_mm, diameter_mm)
    assert 0 < got.sum() < mask.sum()
    assert np.array_equal(got, expected)
