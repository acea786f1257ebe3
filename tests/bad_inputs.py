"""A generated corpus of bad inputs for ctquant's ingest, and the DICOM helpers the ingest tests share.

Every case builds itself in an empty folder from the synthetic phantom (:mod:`ctquant.synthetic.phantom`), in a
few milliseconds: nothing is committed as a binary blob. A case knows the exit code ctquant must give
(see :mod:`ctquant.errors`), a substring of the reason and the file (or folder) the message must name.

    python tests/bad_inputs.py --table            # markdown table of every case and ctquant's message
    python tests/bad_inputs.py --table --write    # ... written to tests/BAD_INPUTS.md
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DSequence

from ctquant.synthetic import phantom as ph

# Tiny phantom for error cases: the whole chest in 12 × 64 × 64 voxels.
TINY_SHAPE = (12, 64, 64)
TINY_SPACING = (20.0, 5.5, 5.5)
PATIENT_ID = "PID-0042-SECRET"
PATIENT_NAME = "Doe^Jane^Secret"
STUDY_DATE = "20200401"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@functools.lru_cache(maxsize=None)
def tiny_phantom(seed: int = 1) -> ph.Phantom:
    """The small phantom every error case is made from (cached: made once per process)."""
    return ph.make_phantom(TINY_SHAPE, TINY_SPACING, seed=seed)


def series_kwargs(tag: str = "main", **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`ctquant.synthetic.phantom.write_dicom_series` with UIDs derived from ``tag``."""
    kwargs = dict(study_uid=ph.uid_from("study", "bad-inputs"), series_uid=ph.uid_from("series", tag),
                  frame_of_reference_uid=ph.uid_from("for", "bad-inputs"), study_date=STUDY_DATE,
                  series_description=f"Thorax {tag}", series_number=2, patient_id=PATIENT_ID,
                  patient_name=PATIENT_NAME, shuffle_names=False)
    kwargs.update(overrides)
    return kwargs


def write_series(out_dir: Path, phantom: ph.Phantom | None = None, tag: str = "main", **overrides: Any) -> list[Path]:
    """Write a phantom (default: the tiny one) as a CT series; returns the files in z order."""
    return ph.write_dicom_series(phantom or tiny_phantom(), out_dir, **series_kwargs(tag, **overrides))


def edit(path: Path, change: Callable[[Dataset], Any], *, like_original: bool = True) -> Path:
    """Read a DICOM file, apply ``change`` to its dataset and write it back."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=not like_original)
    return path


def patch_bytes(path: Path, old: bytes, new: bytes) -> Path:
    """Replace bytes in a file (same length), for values pydicom refuses to write (garbage in a DS)."""
    data = path.read_bytes()
    if len(old) != len(new) or data.count(old) != 1:
        raise ValueError(f"cannot patch {old!r} in {path}")
    path.write_bytes(data.replace(old, new))
    return path


def write_with_syntax(path: Path, syntax: str, *, encapsulate: bool = False) -> Path:
    """Relabel a file's transfer syntax (explicit VR little endian data kept), e.g. to one without a decoder."""
    ds = pydicom.dcmread(path)
    if encapsulate:
        from pydicom.encaps import encapsulate as _encapsulate

        ds.PixelData = _encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    return path


