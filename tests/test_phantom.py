"""The synthetic chest CT phantom, its DICOM/NIfTI writers and the shipped sample study."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctquant.synthetic import phantom as ph

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (40, 128, 128)  # small grid over the same anatomy as the sample (345 mm FOV, 260 mm long)
SPACING = (6.5, 2.7, 2.7)
UIDS = dict(study_uid="1.2.826.0.1.3680043.8.498.1001", series_uid="1.2.826.0.1.3680043.8.498.1002",
            frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1003", study_date="20200406",
            series_description="test", series_number=7, patient_id="P1", patient_name="TEST^P")


@pytest.fixture(scope="module")
def baseline() -> ph.Phantom:
    return ph.make_phantom(SHAPE, SPACING, timepoint="baseline", severity=1.0, seed=0)


@pytest.fixture(scope="module")
def day14() -> ph.Phantom:
    return ph.make_phantom(SHAPE, SPACING, timepoint="day14", severity=1.0, seed=0)


def _read_series(paths) -> tuple[np.ndarray, list]:
    """HU volume (z ascending) and datasets of DICOM files, sorted by ImagePositionPatient z."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets])
    return hu, datasets


# ---------------------------------------------------------------------------------------------
# The phantom
# ---------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_arrays(baseline):
    again = ph.make_phantom(SHAPE, SPACING, timepoint="baseline", severity=1.0, seed=0)
    assert np.array_equal(again.hu, baseline.hu)
    assert np.array_equal(again.lung_labels, baseline.lung_labels)
    assert np.array_equal(again.lesion_labels, baseline.lesion_labels)
    tiny = ((20, 64, 64), (13.0, 5.4, 5.4))
    assert not np.array_equal(ph.make_phantom(*tiny, seed=0).hu, ph.make_phantom(*tiny, seed=1).hu)


def test_array_types_and_geometry(baseline):
    assert baseline.hu.dtype == np.int16 and baseline.hu.shape == SHAPE
    assert baseline.lung_labels.dtype == np.uint8 and baseline.lesion_labels.dtype == np.uint8
    assert set(np.unique(baseline.lung_labels)) == {0, 1, 2}
    assert set(np.unique(baseline.lesion_labels)) == {0, 1, 2}
    assert baseline.spacing_mm == SPACING
    nz, ny, nx = SHAPE
    ox, oy, _ = baseline.origin_mm
    assert ox == pytest.approx(-(nx - 1) / 2 * SPACING[2]) and oy == pytest.approx(-(ny - 1) / 2 * SPACING[1])
    scan = baseline.to_scan()
    assert scan.hu is baseline.hu and scan.voxel_volume_ml == pytest.approx(baseline.voxel_volume_ml)


def test_truth_volumes_are_voxel_counts_times_voxel_volume(baseline):
    truth = baseline.truth()
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    assert truth["voxel_volume_ml"] == pytest.approx(voxel_ml)
    for name, side in (("right", 1), ("left", 2)):
        lung = baseline.lung_labels == side
        n_lung = int(lung.sum())
        n_ggo = int((lung & (baseline.lesion_labels == 1)).sum())
        n_cons = int((lung & (baseline.lesion_labels == 2)).sum())
        t = truth[name]
        assert t["lung_ml"] == pytest.approx(n_lung * voxel_ml)
        assert t["ggo_ml"] == pytest.approx(n_ggo * voxel_ml)
        assert t["consolidation_ml"] == pytest.approx(n_cons * voxel_ml)
        assert t["lesion_ml"] == pytest.approx((n_ggo + n_cons) * voxel_ml)
        assert t["ggo_pct"] == pytest.approx(100.0 * n_ggo / n_lung)
        assert t["consolidation_pct"] == pytest.approx(100.0 * n_cons / n_lung)
    for key in ("lung_ml", "ggo_ml", "consolidation_ml"):
        assert truth["both"][key] == pytest.approx(truth["right"][key] + truth["left"][key])


