"""Ingest of DICOM series and volume files (issue "Foundation"), checked against the phantom's truth.

Series are written by :mod:`ctquant.synthetic.phantom` into temporary folders (small grids for speed); the HU
values must come back exactly and the geometry must match the generator's.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))

import bad_inputs as bi  # noqa: E402
from ctquant.io import scans as ctio  # noqa: E402
from ctquant.synthetic import phantom as ph  # noqa: E402
from ctquant.errors import InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def phantom() -> ph.Phantom:
    return bi.tiny_phantom()


def assert_matches_phantom(scan: ctio.Scan, phantom: ph.Phantom, *, atol: float = 1e-4) -> None:
    """Exact HU, and the generator's spacing, origin and (identity, LPS) direction."""
    assert scan.hu.dtype == np.int16
    assert scan.hu.shape == phantom.hu.shape
    np.testing.assert_array_equal(scan.hu, phantom.hu)
    np.testing.assert_allclose(scan.spacing_mm, phantom.spacing_mm, atol=atol)
    np.testing.assert_allclose(scan.origin_mm, phantom.origin_mm, atol=atol)
    np.testing.assert_allclose(scan.direction, phantom.direction, atol=1e-6)
    image = scan.to_sitk()
    np.testing.assert_allclose(image.GetSpacing(), phantom.spacing_mm[::-1], atol=atol)
    np.testing.assert_allclose(image.GetOrigin(), phantom.origin_mm, atol=atol)
    np.testing.assert_allclose(image.GetDirection(), phantom.direction, atol=1e-6)
    # the physical point of the last voxel is where the generator put it
    nz, ny, nx = phantom.hu.shape
    far = np.asarray(phantom.origin_mm) + np.asarray(phantom.spacing_mm[::-1]) * [nx - 1, ny - 1, nz - 1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((nx - 1, ny - 1, nz - 1)), far, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Slice order, HU, geometry
# --------------------------------------------------------------------------------------------------


def test_shuffled_names_and_lying_instance_numbers(phantom, tmp_path: Path):
    """File names in random order, nested folders, InstanceNumber scrambled: positions decide."""
    paths = bi.write_series(tmp_path / "study", shuffle_names=True, nested=True)
    assert sorted(paths) != paths  # the names do not reveal the order
    rng = np.random.default_rng(5)
    for path, number in zip(paths, rng.permutation(len(paths)) + 1):
        bi.edit(path, lambda ds, n=int(number): (setattr(ds, "InstanceNumber", n), delattr(ds, "SliceLocation")))
    scan = ctio.load_scan(tmp_path / "study")
    assert_matches_phantom(scan, phantom)
    # source headers follow z order (for DICOM SEG)
    z = [float(ds.ImagePositionPatient[2]) for ds in scan.source_datasets]
    assert z == sorted(z) and len(z) == phantom.hu.shape[0]
    assert [Path(p) for p in scan.meta["source_files"]] == paths


@pytest.mark.parametrize("slope,intercept,signed", [
    (1.0, -1024.0, False),   # the usual: unsigned, intercept -1024
    (1.0, 0.0, True),        # stored values are HU (signed)
    (0.5, -1000.0, True),    # slope != 1, intercept != -1024, negative stored values
    (0.5, -1100.0, False),   # slope != 1, unsigned
    (0.25, -1024.0, False),
    (1.0, -1024.0, True),    # the usual values stored signed
])
def test_hu_rescale_is_exact(phantom, tmp_path: Path, slope, intercept, signed):
    paths = bi.write_series(tmp_path / "study", rescale_slope=slope, rescale_intercept=intercept, signed=signed)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == int(signed)
    assert float(ds.RescaleSlope) == slope and float(ds.RescaleIntercept) == intercept
    assert_matches_phantom(ctio.load_scan(tmp_path / "study"), phantom)


def _write_feet_first(phantom: ph.Phantom, folder: Path) -> list[Path]:
    """The phantom as a feet-first supine series: rows run to the patient's right (IOP -1 0 0 0 1 0),
    the slice normal points to the feet, and the files are numbered from the feet."""
    nz, ny, nx = phantom.hu.shape
    sz, sy, sx = phantom.spacing_mm
    ox, oy, oz = phantom.origin_mm
    mirrored = ph.Phantom(hu=np.ascontiguousarray(phantom.hu[:, :, ::-1]), lung_labels=phantom.lung_labels,
                          lesion_labels=phantom.lesion_labels, spacing_mm=phantom.spacing_mm,
                          origin_mm=phantom.origin_mm)
    paths = bi.write_series(folder, mirrored)
    for k, path in enumerate(paths):
        def change(ds, k=k):
            ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [ph._ds_str(ox + (nx - 1) * sx), ph._ds_str(oy), ph._ds_str(oz + k * sz)]
            ds.PatientPosition = "FFS"
            ds.InstanceNumber = k + 1
        bi.edit(path, change)
    return paths


def test_feet_first_series_loads_in_lps(phantom, tmp_path: Path):
    _write_feet_first(phantom, tmp_path / "study")
    scan = ctio.load_scan(tmp_path / "study")
    assert scan.meta["reoriented_from"] is not None  # read as R?I, turned to LPS
    assert_matches_phantom(scan, phantom)


def test_geometry_of_anisotropic_off_centre_grid(tmp_path: Path):
    """Non-square pixels, a non-round origin: spacing (z, y, x) and origin come back as written."""
    base = bi.tiny_phantom()
    odd = ph.Phantom(hu=base.hu[:, 4:60, :], lung_labels=base.lung_labels[:, 4:60], lesion_labels=base.lesion_labels[:, 4:60],
                     spacing_mm=(20.0, 5.25, 5.5), origin_mm=(-171.125, -150.5, -309.75))
    bi.write_series(tmp_path / "study", odd)
    assert_matches_phantom(ctio.load_scan(tmp_path / "study"), odd)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_files_without_preamble_or_file_meta(phantom, tmp_path: Path, implicit_vr: bool):
    """Old exports: no 128-byte preamble, no 'DICM', no file meta (the encoding is found by reading)."""
    paths = bi.write_series(tmp_path / "study")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.preamble = None
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        pydicom.dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=True)
    assert paths[0].read_bytes()[128:132] != b"DICM"
    assert_matches_phantom(ctio.load_scan(tmp_path / "study"), phantom)