def write_volume(path: Path, array: np.ndarray, spacing_zyx: Sequence[float] = TINY_SPACING,
                 origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] | None = None,
                 is_vector: bool = False) -> Path:
    """Write a numpy (z, y, x) array as NIfTI/NRRD/MHA with SimpleITK."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == len(spacing_zyx):
        image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    if image.GetDimension() == len(origin):
        image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(direction))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def phantom_volume(path: Path, phantom: ph.Phantom | None = None, direction: str = "LPS") -> Path:
    """Write the phantom as a volume file in the given orientation (``LPS`` or ``RAS``...)."""
    phantom = phantom or tiny_phantom()
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing(tuple(float(s) for s in phantom.spacing_mm[::-1]))
    image.SetOrigin(tuple(float(o) for o in phantom.origin_mm))
    image.SetDirection(tuple(float(d) for d in phantom.direction))
    if direction != "LPS":
        image = sitk.DICOMOrient(image, direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_enhanced_ct(phantom: ph.Phantom, path: Path, *, tag: str = "enhanced", rescale_slope: float = 1.0,
                      rescale_intercept: float = -1024.0, frame_order: Sequence[int] | None = None,
                      drop_position_of_frame: int | None = None) -> Path:
    """Write the phantom as one Enhanced CT Image Storage file with its functional groups.

    Shared groups hold the pixel measures, the plane orientation and the rescale; each frame holds
    its plane position (frames in ``frame_order``, default head first as scanners often store them).
    """
    nz, ny, nx = phantom.hu.shape
    sz, sy, sx = phantom.spacing_mm
    ox, oy, oz = phantom.origin_mm
    order = list(frame_order) if frame_order is not None else list(range(nz))[::-1]
    stored = np.rint((phantom.hu.astype(np.float64) - rescale_intercept) / rescale_slope).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ph.uid_from(tag, "sop")
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StudyInstanceUID = ph.uid_from("study", "bad-inputs")
    ds.SeriesInstanceUID = ph.uid_from("series", tag)
    ds.FrameOfReferenceUID = ph.uid_from("for", "bad-inputs")
    ds.StudyDate = ds.ContentDate = STUDY_DATE
    ds.ContentTime = "093000"
    ds.SeriesNumber, ds.InstanceNumber = 5, 1
    ds.SeriesDescription = "Thorax enhanced"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = len(order)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [ph._ds_str(sy), ph._ds_str(sx)]
    measures.SliceThickness = ph._ds_str(sz)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    transform = Dataset()
    transform.RescaleIntercept = ph._ds_str(rescale_intercept)
    transform.RescaleSlope = ph._ds_str(rescale_slope)
    transform.RescaleType = "HU"
    shared.PixelMeasuresSequence = DSequence([measures])
    shared.PlaneOrientationSequence = DSequence([orientation])
    shared.PixelValueTransformationSequence = DSequence([transform])
    ds.SharedFunctionalGroupsSequence = DSequence([shared])
    frames = []
    for index, k in enumerate(order):
        frame = Dataset()
        if index != drop_position_of_frame:
            position = Dataset()
            position.ImagePositionPatient = [ph._ds_str(ox), ph._ds_str(oy), ph._ds_str(oz + k * sz)]
            frame.PlanePositionSequence = DSequence([position])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        frame.FrameContentSequence = DSequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DSequence(frames)
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input.

    ``build(root)`` makes it inside the empty folder ``root`` and returns (the path given to
    ``ctquant quantify``, the path its error message must name).
    """

    name: str
    description: str
    build: Callable[[Path], tuple[Path, Path]]
    exit_code: int
    reason: str
    args: tuple[str, ...] = ()
    skip: Callable[[], str | None] | None = None

    def skip_reason(self) -> str | None:
        return self.skip() if self.skip else None


CASES: list[Case] = []


def case(exit_code: int, reason: str, description: str, args: Sequence[str] = (),
         skip: Callable[[], str | None] | None = None) -> Callable:
    def register(build: Callable[[Path], tuple[Path, Path]]) -> Callable:
        CASES.append(Case(build.__name__, description, build, exit_code, reason, tuple(args), skip))
        return build
    return register


def _as_root() -> str | None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "running as root: file permissions do not stop reading (see test_permission_denied_simulated)"
    return None


def _study(root: Path) -> tuple[Path, list[Path]]:
    folder = root / "study"
    return folder, write_series(folder)


# -- paths and files that are not DICOM at all -----------------------------------------------------

@case(3, "no such file or folder", "a path that does not exist")
def path_missing(root: Path):
    path = root / "no-such-study"
    return path, path


@case(3, "folder is empty", "an empty folder")
def empty_folder(root: Path):
    path = root / "study"
    path.mkdir()
    return path, path


@case(3, "empty file (0 bytes)", "a zero-byte file named .dcm given as input")
def zero_byte_file(root: Path):
    path = root / "IM0001.dcm"
    path.touch()
    return path, path