def test_lesions_only_inside_lungs(baseline, day14):
    for p in (baseline, day14):
        assert not np.any((p.lesion_labels > 0) & (p.lung_labels == 0))


def test_right_lung_is_on_the_patients_right_and_larger(baseline):
    x_index = np.arange(SHAPE[2])
    right_x = (baseline.lung_labels == 1).sum(axis=(0, 1)) @ x_index / (baseline.lung_labels == 1).sum()
    left_x = (baseline.lung_labels == 2).sum(axis=(0, 1)) @ x_index / (baseline.lung_labels == 2).sum()
    assert right_x < SHAPE[2] / 2 < left_x  # LPS, identity direction: patient's right = low x
    truth = baseline.truth()
    assert truth["right"]["lung_ml"] > truth["left"]["lung_ml"]
    assert 4500.0 < truth["both"]["lung_ml"] < 6500.0  # a realistic adult inspiration


def test_trachea_is_air_and_not_lung(baseline):
    z_index = np.flatnonzero(np.arange(SHAPE[0]) * SPACING[0] + baseline.origin_mm[2]
                             > ph.Z_ANATOMY_IN_PATIENT_MM + ph.Z_CARINA_MM + 10.0)
    ty = int(round((ph.TRACHEA_XY_MM[1] - baseline.origin_mm[1]) / SPACING[1]))
    tx = int(round((ph.TRACHEA_XY_MM[0] - baseline.origin_mm[0]) / SPACING[2]))
    assert z_index.size > 0
    assert np.all(baseline.hu[z_index, ty, tx] < -900)
    assert np.all(baseline.lung_labels[z_index, ty, tx] == 0)


def test_lungs_touch_at_the_anterior_junction(baseline):
    lab = baseline.lung_labels
    touching = (lab[:, :, :-1] == 1) & (lab[:, :, 1:] == 2)
    assert touching.any(axis=(1, 2)).sum() >= 1
    # ... but not everywhere: the mediastinum separates them in most slices
    assert touching.any(axis=(1, 2)).mean() < 0.5


def test_day14_lesions_are_smaller_in_both_lungs(baseline, day14):
    assert np.array_equal(baseline.lung_labels, day14.lung_labels)  # same anatomy
    b, d = baseline.truth(), day14.truth()
    for lung in ("right", "left"):
        for cls in ("ggo_ml", "consolidation_ml"):
            assert 0 < d[lung][cls] < b[lung][cls]
    assert 0.3 < d["both"]["ggo_ml"] / b["both"]["ggo_ml"] < 0.7
    assert 0.2 < d["both"]["consolidation_ml"] / b["both"]["consolidation_ml"] < 0.6
    assert not np.any((day14.lesion_labels > 0) & (baseline.lesion_labels == 0))  # shrinks in place


def test_lesion_hu_within_bands_and_vessels_are_dense(baseline, day14):
    for p in (baseline, day14):
        ggo = p.hu[p.lesion_labels == 1]
        cons = p.hu[p.lesion_labels == 2]
        assert np.mean((ggo >= -700) & (ggo < -300)) >= 0.99
        assert np.mean((cons >= -300) & (cons < 100)) >= 0.99
        assert -600 < ggo.mean() < -400
        normal = p.hu[(p.lung_labels > 0) & (p.lesion_labels == 0)]
        assert np.mean((normal >= -700) & (normal < -300)) < 0.01  # normal lung is not GGO
        # vessels: a naive HU threshold would call them consolidation
        assert 0.01 < np.mean(normal >= -300) < 0.15
        assert -900 < np.median(normal) < -800


