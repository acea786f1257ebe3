"""DICOM SEG writing and reading (ctquant.outputs.dicomseg): round trips, references, codes, refusals."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from ctquant.outputs.dicomseg import (LOCAL_SCHEME, check_source, conformant_header, conformant_person_name, read_seg,
                              read_seg_arrays, write_seg)
from ctquant.errors import InputError
from ctquant.io.scans import load_scan


def make_ct_series(folder: Path, n: int = 12, rows: int = 48, cols: int = 40,
                   spacing: tuple[float, float, float] = (2.5, 0.8, 0.75),
                   orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), patient_name: str = "Secret^Patient",
                   referenced_study_class: bool = True) -> Path:
    """A tiny CT series (air around a -800 HU block), files in shuffled order, with a patient name/ID.

    ``referenced_study_class=False`` gives it a ReferencedStudySequence item without its SOP Class UID
    (as TCIA's Lung-PET-CT-Dx series have)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    origin = np.array([-15.0, -20.0, -100.0])
    for k in np.random.default_rng(1).permutation(n):
        ds, meta, uid = Dataset(), FileMetaDataset(), generate_uid()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, "PID-SECRET-42", "", "O"
        ref = Dataset()
        ref.ReferencedSOPInstanceUID = "1.2.3.4"
        if referenced_study_class:
            ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        ds.ReferencedStudySequence = [ref]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20200401", "120000", "", "1"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CT", 3, int(k) + 1
        ds.Manufacturer, ds.ImageType, ds.PositionReferenceIndicator = "test", ["ORIGINAL", "PRIMARY", "AXIAL"], ""
        ds.ImagePositionPatient = [float(v) for v in origin + k * spacing[0] * normal]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = np.zeros((rows, cols), np.int16)
        pixels[8:rows - 8, 6:cols - 6] = 224
        ds.PixelData = pixels.tobytes()
        pydicom.dcmwrite(folder / f"img{k:03d}.dcm", ds, enforce_file_format=True)
    return folder


def toy_labels(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Lungs (1 right at low x, 2 left), GGO and consolidation inside them, some slices empty."""
    lungs = np.zeros(shape, np.uint8)
    lesions = np.zeros(shape, np.uint8)
    lungs[2:9, 10:30, 8:19] = 1
    lungs[3:10, 10:30, 21:32] = 2
    lesions[4:6, 12:15, 10:14] = 1
    lesions[4, 20:23, 23:27] = 1
    lesions[7, 20:25, 22:28] = 2
    return lungs, lesions


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = make_ct_series(tmp_path_factory.mktemp("toyct") / "ct")
    scan = load_scan(folder)
    lungs, lesions = toy_labels(scan.hu.shape)
    path = write_seg(scan, lungs, lesions, tmp_path_factory.mktemp("toyseg") / "seg.dcm", method="hu")
    return scan, lungs, lesions, path


def test_round_trip_exact_per_segment(toy):
    scan, lungs, lesions, path = toy
    back_lungs, back_lesions = read_seg_arrays(path, scan.source_datasets)
    assert np.array_equal(back_lungs, lungs)
    assert np.array_equal(back_lesions, lesions)
    # The same through the SimpleITK reader, placed on the scan's grid.
    assert np.array_equal(sitk.GetArrayFromImage(read_seg(path, "lungs", reference=scan)), lungs)
    assert np.array_equal(sitk.GetArrayFromImage(read_seg(path, "lesions", reference=scan)), lesions)


def test_read_seg_without_reference_is_physically_placed(toy):
    scan, lungs, lesions, path = toy
    image = read_seg(path, "lesions")
    assert image.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(image.GetSpacing(), scan.spacing_mm[::-1])
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    # Only the slices between the first and last stored frame (2..9 hold lungs or lesions).
    assert image.GetSize()[2] == 8
    assert np.allclose(image.GetOrigin(), (scan.origin_mm[0], scan.origin_mm[1], scan.origin_mm[2] + 2 * 2.5))
    assert np.array_equal(sitk.GetArrayFromImage(image), lesions[2:10])


def test_references_codes_and_omitted_frames(toy):
    scan, lungs, lesions, path = toy
    ds = pydicom.dcmread(path)
    source = scan.source_datasets[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    source_uids = {d.SOPInstanceUID for d in scan.source_datasets}
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced <= source_uids
    per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                 for f in ds.PerFrameFunctionalGroupsSequence}
    assert per_frame <= source_uids
    # Empty frames omitted: one frame per (segment, non-empty slice).
    masks = [lungs == 1, lungs == 2, lesions == 1, lesions == 2]
    assert int(ds.NumberOfFrames) == sum(int(m.any(axis=(1, 2)).sum()) for m in masks) == 7 + 7 + 2 + 1
    segs = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert [segs[i].SegmentLabel for i in (1, 2, 3, 4)] == ["Right lung", "Left lung", "Ground-glass opacity",
                                                          "Consolidation"]

    def code(item, name):
        c = item[name][0]
        return (c.CodingSchemeDesignator, c.CodeValue)

    for number, side in ((1, ("SCT", "24028007")), (2, ("SCT", "7771000"))):
        assert code(segs[number], "SegmentedPropertyCategoryCodeSequence") == ("SCT", "91723000")
        assert code(segs[number], "SegmentedPropertyTypeCodeSequence") == ("SCT", "39607008")
        assert code(segs[number].SegmentedPropertyTypeCodeSequence[0],
                    "SegmentedPropertyTypeModifierCodeSequence") == side
    assert code(segs[3], "SegmentedPropertyTypeCodeSequence") == ("DCM", "112120")
    assert code(segs[4], "SegmentedPropertyTypeCodeSequence") == ("SCT", "9656002")  # SNOMED CT Consolidation
    for number in (3, 4):
        assert code(segs[number], "SegmentedPropertyCategoryCodeSequence") == ("SCT", "49755003")
        assert code(segs[number], "AnatomicRegionSequence") == ("SCT", "39607008")
        algo = segs[number].SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName.startswith("ctquant") and "method=hu" in algo.AlgorithmParameters
    assert "CodingSchemeIdentificationSequence" not in ds  # no private codes left
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in ds.SegmentSequence)
    # highdicom reads it back as a valid Segmentation object.
    seg = hd.seg.segread(path)
    assert seg.get_segment_numbers() == [1, 2, 3, 4]


def test_reoriented_series_round_trip(tmp_path):
    # Rows run to the patient's right, columns anteriorly: loaded reoriented to LPS, headers re-read.
    folder = make_ct_series(tmp_path / "ct", n=10, orientation=(-1, 0, 0, 0, -1, 0))
    scan = load_scan(folder)
    assert scan.meta["reoriented_from"] and not scan.source_datasets
    lungs, lesions = toy_labels(scan.hu.shape)
    path = write_seg(scan, lungs, lesions, tmp_path / "seg.dcm", method="hu")
    assert np.array_equal(sitk.GetArrayFromImage(read_seg(path, "lungs", reference=scan)), lungs)
    assert np.array_equal(sitk.GetArrayFromImage(read_seg(path, "lesions", reference=scan)), lesions)


def test_nifti_source_refused(tmp_path, toy):
    scan = toy[0]
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(scan.to_sitk(), str(nifti))
    volume = load_scan(nifti)
    lungs, lesions = toy_labels(volume.hu.shape)
    with pytest.raises(InputError, match="DICOM SEG needs a DICOM source series"):
        check_source(volume)  # the early check, before any segmentation
    with pytest.raises(InputError, match="DICOM SEG needs a DICOM source series"):
        write_seg(volume, lungs, lesions, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_empty_segmentation_still_written(toy, tmp_path):
    scan = toy[0]
    empty = np.zeros(scan.hu.shape, np.uint8)
    path = write_seg(scan, empty, empty, tmp_path / "seg.dcm", method="hu")
    lungs, lesions = read_seg_arrays(path, scan.source_datasets)
    assert not lungs.any() and not lesions.any()


def test_read_seg_of_another_tool_by_label(toy, tmp_path):
    """A reader's SEG (e.g. from 3D Slicer) with generic codes is read by its segment labels."""
    scan, lungs, lesions, _ = toy
    algo = None
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=label,
            segmented_property_category=pydicom.sr.codedict.codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=pydicom.sr.codedict.codes.SCT.Lesion,
            algorithm_type="MANUAL", algorithm_identification=algo)
        for i, label in enumerate(["consolidation", "GGO"])]
    stack = np.stack([lesions == 2, lesions == 1], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=scan.source_datasets, pixel_array=stack, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="reader", manufacturer_model_name="x",
        software_versions="1", device_serial_number="1")
    seg.save_as(tmp_path / "reader.dcm")
    image = read_seg(tmp_path / "reader.dcm", "lesions", reference=scan)
    assert np.array_equal(sitk.GetArrayFromImage(image), lesions)
    with pytest.raises(InputError, match="no lungs segments"):
        read_seg(tmp_path / "reader.dcm", "lungs")