@case(3, "only empty files", "a folder of zero-byte .dcm files")
def zero_byte_folder(root: Path):
    folder = root / "study"
    folder.mkdir()
    for k in range(3):
        (folder / f"IM{k:04d}.dcm").touch()
    return folder, folder


@case(3, "no DICOM files found", "text and random bytes in files named .dcm")
def not_dicom_named_dcm(root: Path):
    folder = root / "study"
    folder.mkdir()
    (folder / "IM0001.dcm").write_text("this is not a DICOM file\n" * 20)
    (folder / "IM0002.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "README.txt").write_text("study exported from PACS\n")
    return folder, folder


@case(3, "not a DICOM file", "a non-DICOM file named .dcm given as input")
def not_dicom_file(root: Path):
    path = root / "scan.dcm"
    path.write_text("not a DICOM file\n" * 20)
    return path, path


@case(3, "only a DICOMDIR index", "a DICOMDIR whose image files are missing")
def dicomdir_only(root: Path):
    from pydicom.fileset import FileSet

    source = write_series(root / "source")
    folder = root / "study"
    fs = FileSet()
    for path in source[:3]:
        fs.add(str(path))
    fs.write(folder)
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
    shutil.rmtree(root / "source")
    return folder, folder


@case(3, "a DICOMDIR index, not an image", "the DICOMDIR file itself given as input")
def dicomdir_file(root: Path):
    folder = dicomdir_only(root)[0]
    return folder / "DICOMDIR", folder / "DICOMDIR"


@case(3, "pass it directly", "a folder holding a NIfTI volume instead of DICOM")
def volume_in_folder(root: Path):
    folder = root / "study"
    phantom_volume(folder / "scan.nii.gz")
    return folder, folder


# -- series that are not an axial CT volume ----------------------------------------------------------

@case(3, "modality MR is not CT", "an MR series")
def modality_mr(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, lambda ds: (setattr(ds, "Modality", "MR"), setattr(ds, "SOPClassUID", MR_IMAGE_STORAGE)))
    return folder, folder


@case(3, "modality CR is not CT", "a single CR radiograph")
def modality_cr(root: Path):
    folder, paths = _study(root)
    for path in paths[1:]:
        path.unlink()
    edit(paths[0], lambda ds: (setattr(ds, "Modality", "CR"), setattr(ds, "SOPClassUID", CR_IMAGE_STORAGE)))
    return folder, folder


@case(3, "a single slice is not a volume", "one CT slice")
def single_slice(root: Path):
    folder, paths = _study(root)
    for path in paths[1:]:
        path.unlink()
    return folder, folder


@case(3, "not an axial series", "a sagittal series")
def sagittal(root: Path):
    folder, paths = _study(root)
    for k, path in enumerate(paths):
        def change(ds, k=k):
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
            ds.ImagePositionPatient = [-100 + 5.5 * k, -170, 100]
        edit(path, change)
    return folder, folder


@case(3, "localizer/scout image", "only decoys: a localizer, a dose SR and a dose screen")
def decoys_only(root: Path):
    folder = root / "study"
    common = dict(study_uid=ph.uid_from("study", "bad-inputs"), study_date=STUDY_DATE, patient_id=PATIENT_ID,
                  patient_name=PATIENT_NAME)
    ph.write_localizer(tiny_phantom(), folder / "scout.dcm", series_uid=ph.uid_from("series", "scout"),
                       frame_of_reference_uid=ph.uid_from("for", "bad-inputs"), **common)
    ph.write_dose_sr(folder / "dose" / "sr.dcm", series_uid=ph.uid_from("series", "sr"), **common)
    ph.write_dose_screen(folder / "dose" / "screen.dcm", series_uid=ph.uid_from("series", "screen"), **common)
    return folder, folder


@case(3, "not found among", "--series names a UID that is not in the folder", args=("--series", "1.2.3.4.5"))
def series_uid_not_found(root: Path):
    folder, _ = _study(root)
    return folder, folder


@case(3, "cannot be quantified: localizer/scout image", "--series names the localizer",
      args=("--series", ph.uid_from("series", "scout")))
def series_uid_is_localizer(root: Path):
    folder, _ = _study(root)
    ph.write_localizer(tiny_phantom(), folder / "scout.dcm", study_uid=ph.uid_from("study", "bad-inputs"),
                       series_uid=ph.uid_from("series", "scout"), frame_of_reference_uid=ph.uid_from("for", "x"),
                       study_date=STUDY_DATE, patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
    return folder, folder


@case(3, "is not CT image storage", "RGB secondary captures (modality CT, SC storage)")
def rgb_secondary_capture(root: Path):
    folder, paths = _study(root)
    for path in paths:
        def change(ds):
            ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
            ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_STORAGE
            _make_rgb(ds)
        edit(path, change)
    return folder, folder


def _make_rgb(ds: Dataset) -> None:
    grey = (ds.pixel_array // 16).astype(np.uint8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()


@case(3, "colour image (RGB", "RGB pixels in CT image storage")
def rgb_ct(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, _make_rgb)
    return folder, paths[0]


@case(4, "duplicate slice position", "two series without SeriesInstanceUID that nothing else tells apart")
def no_series_uid(root: Path):
    # Files without SeriesInstanceUID are grouped by study, series number, frame of reference and grid;
    # two series alike in all of these are one "series" with every position twice: refused.
    folder = root / "study"
    paths = write_series(folder / "a", tag="a", series_description="Thorax")
    paths += write_series(folder / "b", tag="b", series_description="Thorax")
    for path in paths:
        edit(path, lambda ds: delattr(ds, "SeriesInstanceUID"))
    return folder, folder / "b" / paths[0].name


# -- slices that do not form a regular volume (exit 4) -----------------------------------------------

@case(4, "missing slice(s)", "a series with one slice missing")
def missing_slice(root: Path):
    folder, paths = _study(root)
    paths[5].unlink()
    return folder, paths[6]


@case(4, "duplicate slice position", "two slices at the same position")
def duplicate_position(root: Path):
    folder, paths = _study(root)
    copy = folder / "zz_duplicate"
    shutil.copy(paths[4], copy)
    edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", ph.uid_from("duplicate")))
    return folder, copy


@case(4, "mixed image sizes", "one slice of 32 × 32 in a 64 × 64 series")
def mixed_matrix(root: Path):
    folder, paths = _study(root)

    def change(ds):
        small = np.ascontiguousarray(ds.pixel_array[::2, ::2])
        ds.Rows, ds.Columns = small.shape
        ds.PixelData = small.tobytes()
    edit(paths[3], change)
    return folder, paths[3]


@case(4, "mixed pixel spacing", "PixelSpacing differs in one slice")
def mixed_pixel_spacing(root: Path):
    folder, paths = _study(root)
    edit(paths[3], lambda ds: setattr(ds, "PixelSpacing", ["4.0", "4.0"]))
    return folder, paths[3]


@case(4, "irregular slice spacing", "one slice gap 30 % off")
def irregular_gaps(root: Path):
    folder, paths = _study(root)

    def change(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 6.0]
    edit(paths[6], change)
    return folder, paths[6]


@case(4, "gantry tilt 20", "gantry tilt: positions sheared along y, GantryDetectorTilt 20")
def gantry_tilt(root: Path):
    folder, paths = _study(root)
    shear = math.tan(math.radians(20.0)) * TINY_SPACING[0]
    for k, path in enumerate(paths):
        def change(ds, k=k):
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, round(y + k * shear, 3), z]
            ds.GantryDetectorTilt = 20
        edit(path, change)
    return folder, folder


@case(4, "not two orthonormal vectors", "ImageOrientationPatient that is not orthonormal")
def non_orthonormal(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0.5]))
    return folder, paths[0]


