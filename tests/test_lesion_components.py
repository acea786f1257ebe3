"""ctquant.segment.lesions.remove_small (cc3d) against scipy.ndimage.label on random masks."""

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
