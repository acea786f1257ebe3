"""Lung segmentation and quantification: known volumes on hand-made arrays, phantoms and the sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ctquant.io.scans import load_scan
from ctquant.segment.lungs import LEFT, RIGHT, segment_lungs
from ctquant.synthetic.phantom import make_phantom
from ctquant.run.scan import quantify_to_dir
from ctquant.measures.volumes import bilateral_flags, lung_measures, quality_flags


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_lung_measures_known_volumes():
    spacing = (2.0, 1.0, 0.5)  # 1 mm3 voxels -> 0.001 mL
    lungs = np.zeros((10, 20, 40), np.uint8)
    lungs[:, :, :20] = RIGHT  # 4000 voxels = 4 mL
    lungs[:, :, 20:] = LEFT
    lesions = np.zeros_like(lungs)
    lesions[:5, :, :10] = 1  # 1000 voxels GGO in the right lung
    lesions[:2, :, 30:] = 2  # 400 voxels consolidation in the left lung
    hu = np.full(lungs.shape, -800, np.int16)
    hu[:, :, 20:] = -700
    m = lung_measures(hu, lungs, lesions, spacing)
    assert m["right"]["lung_volume_ml"] == pytest.approx(4.0)
    assert m["right"]["ggo_volume_ml"] == pytest.approx(1.0)
    assert m["right"]["ggo_pct"] == pytest.approx(25.0)
    assert m["left"]["consolidation_pct"] == pytest.approx(10.0)
    assert m["both"]["opacity_volume_ml"] == pytest.approx(1.4)
    assert m["both"]["opacity_pct"] == pytest.approx(17.5)
    assert m["both"]["mean_lung_hu"] == pytest.approx(-750.0)
    flags = bilateral_flags(m, min_pct_of_lung=0.5)
    assert flags == {"ggo": False, "consolidation": False, "opacity": True}


def test_quality_flags_cut_and_implausible():
    spacing = (5.0, 2.0, 2.0)
    lungs = np.zeros((20, 40, 40), np.uint8)
    lungs[0:10, 10:30, 5:18] = RIGHT  # touches the first slice: cut in z
    lungs[5:15, 10:30, 22:35] = LEFT
    m = lung_measures(np.zeros(lungs.shape, np.int16), lungs, np.zeros_like(lungs), spacing)
    flags = quality_flags(lungs, m, {"plausibility": {"min_lung_volume_ml": 1000, "max_lung_volume_ml": 10000}})
    assert any(f.startswith("implausible_lung_volume") for f in flags)
    assert any(f.startswith("right_lung_cut_by_field_of_view: z") for f in flags)
    assert not any(f.startswith("left_lung_cut") for f in flags)


@pytest.mark.parametrize("severity, min_dice", [(0.0, 0.97), (1.0, 0.96), (2.0, 0.93), (3.0, 0.85)])
def test_lungs_keep_consolidated_lung(severity, min_dice):
    """Dice against the generator's truth, including heavy pleura-touching dependent consolidation.

    Measured (seed 3): 0.976 / 0.966 / 0.937 / 0.856 at severities 0-3. The density-driven growth that
    gave >= 0.97 here (the phantom's consolidation, -25 HU, is lighter than its muscle) leaked 15-67 %
    on real scans and was removed; the rib-cage step keeps the pleura-based part, not the whole airless
    bases of severity 3 (README "Accuracy" and ctquant/segment/lungs.py).
    """
    phantom = make_phantom(severity=severity, seed=3)
    labels = segment_lungs(phantom.hu, phantom.spacing_mm)
    for label in (RIGHT, LEFT):
        assert _dice(labels == label, phantom.lung_labels == label) >= min_dice - 0.03
    assert _dice(labels > 0, phantom.lung_labels > 0) >= min_dice
    # Right lung is on the patient's right: the lower LPS x index.
    x_right = np.nonzero((labels == RIGHT).any(axis=(0, 1)))[0].mean()
    x_left = np.nonzero((labels == LEFT).any(axis=(0, 1)))[0].mean()
    assert x_right < x_left


def test_trachea_is_not_lung():
    phantom = make_phantom(severity=0.0, seed=1)
    labels = segment_lungs(phantom.hu, phantom.spacing_mm)
    top = phantom.hu.shape[0] - 1
    trachea = (phantom.hu[top] < -950) & (phantom.lung_labels[top] == 0)
    assert trachea.any()
    assert not (labels[top][trachea] > 0).any()


def _truth(sample_dir, timepoint):
    return json.loads((sample_dir / "truth.json").read_text())["timepoints"][timepoint]["volumes"]


@pytest.mark.parametrize("timepoint", ["baseline", "day14"])
def test_sample_hu_method_against_truth(sample_dir, tmp_path, timepoint):
    """Lung volumes within 3 %, HU-band GGO within 50 % and opacity (GGO + consolidation) within 15 %.

    Measured with the shipped lung step (session 18): lungs +0.3 % / +0.3 %, GGO -21 % / -47 %, opacity
    +2.5 % / +4.8 % (baseline / day 14). Two rules of session 18 act at the phantom's 1.8 mm pixels, where the
    3 mm ball of the thickness rule used to be a single voxel: the thickness rule now opens by two pixels there
    (``opening_mm``) and ground glass in the lung mask's outermost pixel needs ground glass inside it
    (``pleural_rim_voxels``). They take the phantom's thin and noise-fragmented ground glass (the rim rule
    alone: GGO -14 % / -36 %, opacity +9 % / +16 %); on real scans averaged to 1.7-2.1 mm pixels they took the
    false GGO of normal lungs from 4-8 % to 1-3 % and brought the hybrids' GGO errors towards the truth
    (README "Accuracy"). Before both (session 17): GGO -10 % / -28 %, opacity +12 % / +22 %. The day-14 GGO went from -24 % to -28 % when the rib-cage fill stopped
    filling stretches under 4 mm (real scans: lung outside the reference 1.22 → 0.99 % on A0001, 5.27 →
    3.57 % on COPDGene): the phantom's thin pleura-based ground glass no longer all counts as lung.
    Earlier, with the classical lung step alone: lungs -0.6 % / -0.3 %, GGO -7 % / -22 %, opacity +7 % /
    +17 % (baseline / day 14); with the dense-lung network (the product) opacity +17 % / +30 % (GGO -7 % /
    -22 %; with the tissue-below rule of ``configs/quantify.yaml`` -9 % / -24 % and opacity +15 % / +27 %,
    the rule dropping 12.8 / 6.7 mL of phantom lesion one slice thick on its diaphragm): it adds
    48 mL on day 14, paravertebral and heart-border tissue of the phantom (its apex and heart have no
    real anatomy around them), which the HU bands count as consolidation. Opacity is asserted within 35 %.
    The shipped vessel rule is set for real CT, where unenhanced consolidation is as dense as blood
    (``vessel_min_hu: 60``): the phantom's thick vessels (+40 HU) then count as consolidation, and the
    phantom's consolidation (-25 HU) hides in the dense band. Real-data figures: README "Accuracy".
    """
    measures = quantify_to_dir(sample_dir / timepoint, tmp_path / "out", method="hu", device="cpu",
                               subject_id="S1", timepoint=timepoint)
    truth = _truth(sample_dir, timepoint)
    for side in ("right", "left", "both"):
        got, want = measures["lungs"][side], truth[side]
        assert got["lung_volume_ml"] == pytest.approx(want["lung_ml"], rel=0.03)
    both, want = measures["lungs"]["both"], truth["both"]
    assert both["ggo_volume_ml"] == pytest.approx(want["ggo_ml"], rel=0.50)
    opacity = both["ggo_volume_ml"] + both["consolidation_volume_ml"]
    assert opacity == pytest.approx(want["ggo_ml"] + want["consolidation_ml"], rel=0.15)
    assert measures["bilateral"]["ggo"] and measures["bilateral"]["opacity"]
    for name in ("measures.json", "measures.csv", "lungs.nii.gz", "lesions.nii.gz"):
        assert (tmp_path / "out" / name).is_file()
    written = sitk.ReadImage(str(tmp_path / "out" / "lungs.nii.gz"))
    truth_image = sitk.ReadImage(str(sample_dir / "truth" / f"{timepoint}_lungs.nii.gz"))
    assert written.GetSize() == truth_image.GetSize()
    assert np.allclose(written.GetOrigin(), truth_image.GetOrigin(), atol=1e-3)
    assert np.allclose(written.GetSpacing(), truth_image.GetSpacing(), atol=1e-4)


def test_dicom_and_nifti_give_the_same_numbers(sample_dir, tmp_path):
    scan = load_scan(sample_dir / "baseline")
    nifti = tmp_path / "baseline.nii.gz"
    sitk.WriteImage(scan.to_sitk(), str(nifti))
    from_dicom = quantify_to_dir(sample_dir / "baseline", tmp_path / "a", method="hu", device="cpu")
    from_nifti = quantify_to_dir(nifti, tmp_path / "b", method="hu", device="cpu")
    for side in ("right", "left", "both"):
        for key in ("lung_volume_ml", "ggo_volume_ml", "consolidation_volume_ml"):
            assert from_nifti["lungs"][side][key] == pytest.approx(from_dicom["lungs"][side][key], rel=0.01)


def _ball_mask(shape, centre, radius_vox):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius_vox ** 2


def test_hu_lesions_tell_vessels_from_consolidation():
    """Known shapes at 1 mm: consolidation kept, vessels (thin or thick, 40 HU) left out."""
    from ctquant.segment.lesions import CONSOLIDATION, GGO, segment_lesions_hu

    shape, spacing = (60, 80, 120), (1.0, 1.0, 1.0)
    hu = np.full(shape, -850, np.int16)
    lungs = np.full(shape, RIGHT, np.uint8)
    zz, yy, xx = np.ogrid[:60, :80, :120]
    thin_vessel = ((yy - 15) ** 2 + (zz - 30) ** 2 <= 1.5 ** 2) & (xx < 100)    # r 1.5 mm tube in air-filled lung
    thick_vessel = ((yy - 65) ** 2 + (zz - 30) ** 2 <= 5 ** 2) & (xx < 100)     # r 5 mm: passes the thickness rule
    halo = _ball_mask(shape, (30, 40, 25), 12)                                  # ground glass around ...
    blob = _ball_mask(shape, (30, 40, 25), 6)                                   # ... a consolidation ball
    thin_patch = (np.abs(zz - 30) <= 1) & (np.abs(yy - 40) <= 6) & (np.abs(xx - 60) <= 6)  # 3 mm thick, in GGO
    patch_halo = (np.abs(zz - 30) <= 6) & (np.abs(yy - 40) <= 10) & (np.abs(xx - 60) <= 10)
    lobar = (np.abs(zz - 30) <= 10) & (np.abs(yy - 40) <= 10) & (xx >= 90)      # 20 mm block, no ground glass
    hu[halo | patch_halo] = -500
    hu[blob | thin_patch | lobar] = -25
    hu[thin_vessel | thick_vessel] = 40
    labels = segment_lesions_hu(hu, lungs, spacing)
    consolidation = labels == CONSOLIDATION
    truth = blob | thin_patch | lobar
    assert np.count_nonzero(consolidation & (thin_vessel | thick_vessel) & ~truth) == 0
    assert np.count_nonzero(consolidation) == pytest.approx(np.count_nonzero(truth), rel=0.05)
    assert np.count_nonzero(consolidation & truth) >= 0.95 * np.count_nonzero(truth)
    ggo_truth = (halo | patch_halo) & ~truth
    assert np.count_nonzero(labels == GGO) == pytest.approx(np.count_nonzero(ggo_truth), rel=0.01)
    # the thickness rule alone keeps a thick vessel: the density rule is what drops it
    denser = segment_lesions_hu(hu, lungs, spacing, vessel_min_hu=100.0)
    assert np.count_nonzero((denser == CONSOLIDATION) & thick_vessel) > 0.5 * np.count_nonzero(thick_vessel)


def test_pleural_edge_keeps_dense_lung_against_the_wall():
    """Half-density edge: consolidation reaches the wall, aerated lung and fat do not move the edge."""
    from ctquant.segment.lungs import settle_pleural_edge

    hu = np.full((3, 40, 60), 45, np.int16)  # chest wall (muscle)
    hu[:, 5:35, 5:30] = -850                 # aerated right lung
    hu[:, 5:35, 32:55] = -25                 # consolidated left lung, truly reaching x = 54
    hu[:, 5:35, 30:32] = -100                # a fat stripe between them
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 5:35, 5:30] = RIGHT
    labels[:, 5:35, 34:53] = LEFT            # the segmentation stopped 2 voxels short on both sides
    before = labels.copy()
    out = settle_pleural_edge(labels, hu, wall_hu=40.0)
    assert np.array_equal(labels, before)                            # the input is not modified
    assert np.array_equal(out == RIGHT, labels == RIGHT)             # aerated lung: edge unchanged
    assert (out[:, 5:35, 53:55] == LEFT).all()                       # consolidation keeps its last voxels
    assert not (out[:, :, 55:] > 0).any() and not (out[:, 35:] > 0).any()  # the wall is not lung
    assert (out[:, 5:35, 32:34] == LEFT).all()                       # consolidation on the medial side too
    assert not (out[:, :, 30:32] > 0).any()                          # fat never joins
    in_place = labels.copy()
    assert settle_pleural_edge(in_place, hu, wall_hu=40.0, in_place=True) is in_place
    assert np.array_equal(in_place, out)                             # in place: the same labels, no copy
    with pytest.raises(ValueError, match="C-contiguous"):
        settle_pleural_edge(np.asfortranarray(labels), hu, in_place=True)


@pytest.mark.parametrize("shape, factors", [((11, 13, 17), (2, 3, 4)), ((12, 12, 16), (2, 4, 4)),
                                            ((37, 9, 10), (3, 1, 2)), ((5, 6, 7), (1, 1, 1))])
def test_block_mean_edge_is_the_padded_block_mean_to_the_bit(shape, factors):
    """The lung step's block means (no padded copy, int32 sums, in slabs) equal numpy's float32 mean of the
    edge-padded volume bit for bit, partial trailing blocks included; float input is refused."""
    from ctquant.segment.grid import block_mean, block_mean_edge

    hu = np.random.default_rng(3).integers(-32768, 32767, shape, dtype=np.int16)
    pad = [(0, -(-n // f) * f - n) for n, f in zip(shape, factors)]
    expected = block_mean(np.pad(hu, pad, mode="edge"), factors)
    for slab_blocks in (1, 2, 8):
        got = block_mean_edge(hu, factors, slab_blocks=slab_blocks)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(TypeError):
        block_mean_edge(hu.astype(np.float32), factors)


@pytest.mark.parametrize("shape, factors", [((11, 13, 17), (2, 3, 4)), ((12, 12, 16), (1, 2, 2)),
                                            ((5, 6, 7), (1, 1, 1))])
@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_block_majority_is_half_of_the_block_mean(shape, factors, share):
    """block_majority's integer counts set exactly the blocks whose float32 mean is >= 0.5 (ties included,
    trailing partial blocks dropped)."""
    from ctquant.segment.grid import block_majority, block_mean

    mask = np.random.default_rng(int(share * 10)).random(shape) < share
    got = block_majority(mask, factors)
    assert got.dtype == bool and np.array_equal(got, block_mean(mask, factors) >= 0.5)
    if share == 0.5:  # blocks both ways
        assert got.any() and not got.all()


@pytest.mark.parametrize("pad_mode", ["edge", "constant"])
def test_upsample_blocks_repeats_each_block(pad_mode):
    from ctquant.segment.grid import upsample_blocks

    coarse = np.random.default_rng(4).integers(1, 9, (4, 5, 6)).astype(np.uint8)
    factors = (2, 3, 4)
    whole = coarse.repeat(2, axis=0).repeat(3, axis=1).repeat(4, axis=2)
    assert np.array_equal(upsample_blocks(coarse, factors, (7, 14, 22), pad_mode), whole[:7, :14, :22])
    out = upsample_blocks(coarse, factors, (9, 15, 25), pad_mode)  # one voxel beyond the last block on each axis
    assert np.array_equal(out[:8, :15, :24], whole)
    assert np.array_equal(out[8, :15, :24], whole[-1] if pad_mode == "edge" else np.zeros_like(whole[-1]))
    assert np.array_equal(out[:8, :15, 24], whole[:, :, -1] if pad_mode == "edge" else np.zeros_like(whole[:, :, -1]))


def _gradient_lungs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Two box lungs at 2 mm whose normal density rises front to back as on a real supine scan
    (pancreas-ct-cbct-001's band medians: -820 HU anterior to -700 HU in the most dependent 20 mm),
    with 30 HU noise correlated over about one voxel as CT noise is; no lesion."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    shape, spacing = (40, 100, 120), (2.0, 2.0, 2.0)
    y_mm = np.arange(shape[1]) * spacing[1]
    level = np.interp(y_mm, [0.0, 120.0, 170.0, 200.0], [-830.0, -790.0, -740.0, -690.0])
    noise = ndi.gaussian_filter(rng.normal(0.0, 1.0, shape), 1.0)
    hu = (level[None, :, None] + 30.0 * noise / noise.std()).astype(np.int16)
    lungs = np.zeros(shape, np.uint8)
    lungs[:, :, 5:58], lungs[:, :, 62:115] = RIGHT, LEFT
    return hu, lungs, spacing


def _ggo_pct(labels: np.ndarray, lungs: np.ndarray, side: int) -> float:
    from ctquant.segment.lesions import GGO

    return 100.0 * np.count_nonzero((labels == GGO) & (lungs == side)) / np.count_nonzero(lungs == side)


def test_hu_ggo_follows_the_dependent_gradient():
    """A normal lung with a front-to-back gradient reads < 0.5 % GGO with the band-wise normal level;
    one scan-wide level calls the dependent lung ground glass."""
    from ctquant.config import load_quantify_config
    from ctquant.segment.lesions import segment_lesions_hu, VESSEL_SETTINGS

    hu, lungs, spacing = _gradient_lungs()
    settings = {k: float(v) for k, v in load_quantify_config()["vessel_removal"].items() if k in VESSEL_SETTINGS}
    assert settings["normal_band_mm"] > 0
    banded = segment_lesions_hu(hu, lungs, spacing, **settings)
    scan_wide = segment_lesions_hu(hu, lungs, spacing, **{**settings, "normal_band_mm": 0.0})
    for side in (RIGHT, LEFT):
        assert _ggo_pct(banded, lungs, side) < 0.5
        assert _ggo_pct(scan_wide, lungs, side) > 1.5


def test_hu_ggo_patch_in_a_gradient_lung_is_found():
    """Faint ground glass (-600 HU) filling the dependent 80 mm of the right lung over 48 mm of z is found
    within 10 % of its volume: the band levels come from what the scan-wide rule calls normal, so the
    patch does not raise its own floor (a plain band median of the lung below -600 HU finds ~75 %)."""
    from ctquant.config import load_quantify_config
    from ctquant.segment.lesions import GGO, VESSEL_SETTINGS, segment_lesions_hu

    hu, lungs, spacing = _gradient_lungs(seed=1)
    patch = np.zeros(hu.shape, bool)
    patch[8:32, 60:100, 5:58] = True
    hu[patch] = (-600.0 + 15.0 * np.random.default_rng(2).normal(0.0, 1.0, int(patch.sum()))).astype(np.int16)
    settings = {k: float(v) for k, v in load_quantify_config()["vessel_removal"].items() if k in VESSEL_SETTINGS}
    found = segment_lesions_hu(hu, lungs, spacing, **settings) == GGO
    assert np.count_nonzero(found & patch) >= 0.9 * np.count_nonzero(patch)
    assert np.count_nonzero(found) == pytest.approx(np.count_nonzero(patch), rel=0.10)
    assert _ggo_pct(found.astype(np.uint8), lungs, LEFT) < 0.5


def test_patient_position_sets_the_dependent_side_and_flags(sample_dir, tmp_path):
    """PatientPosition travels from the DICOM header to the lung step and the provenance: prone scans are
    segmented with the dependent side in front and flagged, decubitus scans flagged, supine ones not."""
    import shutil

    import pydicom

    from ctquant.run.scan import position_flags, segment_lungs as lungs_of_scan
    from ctquant.segment.lungs import dependent_side

    folder = tmp_path / "prone"
    shutil.copytree(sample_dir / "baseline", folder)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientPosition = "HFP"
        ds.save_as(path)
    scan = load_scan(folder)
    assert scan.meta["patient_position"] == "HFP"
    assert dependent_side(scan.meta["patient_position"]) == "anterior"
    prone = lungs_of_scan(scan, dense_lung_model=False)
    assert np.array_equal(prone, segment_lungs(scan.hu, scan.spacing_mm, dependent="anterior"))
    assert not np.array_equal(prone, segment_lungs(scan.hu, scan.spacing_mm))  # the side matters here
    assert dependent_side("HFS") == dependent_side(None) == dependent_side("FFDL") == "posterior"
    assert position_flags("HFP")[0].startswith("prone_scan: PatientPosition HFP")
    assert position_flags("FFDR")[0].startswith("decubitus_scan")
    assert position_flags("HFS") == position_flags(None) == []
    assert load_scan(sample_dir / "baseline").meta["patient_position"] == "HFS"