@case(4, "missing ImagePositionPatient", "one slice without ImagePositionPatient")
def missing_image_position(root: Path):
    folder, paths = _study(root)
    edit(paths[4], lambda ds: delattr(ds, "ImagePositionPatient"))
    return folder, paths[4]


@case(4, "invalid PixelSpacing", "NaN in PixelSpacing")
def nan_pixel_spacing(root: Path):
    folder, paths = _study(root)
    edit(paths[4], lambda ds: setattr(ds, "PixelSpacing", ["nan", "nan"]))
    return folder, paths[4]


@case(4, "invalid PixelSpacing", "letters in PixelSpacing")
def garbage_pixel_spacing(root: Path):
    folder, paths = _study(root)
    edit(paths[4], lambda ds: setattr(ds, "PixelSpacing", ["1.2345", "6.7890"]))
    patch_bytes(paths[4], b"1.2345\\6.7890", b"abc\\defghijkl")
    return folder, paths[4]


@case(4, "missing or invalid plane position", "Enhanced CT with a frame lacking its plane position")
def enhanced_missing_position(root: Path):
    path = write_enhanced_ct(tiny_phantom(), root / "study" / "enhanced.dcm", drop_position_of_frame=3)
    return path.parent, path


# -- headers and pixel data that cannot be decoded (exit 3) -----------------------------------------