def test_links_and_hidden_files_are_ignored(phantom, tmp_path: Path):
    import os

    study = tmp_path / "study"
    bi.write_series(study / "series")
    os.symlink(tmp_path / "nowhere", study / "dangling")
    os.symlink(study, study / "series" / "loop")  # a link back up: not followed
    (study / ".DS_Store").write_bytes(b"\x00\x01junk")
    (study / ".hidden").mkdir()
    bi.write_series(study / ".hidden", tag="hidden")
    found = ctio.find_series(study)
    assert [s.series_uid for s in found] == [ph.uid_from("series", "main")]
    assert_matches_phantom(ctio.load_scan(study), phantom)


# --------------------------------------------------------------------------------------------------
# Series selection among decoys, and `ctquant series`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoy_study(tmp_path_factory) -> Path:
    """A study folder: the main series (nested, shuffled), a short thick series, a localizer, a dose SR,
    a dose screen (secondary capture) and a README."""
    root = tmp_path_factory.mktemp("decoys") / "study"
    p = bi.tiny_phantom()
    bi.write_series(root / "DICOM" / "S0001", shuffle_names=True, nested=True)
    ph.write_thick_series(p, root / "DICOM" / "S0002", n_slices=4,
                          **bi.series_kwargs("thick", series_number=3, slice_thickness_mm=60.0,
                                             convolution_kernel="B70f"))
    common = dict(study_uid=ph.uid_from("study", "bad-inputs"), study_date=bi.STUDY_DATE,
                  patient_id=bi.PATIENT_ID, patient_name=bi.PATIENT_NAME)
    ph.write_localizer(p, root / "DICOM" / "scout.dcm", series_uid=ph.uid_from("series", "scout"),
                       frame_of_reference_uid=ph.uid_from("for", "bad-inputs"), **common)
    ph.write_dose_sr(root / "dose" / "sr.dcm", series_uid=ph.uid_from("series", "sr"), **common)
    ph.write_dose_screen(root / "dose" / "screen.dcm", series_uid=ph.uid_from("series", "screen"), **common)
    (root / "README").write_text("Exported from PACS. Not DICOM.\n")
    (root / "notes.dcm").write_text("not DICOM either\n")
    return root