def test_read_seg_refuses_non_seg(toy):
    scan = toy[0]
    with pytest.raises(InputError, match="not a readable DICOM SEG"):
        read_seg(scan.meta["source_files"][0])


def test_sample_study_truth_round_trip(sample_dir, tmp_path):
    """The shipped sample's truth masks survive a SEG round trip on its baseline series."""
    from ctquant.io.scans import read_label_image

    scan = load_scan(sample_dir / "baseline")
    truth = sample_dir / "truth"
    lungs_path = next(iter(sorted(truth.glob("baseline*lung*"))), None)
    lesions_path = next(iter(sorted(truth.glob("baseline*lesion*"))), None)
    if lungs_path is None or lesions_path is None:
        pytest.skip(f"no baseline truth masks in {truth}: {sorted(p.name for p in truth.iterdir())}")
    lungs, _ = read_label_image(lungs_path)
    lesions, _ = read_label_image(lesions_path)
    path = write_seg(scan, lungs, lesions, tmp_path / "seg.dcm", method="hu")
    assert pydicom.dcmread(path, stop_before_pixels=True).FrameOfReferenceUID == \
        scan.source_datasets[0].FrameOfReferenceUID
    back_lungs, back_lesions = read_seg_arrays(path, scan.source_datasets)
    assert np.array_equal(back_lungs, lungs)
    assert np.array_equal(back_lesions, lesions)