@case(3, "truncated pixel data", "a slice whose pixel data is cut short")
def truncated_pixel_data(root: Path):
    folder, paths = _study(root)
    paths[5].write_bytes(paths[5].read_bytes()[:-3000])
    return folder, paths[5]


@case(3, "truncated or corrupt DICOM header", "a slice cut in the middle of its header")
def truncated_header(root: Path):
    folder, paths = _study(root)
    paths[5].write_bytes(paths[5].read_bytes()[:400])
    return folder, paths[5]


@case(3, "truncated or corrupt DICOM header", "a lone DICOM file cut after its preamble")
def truncated_header_file(root: Path):
    folder, paths = _study(root)
    paths[0].write_bytes(paths[0].read_bytes()[:140])
    return paths[0], paths[0]


@case(3, "no installed decoder", "a slice in JPEG XL (no decoder installed)")
def jpeg_xl_syntax(root: Path):
    folder, paths = _study(root)
    write_with_syntax(paths[2], "1.2.840.10008.1.2.4.110", encapsulate=True)
    return folder, paths[2]


@case(3, "no installed decoder", "a slice in a private, unknown transfer syntax")
def private_syntax(root: Path):
    folder, paths = _study(root)
    write_with_syntax(paths[2], "1.2.826.0.1.3680043.99.1.2")
    return folder, paths[2]


@case(3, "corrupt pixel data", "RLE segments that run past the frame (the Rust decoder panics)")
def corrupt_rle(root: Path):
    import struct

    from pydicom.encaps import encapsulate

    folder = root / "study"
    paths = write_series(folder, transfer_syntax="1.2.840.10008.1.2.5")
    ds = pydicom.dcmread(paths[3])
    runs = bytes([0x81, 0x07]) * 200  # 200 replicate runs of 128 bytes: far more than 64 × 64
    frame = struct.pack("<16I", 2, 64, 64 + len(runs), *[0] * 13) + runs + runs
    ds.PixelData = encapsulate([frame])
    ds.save_as(paths[3])
    return folder, paths[3]


@case(3, "exceeds the 4 GiB limit", "one file declaring 4096 × 4096 × 300 frames (refused before allocating)")
def huge_declared_file(root: Path):
    folder, paths = _study(root)
    edit(paths[2], lambda ds: (setattr(ds, "Rows", 4096), setattr(ds, "Columns", 4096),
                               setattr(ds, "NumberOfFrames", 300)))
    return folder, paths[2]


@case(3, "more than the 4 GiB limit", "12 files declaring 4096 × 4096 × 12 frames each (4.8 GB in all)")
def huge_declared_series(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, lambda ds: (setattr(ds, "Rows", 4096), setattr(ds, "Columns", 4096),
                               setattr(ds, "NumberOfFrames", 12)))
    return folder, folder


@case(3, "exceeds the 4096 pixel limit", "a slice declaring a 5000 × 5000 matrix")
def matrix_too_large(root: Path):
    folder, paths = _study(root)
    edit(paths[2], lambda ds: (setattr(ds, "Rows", 5000), setattr(ds, "Columns", 5000)))
    return folder, paths[2]