def test_body_air_table_and_bone(baseline):
    hu, lung = baseline.hu, baseline.lung_labels
    assert np.all(np.abs(hu[:, :3, :3].astype(float) + 1000) < 120)  # corner: air
    assert np.percentile(hu, 99.9) > 400  # ribs, spine, sternum
    # the table lies below (posterior to) the body and never touches the lungs
    row_max = np.flatnonzero((lung > 0).any(axis=(0, 2))).max()
    table_rows = np.flatnonzero((hu[:, :, SHAPE[2] // 2] > 100).any(axis=0))
    assert table_rows.max() > row_max + 10


def test_severity(baseline):
    none = ph.make_phantom((20, 64, 64), (13.0, 5.4, 5.4), severity=0.0)
    assert not none.lesion_labels.any()
    heavy = ph.make_phantom(SHAPE, SPACING, severity=3.0)
    t = heavy.truth()["both"]
    assert t["consolidation_pct"] > 20.0 and t["lesion_pct"] > t["consolidation_pct"]
    assert t["lesion_pct"] > baseline.truth()["both"]["lesion_pct"]
    # dependent (posterior, high y index) and touching the chest wall
    y_index = np.arange(SHAPE[1])[None, :, None]
    cons = heavy.lesion_labels == 2
    lung = heavy.lung_labels > 0
    assert np.mean(np.broadcast_to(y_index, SHAPE)[cons]) > np.mean(np.broadcast_to(y_index, SHAPE)[lung]) + 5
    outside = ~lung
    touches = np.zeros(SHAPE, bool)
    touches[:, :, 1:] |= outside[:, :, :-1]
    touches[:, :, :-1] |= outside[:, :, 1:]
    touches[:, 1:, :] |= outside[:, :-1, :]
    touches[:, :-1, :] |= outside[:, 1:, :]
    assert (cons & touches).sum() > 0.02 * cons.sum()


def test_bad_arguments():
    with pytest.raises(ValueError):
        ph.make_phantom(SHAPE, SPACING, timepoint="day7")
    with pytest.raises(ValueError):
        ph.make_phantom(SHAPE, SPACING, severity=-1)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def test_dicom_series_round_trip(baseline, tmp_path):
    paths = ph.write_dicom_series(baseline, tmp_path, **UIDS)
    assert len(paths) == SHAPE[0] and all(p.parent == tmp_path for p in paths)
    names = [p.name for p in paths]
    assert all(len(n) == 16 and int(n, 16) >= 0 for n in names)
    assert names != sorted(names)  # order not revealed by the names
    hu, datasets = _read_series(paths)
    assert np.array_equal(hu, baseline.hu.astype(np.float64))
    ox, oy, oz = baseline.origin_mm
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == ph.CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([ox, oy, oz + k * SPACING[0]], abs=1e-3)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([SPACING[1], SPACING[2]])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == SPACING[0]
        assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16 and ds.RescaleType == "HU"
        assert (ds.Rows, ds.Columns) == SHAPE[1:]
        assert ds.Manufacturer == "ctquant phantom" and ds.StudyDate == UIDS["study_date"]
        assert ds.SeriesInstanceUID == UIDS["series_uid"] and ds.PatientID == "P1"
    assert len({ds.SOPInstanceUID for ds in datasets}) == SHAPE[0]
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, SHAPE[0] + 1))
    # deterministic: a second write gives the same bytes
    again = ph.write_dicom_series(baseline, tmp_path / "again", **UIDS)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_dicom_signed_storage_and_nested_names(baseline, tmp_path):
    paths = ph.write_dicom_series(baseline, tmp_path, rescale_intercept=0.0, nested=True, **UIDS)
    assert all(p.parent.parent == tmp_path and p.name.startswith(p.parent.name) for p in paths)
    hu, datasets = _read_series(paths)
    assert datasets[0].PixelRepresentation == 1
    assert np.array_equal(hu, baseline.hu.astype(np.float64))


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless,
                                    pydicom.uid.JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_pixels(baseline, tmp_path, syntax):
    if not ph.can_encode(syntax):
        pytest.skip(f"no encoder for {syntax.name}")
    small = ph.thick_slab_phantom(baseline, 4)
    paths = ph.write_dicom_series(small, tmp_path, transfer_syntax=syntax, **UIDS)
    hu, datasets = _read_series(paths)
    assert all(ds.file_meta.TransferSyntaxUID == syntax for ds in datasets)
    assert np.array_equal(hu, small.hu.astype(np.float64))


def test_write_truth_on_the_series_geometry(baseline, tmp_path):
    truth = ph.write_truth(baseline, tmp_path, "bl")
    assert truth == baseline.truth()
    for name, arr in (("lungs", baseline.lung_labels), ("lesions", baseline.lesion_labels)):
        img = sitk.ReadImage(str(tmp_path / f"bl_{name}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(img), arr)
        assert img.GetSpacing() == pytest.approx(SPACING[::-1], abs=1e-4)
        assert img.GetOrigin() == pytest.approx(baseline.origin_mm, abs=1e-3)
        assert img.GetDirection() == pytest.approx(baseline.direction)


def test_decoys(baseline, tmp_path):
    common = dict(study_uid=UIDS["study_uid"], study_date="20200406", patient_id="P1", patient_name="TEST^P")
    loc = pydicom.dcmread(ph.write_localizer(baseline, tmp_path / "loc", series_uid="1.2.3.1",
                                             frame_of_reference_uid="1.2.3.2", **common))
    assert list(loc.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] and loc.Modality == "CT"
    assert [float(v) for v in loc.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert loc.pixel_array.shape == (SHAPE[0], SHAPE[2])
    sr = pydicom.dcmread(ph.write_dose_sr(tmp_path / "sr", series_uid="1.2.3.3", **common))
    assert sr.Modality == "SR" and "PixelData" not in sr and sr.SOPClassUID == ph.DOSE_SR_STORAGE
    sc = pydicom.dcmread(ph.write_dose_screen(tmp_path / "sc", series_uid="1.2.3.4", **common))
    assert sc.Modality == "OT" and sc.pixel_array.shape == (256, 256)
    slabs = ph.write_thick_series(baseline, tmp_path / "slabs", n_slices=5, series_uid="1.2.3.5",
                                  frame_of_reference_uid="1.2.3.2", series_number=3, **common)
    hu, datasets = _read_series(slabs)
    assert hu.shape == (5, *SHAPE[1:])
    assert float(datasets[0].SliceThickness) == pytest.approx(SPACING[0] * (SHAPE[0] // 5))
    assert {ds.StudyInstanceUID for ds in [loc, sr, sc, *datasets]} == {UIDS["study_uid"]}


# ---------------------------------------------------------------------------------------------
# The shipped sample
# ---------------------------------------------------------------------------------------------
def test_committed_sample_matches_a_fresh_regeneration(sample_dir, tmp_path):
    committed = json.loads((sample_dir / "truth.json").read_text())
    out = tmp_path / "sample"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_sample_dicom.py"), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    fresh = json.loads((out / "truth.json").read_text())
    assert fresh == committed
    for tp, info in committed["timepoints"].items():
        files = sorted(p for p in (sample_dir / info["dicom_dir"]).rglob("*") if p.is_file())
        assert [p.name for p in files] == sorted(p.name for p in (out / tp).rglob("*") if p.is_file())
        hu, datasets = _read_series(files)
        assert hashlib.sha256(np.ascontiguousarray(hu.astype("<i2")).tobytes()).hexdigest() == info["pixel_sha256"]
        assert {ds.StudyInstanceUID for ds in datasets} == {info["study_instance_uid"]}
        assert {ds.StudyDate for ds in datasets} == {info["study_date"]}
        for mask in info["truth_masks"].values():
            assert (sample_dir / mask).read_bytes() == (out / mask).read_bytes()
    dates = [committed["timepoints"][tp]["study_date"] for tp in ("baseline", "day14")]
    assert ph.study_date_plus(dates[0], 14) == dates[1]
    base = committed["timepoints"]["baseline"]["volumes"]["both"]
    assert 5000.0 <= base["lung_ml"] <= 6000.0