def test_uncompressed_option_and_size(toy, tmp_path):
    scan, lungs, lesions, deflated = toy
    plain = write_seg(scan, lungs, lesions, tmp_path / "plain.dcm", method="hu", compression="none")
    assert pydicom.dcmread(plain, stop_before_pixels=True).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert deflated.stat().st_size < plain.stat().st_size / 2
    assert np.array_equal(read_seg_arrays(plain, scan.source_datasets)[1], lesions)
    with pytest.raises(ValueError, match="compression"):
        write_seg(scan, lungs, lesions, tmp_path / "x.dcm", compression="jpeg")
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("value, expected", [("Lung_Dx-A0001", "Lung_Dx-A0001^"), ("Doe^John", "Doe^John"),
                                             ("", ""), ("Yamada=山田", "Yamada=山田")])
def test_conformant_person_name(value, expected):
    assert conformant_person_name(value) == expected


def test_non_conformant_source_header_not_copied(tmp_path):
    folder = make_ct_series(tmp_path / "ct", n=10, patient_name="Lung_Dx-A0001", referenced_study_class=False)
    scan = load_scan(folder)
    source = scan.source_datasets[0]
    clean = conformant_header(source)
    assert "ReferencedStudySequence" not in clean and "PixelData" not in clean
    assert str(clean.PatientName) == "Lung_Dx-A0001^"
    # The source itself is left as it was.
    assert str(source.PatientName) == "Lung_Dx-A0001" and "ReferencedStudySequence" in source
    lungs, lesions = toy_labels(scan.hu.shape)
    ds = pydicom.dcmread(write_seg(scan, lungs, lesions, tmp_path / "seg.dcm", method="hu"))
    assert "ReferencedStudySequence" not in ds
    assert str(ds.PatientName) == "Lung_Dx-A0001^" and ds.PatientID == source.PatientID
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.StudyID == source.StudyID


def test_conformant_reference_items_are_kept(toy):
    source = toy[0].source_datasets[0]
    clean = conformant_header(source)
    assert clean.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert str(clean.PatientName) == "Secret^Patient"


def test_legacy_private_consolidation_code_still_read(toy, tmp_path):
    """SEGs written by ctquant 0.1 coded consolidation as 99CTQ CTQ0002: they still read back."""
    scan, lungs, lesions, path = toy
    ds = pydicom.dcmread(path)
    item = ds.SegmentSequence[3].SegmentedPropertyTypeCodeSequence[0]
    item.CodeValue, item.CodingSchemeDesignator = "CTQ0002", LOCAL_SCHEME
    ds.SegmentSequence[3].SegmentLabel = "Segment 4"  # so that only the code can identify it
    ds.save_as(tmp_path / "old.dcm")
    assert np.array_equal(read_seg_arrays(tmp_path / "old.dcm", scan.source_datasets)[1], lesions)