@case(3, "missing or invalid Rows/Columns", "a slice without Rows")
def missing_rows(root: Path):
    folder, paths = _study(root)
    edit(paths[2], lambda ds: delattr(ds, "Rows"))
    return folder, paths[2]


@case(3, "unsupported BitsAllocated 12", "BitsAllocated 12")
def bits_allocated_12(root: Path):
    folder, paths = _study(root)
    edit(paths[2], lambda ds: (setattr(ds, "BitsAllocated", 12), setattr(ds, "BitsStored", 12),
                               setattr(ds, "HighBit", 11)))
    return folder, paths[2]


@case(3, "permission denied", "a slice the user may not read (chmod 000)", skip=_as_root)
def unreadable_file(root: Path):
    folder, paths = _study(root)
    paths[3].chmod(0)
    return folder, paths[3]


@case(3, "permission denied", "a subfolder the user may not list (chmod 000)", skip=_as_root)
def unreadable_folder(root: Path):
    folder = root / "study"
    write_series(folder / "a")
    write_series(folder / "b", tag="other")
    (folder / "b").chmod(0)
    return folder, folder / "b"


# -- values that are not Hounsfield units (exit 5) --------------------------------------------------

@case(5, "RescaleIntercept missing", "stored values without the rescale (intercept missing: air at 0)")
def no_rescale(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, lambda ds: (delattr(ds, "RescaleIntercept"), delattr(ds, "RescaleSlope")))
    return folder, folder


@case(5, "instead of about -1000 HU", "a wrong intercept: air at -500 HU")
def air_shifted(root: Path):
    folder, paths = _study(root)
    for path in paths:
        edit(path, lambda ds: setattr(ds, "RescaleIntercept", "-524"))
    return folder, folder


@case(5, "invalid RescaleSlope", "letters in RescaleSlope")
def garbage_rescale_slope(root: Path):
    folder, paths = _study(root)
    edit(paths[1], lambda ds: setattr(ds, "RescaleSlope", "1.23456"))
    patch_bytes(paths[1], b"1.23456", b"abcdefg")
    return folder, paths[1]


@case(5, "RescaleSlope is 0", "RescaleSlope 0")
def zero_rescale_slope(root: Path):
    folder, paths = _study(root)
    edit(paths[1], lambda ds: setattr(ds, "RescaleSlope", "0"))
    return folder, paths[1]


@case(5, "implausible RescaleSlope -1", "a negative RescaleSlope")
def negative_rescale_slope(root: Path):
    folder, paths = _study(root)
    edit(paths[1], lambda ds: setattr(ds, "RescaleSlope", "-1"))
    return folder, paths[1]


@case(5, "RescaleIntercept -24: air measures", "one slice whose intercept is wrong (-24 instead of -1024)")
def one_slice_wrong_intercept(root: Path):
    folder, paths = _study(root)
    edit(paths[6], lambda ds: setattr(ds, "RescaleIntercept", "-24"))
    return folder, paths[6]


@case(3, "mixed pixel formats", "one slice with BitsStored 12 in a 16-bit series")
def mixed_bits_stored(root: Path):
    folder, paths = _study(root)
    edit(paths[6], lambda ds: (setattr(ds, "BitsStored", 12), setattr(ds, "HighBit", 11)))
    return folder, paths[6]