def test_series_selection_among_decoys(decoy_study: Path, phantom):
    found = ctio.find_series(decoy_study)
    by_uid = {s.series_uid: s for s in found}
    main, thick = ph.uid_from("series", "main"), ph.uid_from("series", "thick")
    assert set(by_uid) == {main, thick, ph.uid_from("series", "scout"), ph.uid_from("series", "sr"),
                           ph.uid_from("series", "screen")}
    assert by_uid[main].n_images == 12 and by_uid[thick].n_images == 4
    assert by_uid[ph.uid_from("series", "scout")].unsuitable_reason() == "localizer/scout image"
    assert "is not CT" in by_uid[ph.uid_from("series", "sr")].unsuitable_reason()
    assert "is not CT" in by_uid[ph.uid_from("series", "screen")].unsuitable_reason()
    assert ctio.select_series(found).series_uid == main
    scan = ctio.load_scan(decoy_study)
    assert scan.meta["series_instance_uid"] == main
    assert_matches_phantom(scan, phantom)
    # --series picks another one
    other = ctio.load_scan(decoy_study, series_uid=thick)
    thick_truth = ph.thick_slab_phantom(phantom, 4)
    assert other.meta["series_instance_uid"] == thick
    np.testing.assert_array_equal(other.hu, thick_truth.hu)
    np.testing.assert_allclose(other.spacing_mm, thick_truth.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(other.origin_mm, thick_truth.origin_mm, atol=1e-3)
    with pytest.raises(InputError, match="localizer"):
        ctio.load_scan(decoy_study, series_uid=ph.uid_from("series", "scout"))


def test_series_command_lists_every_series(decoy_study: Path):
    code, stdout, stderr = bi.run_in_process(["series", str(decoy_study)])
    assert code == 0, stderr
    assert "5 series in" in stdout
    main_line = next(line for line in stdout.splitlines() if "Thorax main" in line)
    assert main_line.split("│")[1].strip() == "*"  # the one quantify picks
    for cells in (["CT", "Thorax main", "12", "20", "5.50x5.50", "B30f", "20200401", ph.uid_from("series", "main")],
                  ["CT", "Thorax thick", "4", "60", "B70f", ph.uid_from("series", "thick")],
                  ["CT", "Topogram AP", "1", ph.uid_from("series", "scout")],
                  ["OT", "Dose Info"], ["SR", "Dose Report"]):
        line = next(line for line in stdout.splitlines() if cells[1] in line)
        for cell in cells:
            assert cell in line, (cell, line)
    assert "skipped: localizer/scout image" in stdout and "skipped: modality SR is not CT" in stdout
    assert bi.PATIENT_ID not in stdout + stderr and "Doe" not in stdout + stderr


# --------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes, Enhanced CT
# --------------------------------------------------------------------------------------------------

SYNTAXES = {
    "RLE Lossless": "1.2.840.10008.1.2.5",
    "JPEG-LS Lossless": "1.2.840.10008.1.2.4.80",
    "JPEG 2000 Lossless": "1.2.840.10008.1.2.4.90",
    "JPEG Lossless SV1": "1.2.840.10008.1.2.4.70",
    "Deflated Explicit VR LE": "1.2.840.10008.1.2.1.99",
}


def _encoder_missing(syntax: str) -> str | None:
    from pydicom.pixels import get_encoder
    from pydicom.uid import UID

    if not UID(syntax).is_compressed:
        return None
    try:
        encoder = get_encoder(syntax)
    except Exception as exc:  # noqa: BLE001 - pydicom has no encoder for it at all
        return f"pydicom cannot encode {UID(syntax).name}: {str(exc).splitlines()[0]}"
    if not encoder.is_available:
        return f"no encoder plugin for {UID(syntax).name} is installed"
    return None


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_compressed_series_decode_to_identical_hu(name: str, phantom, tmp_path: Path):
    syntax = SYNTAXES[name]
    missing = _encoder_missing(syntax)
    if missing:
        pytest.skip(missing)
    paths = bi.write_series(tmp_path / "study", transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    scan = ctio.load_scan(tmp_path / "study")
    assert_matches_phantom(scan, phantom)
    assert scan.meta["pixel_decoder"] == ("gdcm" if syntax in ctio.GDCM_SYNTAXES else "pydicom")


def test_gdcm_decoding_inverts_a_non_unit_rescale(phantom, tmp_path: Path):
    """GDCM applies RescaleSlope/Intercept itself; the stored values it gives back are the file's."""
    paths = bi.write_series(tmp_path / "study", transfer_syntax=SYNTAXES["JPEG-LS Lossless"], rescale_slope=0.5,
                            rescale_intercept=-1100.0)
    assert float(pydicom.dcmread(paths[0], stop_before_pixels=True).RescaleSlope) == 0.5
    scan = ctio.load_scan(tmp_path / "study")
    assert scan.meta["pixel_decoder"] == "gdcm"
    assert_matches_phantom(scan, phantom)


def test_noisy_gdcm_decoding_is_redone_by_pydicom(phantom, tmp_path: Path, monkeypatch):
    """A decoder that writes on stderr while GDCM decodes (libjpeg's "Corrupt JPEG data", after which it
    goes on) sends the whole series to pydicom, which refuses corrupt data."""
    bi.write_series(tmp_path / "study", transfer_syntax=SYNTAXES["JPEG-LS Lossless"])
    gdcm_values = ctio._gdcm_stored_values

    def noisy(*args):
        os.write(2, b"Corrupt JPEG data: premature end of data segment\n")
        return gdcm_values(*args)

    monkeypatch.setattr(ctio, "_gdcm_stored_values", noisy)
    scan = ctio.load_scan(tmp_path / "study")
    assert scan.meta["pixel_decoder"] == "pydicom"
    assert_matches_phantom(scan, phantom)


@pytest.mark.parametrize("name", ["ricord-1a-000082", "abdomen-jpeg2000"])
def test_real_jpeg_series_decode_the_same_with_gdcm_and_pydicom(name: str, shared_data: Path, monkeypatch):
    """The real JPEG Lossless and JPEG 2000 series: GDCM (threads in parallel) and pydicom give the same HU."""
    folder = shared_data / "real-ct" / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not in ../shared/data/real-ct")
    fast = ctio.load_scan(folder)
    monkeypatch.setattr(ctio, "GDCM_SYNTAXES", frozenset())
    reference = ctio.load_scan(folder)
    assert (fast.meta["pixel_decoder"], reference.meta["pixel_decoder"]) == ("gdcm", "pydicom")
    np.testing.assert_array_equal(fast.hu, reference.hu)
    assert fast.spacing_mm == reference.spacing_mm and fast.origin_mm == reference.origin_mm


def test_rle_and_jpegls_at_least_are_available():
    assert _encoder_missing(SYNTAXES["RLE Lossless"]) is None
    assert _encoder_missing(SYNTAXES["JPEG-LS Lossless"]) is None


def test_enhanced_ct_multiframe(phantom, tmp_path: Path):
    """One Enhanced CT file with shared and per-frame functional groups, frames stored head first."""
    path = bi.write_enhanced_ct(phantom, tmp_path / "study" / "enhanced.dcm", rescale_slope=0.5,
                                rescale_intercept=-1100.0)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == ctio.ENHANCED_CT_IMAGE_STORAGE and int(ds.NumberOfFrames) == phantom.hu.shape[0]
    info = ctio.find_series(tmp_path / "study")[0]
    assert info.n_images == phantom.hu.shape[0] and info.unsuitable_reason() is None
    for source in (tmp_path / "study", path):  # the folder or the file itself
        assert_matches_phantom(ctio.load_scan(source), phantom)


def test_legacy_converted_enhanced_ct_from_highdicom(phantom, tmp_path: Path):
    hd = pytest.importorskip("highdicom")
    paths = bi.write_series(tmp_path / "single")
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "multi").mkdir()
    image.save_as(tmp_path / "multi" / "legacy.dcm")
    scan = ctio.load_scan(tmp_path / "multi")
    assert_matches_phantom(scan, phantom)


# --------------------------------------------------------------------------------------------------
# NIfTI, NRRD, MetaImage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_files_match_the_dicom(phantom, tmp_path: Path, suffix: str):
    bi.write_series(tmp_path / "study")
    dicom = ctio.load_scan(tmp_path / "study")
    path = bi.phantom_volume(tmp_path / f"scan{suffix}", phantom)
    scan = ctio.load_scan(path)
    assert_matches_phantom(scan, phantom)
    np.testing.assert_array_equal(scan.hu, dicom.hu)
    np.testing.assert_allclose(scan.origin_mm, dicom.origin_mm, atol=1e-4)
    np.testing.assert_allclose(scan.spacing_mm, dicom.spacing_mm, atol=1e-5)
    assert scan.meta["format"] == suffix.lstrip(".") and scan.meta["reoriented_from"] is None


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "RPI"])
def test_reoriented_volume_comes_back_in_lps(phantom, tmp_path: Path, orientation: str):
    path = bi.phantom_volume(tmp_path / f"scan_{orientation}.nii.gz", phantom, direction=orientation)
    stored = sitk.ReadImage(str(path))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(stored.GetDirection()) == orientation
    scan = ctio.load_scan(path)
    assert scan.meta["reoriented_from"] == orientation
    assert_matches_phantom(scan, phantom)
    # labels go back to the file's own orientation and grid
    labels = (scan.hu > -500).astype(np.uint8)
    ctio.write_label_image(scan, labels, tmp_path / "labels.nii.gz")
    written = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    np.testing.assert_allclose(written.GetDirection(), stored.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), stored.GetOrigin(), atol=1e-3)
    back, spacing = ctio.read_label_image(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(back, labels)


def test_float_volume_is_rounded_to_int16_hu(phantom, tmp_path: Path):
    path = bi.write_volume(tmp_path / "float.nrrd", phantom.hu.astype(np.float32) + 0.2, phantom.spacing_mm,
                           origin=phantom.origin_mm)
    assert_matches_phantom(ctio.load_scan(path), phantom)


# --------------------------------------------------------------------------------------------------
# No patient identity in what ctquant keeps or prints
# --------------------------------------------------------------------------------------------------


def test_patient_identity_never_in_meta(decoy_study: Path, tmp_path: Path):
    scan = ctio.load_scan(decoy_study)
    text = json.dumps(scan.meta, default=str)
    for secret in (bi.PATIENT_ID, "Doe", "Jane", "Secret"):
        assert secret not in text
    assert scan.meta["subject_hash"] == ctio.subject_hash(bi.PATIENT_ID)
    assert scan.meta["subject_hash"].startswith("sub-") and len(scan.meta["subject_hash"]) == 14
    # the headers kept for DICOM SEG do carry the patient module (SEG must reference the patient)
    assert str(scan.source_datasets[0].PatientID) == bi.PATIENT_ID
    code, stdout, stderr = bi.run_in_process(["series", str(decoy_study)])
    assert bi.PATIENT_ID not in stdout + stderr and "Jane" not in stdout + stderr


def test_header_text_is_not_markup_or_multiline(tmp_path: Path):
    """Descriptions are data: rich markup and newlines in them neither break nor fake the listing."""
    bi.write_series(tmp_path / "study", series_description="[/bold] [red]x\nINJECTED")
    code, stdout, stderr = bi.run_in_process(["series", str(tmp_path / "study")])
    assert code == 0, stderr
    assert "[/bold] [red]x\\nINJECTED" in stdout
    assert not any(line.startswith("INJECTED") for line in stdout.splitlines())


def test_load_scan_with_warnings_as_errors(phantom, tmp_path: Path):
    """A clean series loads without any warning at all."""
    bi.write_series(tmp_path / "study")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches_phantom(ctio.load_scan(tmp_path / "study"), phantom)


# --------------------------------------------------------------------------------------------------
# The shipped sample
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("timepoint", ["baseline", "day14"])
def test_shipped_sample_loads_exactly(sample_dir: Path, timepoint: str):
    """sample_dicom/: the HU voxels hash to truth.json's and the truth masks share the grid."""
    import hashlib

    document = json.loads((sample_dir / "truth.json").read_text())
    truth = document["timepoints"][timepoint]
    scan = ctio.load_scan(sample_dir / truth["dicom_dir"])
    assert scan.meta["series_instance_uid"] == truth["series_instance_uid"]
    assert scan.hu.shape[0] == truth["n_slices"]
    assert hashlib.sha256(np.ascontiguousarray(scan.hu, dtype=np.int16).tobytes()).hexdigest() == truth["pixel_sha256"]
    np.testing.assert_allclose(scan.origin_mm, truth["origin_mm"], atol=1e-3)
    np.testing.assert_allclose(scan.direction, truth["direction"], atol=1e-6)
    labels, spacing = ctio.read_label_image(sample_dir / truth["truth_masks"]["lungs"])
    assert labels.shape == scan.hu.shape
    np.testing.assert_allclose(spacing, scan.spacing_mm, atol=1e-4)
    assert document["patient_id"] not in json.dumps(scan.meta, default=str)