@case(5, "8-bit windowed export", "a NIfTI of 0..255 display values (lung window)")
def nifti_windowed_8bit(root: Path):
    hu = tiny_phantom().hu.astype(np.float32)
    windowed = np.clip((hu + 1350.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    path = write_volume(root / "windowed.nii.gz", windowed)
    return path, path


@case(5, "RescaleIntercept missing", "a NIfTI of stored values (HU + 1024: air at 0)")
def nifti_not_hu(root: Path):
    path = write_volume(root / "raw.nii.gz", (tiny_phantom().hu.astype(np.int32) + 1024).astype(np.int16))
    return path, path


# -- volume files (exit 3) --------------------------------------------------------------------------

@case(3, "unreadable image header", "a NIfTI with a broken header")
def nifti_broken_header(root: Path):
    good = phantom_volume(root / "good.nii")
    data = bytearray(good.read_bytes())
    data[0:4] = b"\x00\x00\x00\x00"  # sizeof_hdr
    data[40:56] = b"\xff" * 16  # dim[]
    path = root / "broken.nii"
    path.write_bytes(bytes(data))
    good.unlink()
    return path, path


@case(3, "truncated or corrupt compressed image data", "a .nii.gz cut in half")
def nifti_truncated(root: Path):
    good = phantom_volume(root / "good.nii.gz")
    path = root / "truncated.nii.gz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    return path, path


@case(3, "got a 2D image", "a 2D NIfTI")
def nifti_2d(root: Path):
    path = write_volume(root / "slice.nii.gz", tiny_phantom().hu[5], spacing_zyx=TINY_SPACING[1:])
    return path, path


@case(3, "got a 4D image", "a 4D NIfTI (3 time frames)")
def nifti_4d(root: Path):
    path = write_volume(root / "dynamic.nii.gz", np.stack([tiny_phantom().hu] * 3),
                        spacing_zyx=(1.0,) + TINY_SPACING)
    return path, path


@case(3, "3 component(s)", "an RGB NRRD volume")
def nrrd_rgb(root: Path):
    rgb = np.repeat(((tiny_phantom().hu + 1024) // 16).astype(np.uint8)[..., None], 3, axis=-1)
    path = write_volume(root / "rgb.nrrd", rgb, is_vector=True)
    return path, path


@case(3, "NaN or infinite values", "a float MetaImage holding NaN")
def mha_nan(root: Path):
    hu = tiny_phantom().hu.astype(np.float32)
    hu[5, 30:34, 30:34] = np.nan
    path = write_volume(root / "nan.mha", hu)
    return path, path


@case(3, "truncated image data", "an uncompressed .nii missing its last third")
def nifti_short(root: Path):
    good = phantom_volume(root / "good.nii")
    path = root / "short.nii"
    path.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    good.unlink()
    return path, path


@case(3, "unreadable image data", "a .mha missing most of its voxels")
def mha_truncated(root: Path):
    good = phantom_volume(root / "good.mha")
    path = root / "short.mha"
    path.write_bytes(good.read_bytes()[:5000])
    good.unlink()
    return path, path


@case(3, "is not a 3D scan", "a MetaImage one voxel thick")
def mha_one_slice(root: Path):
    path = write_volume(root / "flat.mha", tiny_phantom().hu[5:6])
    return path, path


# --------------------------------------------------------------------------------------------------
# Running a case and the table
# --------------------------------------------------------------------------------------------------


def quantify_args(input_path: Path, out: Path, case: Case) -> list[str]:
    """``ctquant`` arguments (after the program name) that quantify a case's input."""
    return ["quantify", str(input_path), "--out", str(out), "--method", "hu", "--device", "cpu", *case.args]


def run_in_process(args: Sequence[str]) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from ctquant.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def table(cases: Sequence[Case] = CASES) -> str:
    """A markdown table: every case, the exit code and the message ctquant gives (paths shortened)."""
    import tempfile

    lines = ["| case | input | exit | message (stderr) |", "|---|---|---|---|"]
    for item in cases:
        skipped = item.skip_reason()
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if skipped:
                code, message = item.exit_code, f"(not run here: {skipped})"
            else:
                input_path, _ = item.build(root)
                code, _, stderr = run_in_process(quantify_args(input_path, root / "out", item))
                message = stderr.strip().replace(str(root) + "/", "").replace(str(root), ".")
            message = message.replace("|", "\\|")
        lines.append(f"| `{item.name}` | {item.description} | {code} | `{message}` |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    if "--table" not in argv:
        print(__doc__)
        return 2
    import warnings

    warnings.simplefilter("ignore")
    text = ("# Bad inputs and ctquant's answers\n\n"
            "Generated by `python tests/bad_inputs.py --table --write` (exit codes: `ctquant/errors.py`).\n\n"
            + table())
    if "--write" in argv:
        target = Path(__file__).with_name("BAD_INPUTS.md")
        target.write_text(text)
        print(f"wrote {target}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
