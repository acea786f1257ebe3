"""Reading CT scans (DICOM series, NIfTI/NRRD/MHA) into HU volumes, and writing label volumes.

Arrays are numpy in (z, y, x) order, as SimpleITK's ``GetArrayFromImage`` gives them; ``spacing_mm``
follows the same (z, y, x) order. ``origin_mm`` and ``direction`` are in the patient (LPS) frame,
as SimpleITK holds them: origin is the centre of voxel [0, 0, 0]; direction is the 3×3 matrix
(row-major) whose columns are the x, y, z index axes.

Every way an input can be wrong ends in a :class:`~ctquant.errors.CtquantError` naming the offending
file (or folder) and the reason: :class:`InputError` (unreadable, not a CT volume),
:class:`GeometryError` (slices that do not form a regular volume) or :class:`CalibrationError` (values
that are not Hounsfield units). Sizes declared in headers are checked before any pixel buffer is
allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import stat
import struct
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import CalibrationError, GeometryError, InputError

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """A CT volume in Hounsfield units with its geometry and provenance.

    Attributes:
        hu: int16 array (z, y, x) of Hounsfield units.
        spacing_mm: voxel size (z, y, x) in mm.
        origin_mm: LPS position (x, y, z) of the centre of voxel [0, 0, 0], in mm.
        direction: 9 floats, row-major 3×3 direction cosines (columns: x, y, z index axes).
        meta: provenance (series/study UIDs, dates, description, kernel, source path...), never the
            patient's name or ID.
        source_datasets: for DICOM input, the pydicom headers (no pixel data) of each slice in
            z order, for writing DICOM SEG that references them; empty for other formats.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    source_datasets: list = field(default_factory=list, repr=False)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: ``hu``) on this scan's grid and geometry."""
        array = self.hu if array is None else array
        if array.shape != self.hu.shape:
            raise ValueError(f"array shape {array.shape} differs from the scan's {self.hu.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in self.spacing_mm[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin_mm))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image


# --------------------------------------------------------------------------------------------------
# DICOM study folders: finding and describing series
# --------------------------------------------------------------------------------------------------


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE)
DICOMDIR_STORAGE = "1.2.840.10008.1.3.10"
#: File suffixes read with SimpleITK as whole volumes.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Largest pixel buffer we agree to allocate for one series (bytes); protects against absurd headers.
MAX_VOLUME_BYTES = 4 * 1024**3
#: Largest in-plane matrix accepted (pixels per side).
MAX_MATRIX = 4096
#: Relative deviation of a slice gap from the median gap above which the series is refused.
SLICE_GAP_TOLERANCE = 0.1
#: Range of RescaleSlope accepted for CT (usually 1; stored values of 8 to 32 bits map to HU).
MIN_RESCALE_SLOPE, MAX_RESCALE_SLOPE = 1e-3, 1e3
#: Lossless JPEG-family transfer syntaxes whose single-frame slices are decoded by GDCM (through
#: SimpleITK), which releases the GIL so that threads decode in parallel; pydicom's plugins for them
#: (pylibjpeg, pyjpegls) hold it. Lossless, so both decoders give the same stored values (the tests
#: compare them); lossy syntaxes (JPEG baseline) stay with pydicom. JPEG Lossless, JPEG Lossless SV1,
#: JPEG-LS Lossless, JPEG 2000 Lossless.
GDCM_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                           "1.2.840.10008.1.2.4.90"})
#: Transfer syntaxes newer than pydicom's dictionary, named in error messages.
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


@dataclass
class SeriesInfo:
    """Summary of one DICOM series found in a study folder (no pixel data read)."""

    series_uid: str
    study_uid: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    description: str = ""
    series_number: int | None = None
    image_type: tuple[str, ...] = ()
    n_images: int = 0
    rows: int | None = None
    columns: int | None = None
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    kernel: str = ""
    study_date: str = ""
    orientation: tuple[float, ...] | None = None
    frame_of_reference_uid: str = ""
    #: True when the files carry no SeriesInstanceUID (an anonymiser blanked it): ``series_uid`` is then
    #: a key derived from the attributes that identify a series otherwise (see :func:`_uidless_key`).
    uid_missing: bool = False
    files: list[Path] = field(default_factory=list, repr=False)
    #: Pixel bytes each file declares (Rows × Columns × frames × bytes per sample), parallel to ``files``.
    file_bytes: list[int] = field(default_factory=list, repr=False)

    @property
    def declared_bytes(self) -> int:
        """Pixel bytes the whole series declares in its headers."""
        return sum(self.file_bytes)

    @property
    def study_key(self) -> str:
        """What identifies the series' study: StudyInstanceUID, else its date and frame of reference."""
        return self.study_uid or f"study of {self.study_date or 'unknown date'}, frame of reference " \
                                 f"{self.frame_of_reference_uid or 'unknown'}"

    @property
    def is_axial(self) -> bool:
        """True when the slice normal is within ~15° of the patient's z axis."""
        if self.orientation is None or len(self.orientation) != 6:
            return False
        normal = np.cross(np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]))
        return bool(abs(normal[2]) > 0.96)

    def unsuitable_reason(self) -> str | None:
        """Why this series is not a CT volume ctquant can quantify, or None if it is."""
        if self.modality != "CT":
            return f"modality {_clean(self.modality, 16) or 'unknown'} is not CT"
        if self.sop_class_uid not in CT_STORAGE_CLASSES:
            return f"SOP class {_clean(self.sop_class_uid) or 'unknown'} is not CT image storage"
        if any(t.upper() in ("LOCALIZER", "SCOUT") for t in self.image_type):
            return "localizer/scout image"
        if not self.is_axial:
            what = "no valid ImageOrientationPatient" if self.orientation is None else "not an axial series"
            return what
        if self.n_images < 2:
            return "a single slice is not a volume"
        return None


def _tag(ds: pydicom.Dataset, name: str, default: Any = None) -> Any:
    """An element's value; ``default`` when absent, empty or unparseable.

    pydicom converts raw values lazily, on first access: a corrupt value raises there, with any of
    several exception types (ValueError, TypeError, struct.error, LookupError...), hence the broad catch.
    """
    try:
        value = getattr(ds, name, default)
    except Exception:  # noqa: BLE001 - see docstring
        return default
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    return value


def _as_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _as_float(value: Any, default: float | None = None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return out if math.isfinite(out) else default


def _as_floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a multi-valued element, or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.split("\\")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _short(value: Any, limit: int = 60) -> str:
    """A short, one-line repr of a header value for error messages."""
    try:
        text = repr(list(value)) if isinstance(value, pydicom.multival.MultiValue) else repr(value)
    except Exception:  # noqa: BLE001 - a repr must never fail an error message
        text = "<unprintable>"
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(text: Any, limit: int = 64) -> str:
    """Header text for an error message: control characters escaped, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _clean(text.splitlines()[0], 200) if text else type(exc).__name__


def _frame_orientation(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient of a slice or of an Enhanced CT's frames; None if absent or invalid."""
    iop = _tag(ds, "ImageOrientationPatient")
    if iop is None:
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            try:
                iop = _tag(_tag(ds, groups)[0].PlaneOrientationSequence[0], "ImageOrientationPatient")
            except Exception:  # noqa: BLE001 - absent or corrupt sequences: try the next source
                iop = None
            if iop is not None:
                break
    return _as_floats(iop, 6)


def _file_kind(path: Path) -> str | None:
    """``None`` for a regular file that may be DICOM; else why it is skipped."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as handle:
            head = handle.read(132)
    except PermissionError:
        raise InputError("permission denied", path) from None
    except FileNotFoundError:
        return "broken link or vanished file"
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None
    if head[128:132] == b"DICM":
        return None
    # DICOM files without the 128-byte preamble start with a group 0002 or 0008 element.
    if head[:2] in (b"\x02\x00", b"\x08\x00"):
        return None
    return "not a DICOM file"


def _read_header(path: Path) -> tuple[pydicom.Dataset | None, str | None]:
    """(header without pixel data, None), or (None, why it is not a usable DICOM header)."""
    kind = _file_kind(path)
    if kind is not None:
        return None, kind
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except PermissionError:
        raise InputError("permission denied", path) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many exception types on malformed files
        return None, f"truncated or corrupt DICOM header ({_first_line(exc)})"
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds and "DirectoryRecordSequence" not in ds:
        return None, "truncated or corrupt DICOM header (no SOPClassUID/SeriesInstanceUID)"
    return ds, None


def _walk_error(exc: OSError) -> None:
    if isinstance(exc, PermissionError):
        raise InputError("permission denied", exc.filename)
    raise InputError(f"cannot list folder: {exc.strerror or exc}", exc.filename)


def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


@dataclass
class _Folder:
    """What a walk through a study folder found."""

    series: list[SeriesInfo]
    n_files: int = 0
    dicomdirs: list[Path] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # files that look like DICOM but do not parse
    volume_files: list[Path] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)


def _declared_bytes(ds: pydicom.Dataset) -> int:
    rows = max(0, _as_int(_tag(ds, "Rows"), 0) or 0)
    cols = max(0, _as_int(_tag(ds, "Columns"), 0) or 0)
    frames = max(1, _as_int(_tag(ds, "NumberOfFrames"), 1) or 1)
    bits = max(8, _as_int(_tag(ds, "BitsAllocated"), 16) or 16)
    samples = max(1, _as_int(_tag(ds, "SamplesPerPixel"), 1) or 1)
    return rows * cols * frames * samples * ((bits + 7) // 8)


def _scan_folder(root: Path) -> _Folder:
    if not root.exists():
        raise InputError("no such file or folder", root)
    paths = [root] if root.is_file() else list(_iter_files(root))
    if not paths:
        raise InputError("folder is empty", root)
    found = _Folder(series=[], n_files=len(paths))
    groups: dict[str, SeriesInfo] = {}
    for path in paths:
        ds, problem = _read_header(path)
        if ds is None:
            found.skipped[path] = problem or "unreadable"
            if problem and "corrupt" in problem:
                found.corrupt.append((path, problem))
            elif is_volume_file(path):
                found.volume_files.append(path)
            continue
        sop_class = str(_tag(ds, "SOPClassUID", "") or _tag(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_STORAGE or "DirectoryRecordSequence" in ds:
            found.dicomdirs.append(path)
            continue
        uid = str(_tag(ds, "SeriesInstanceUID", "") or "")
        uid_missing = not uid
        if uid_missing:
            uid = _uidless_key(ds)
        info = groups.get(uid)
        if info is None:
            thickness = _as_float(_tag(ds, "SliceThickness"))
            image_type = _tag(ds, "ImageType", ())
            image_type = (image_type,) if isinstance(image_type, str) else image_type
            info = groups[uid] = SeriesInfo(
                series_uid=uid,
                study_uid=str(_tag(ds, "StudyInstanceUID", "")),
                modality=str(_tag(ds, "Modality", "")).strip(),
                sop_class_uid=sop_class,
                description=str(_tag(ds, "SeriesDescription", "")),
                series_number=_as_int(_tag(ds, "SeriesNumber")),
                image_type=tuple(str(t) for t in image_type) if _iterable(image_type) else (),
                rows=_as_int(_tag(ds, "Rows")),
                columns=_as_int(_tag(ds, "Columns")),
                slice_thickness_mm=thickness,
                pixel_spacing_mm=_as_floats(_tag(ds, "PixelSpacing"), 2),
                kernel=_text(_tag(ds, "ConvolutionKernel", "")),
                study_date=str(_tag(ds, "StudyDate", "")),
                orientation=_frame_orientation(ds),
                frame_of_reference_uid=str(_tag(ds, "FrameOfReferenceUID", "")),
                uid_missing=uid_missing,
            )
        info.files.append(path)
        info.file_bytes.append(_declared_bytes(ds))
        info.n_images += max(1, _as_int(_tag(ds, "NumberOfFrames"), 1) or 1)
    if len(found.skipped) > 0:
        log.debug("%s: %d file(s) skipped: %s", root, len(found.skipped),
                  "; ".join(f"{p.name}: {why}" for p, why in list(found.skipped.items())[:5]))
    found.series = sorted(groups.values(), key=lambda s: (s.study_date, s.series_number or 0, s.series_uid))
    if not found.series:
        _raise_no_series(root, found, paths)
    return found


def _text(value: Any) -> str:
    """Header text; the values of a multi-valued element joined with a backslash (as DICOM stores them)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _uidless_key(ds: pydicom.Dataset) -> str:
    """A stand-in series key for a file without SeriesInstanceUID.

    Files are taken as one series when they share study, series number, frame of reference,
    orientation, pixel grid, kernel, slice thickness and description; anything mixed beyond that (two
    reconstructions on one grid) still fails later as duplicate slice positions.
    """
    orientation = _frame_orientation(ds)
    spacing = _as_floats(_tag(ds, "PixelSpacing"), 2)
    parts = (str(_tag(ds, "StudyInstanceUID", "")), _as_int(_tag(ds, "SeriesNumber")),
             str(_tag(ds, "FrameOfReferenceUID", "")),
             tuple(round(v, 3) for v in orientation) if orientation else None,
             _as_int(_tag(ds, "Rows")), _as_int(_tag(ds, "Columns")),
             tuple(round(v, 4) for v in spacing) if spacing else None,
             _text(_tag(ds, "ConvolutionKernel", "")), _as_float(_tag(ds, "SliceThickness")),
             str(_tag(ds, "SeriesDescription", "")), str(_tag(ds, "Modality", "")).strip())
    return "no-uid-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _raise_no_series(root: Path, found: _Folder, paths: list[Path]) -> None:
    if root.is_file():
        reason = found.skipped.get(root)
        if found.dicomdirs:
            reason = "a DICOMDIR index, not an image: pass the folder that holds the series"
        raise InputError(reason or "not a DICOM image", root)
    if found.corrupt:
        path, problem = found.corrupt[0]
        more = f" (and {len(found.corrupt) - 1} more)" if len(found.corrupt) > 1 else ""
        raise InputError(f"{problem}{more}; no readable DICOM series in {root}", path)
    if found.dicomdirs:
        raise InputError(f"only a DICOMDIR index found, none of the image files it lists "
                         f"(looked at {len(paths)} file(s))", root)
    if found.volume_files:
        raise InputError(f"no DICOM files, but a volume file: pass it directly ({found.volume_files[0].name})",
                         root)
    if all(why.startswith("empty file") for why in found.skipped.values()):
        raise InputError(f"only empty files (looked at {len(paths)} file(s))", root)
    raise InputError(f"no DICOM files found (looked at {len(paths)} file(s))", root)


def find_series(root: str | Path) -> list[SeriesInfo]:
    """Walk a study folder (nested, any file names, non-DICOM files ignored) and group by series.

    Raises:
        InputError: when ``root`` does not exist or holds no DICOM image at all.
    """
    return _scan_folder(Path(root)).series


KERNEL_RULES = ("smooth", "sharp", "any")


def kernel_class(kernel: str, selection: dict[str, Any] | None = None) -> str:
    """``sharp``, ``smooth`` or ``unknown``: a ConvolutionKernel by the patterns of ``series_selection``.

    Every value of a multi-valued kernel (``Br38f\\3``) is matched, case-insensitive, from its start;
    a sharp pattern wins over a smooth one.
    """
    selection = _selection_rule(selection)
    values = [v.strip() for v in str(kernel or "").split("\\") if v.strip()]
    for name in ("sharp", "smooth"):
        for pattern in selection[f"{name}_kernels"]:
            if any(re.match(pattern, v, flags=re.IGNORECASE) for v in values):
                return name
    return "unknown"


def _selection_rule(selection: dict[str, Any] | None) -> dict[str, Any]:
    """The ``series_selection`` settings (default: those of the shipped ``configs/quantify.yaml``), checked."""
    if selection is None:
        from ..config import load_quantify_config

        selection = load_quantify_config()["series_selection"]
    if selection.get("kernel") not in KERNEL_RULES:
        raise InputError(f"series_selection.kernel must be one of {', '.join(KERNEL_RULES)}, "
                         f"not {selection.get('kernel')!r}")
    for name in ("sharp_kernels", "smooth_kernels"):
        patterns = selection.get(name)
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise InputError(f"series_selection.{name} must be a list of regular expressions")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"series_selection.{name}: invalid regular expression {pattern!r} ({exc})") from None
    return selection


@dataclass
class SeriesChoice:
    """The series to quantify and why it was chosen (printed by ``ctquant series``, kept in measures.json)."""

    info: SeriesInfo
    reason: str
    kernel_class: str = "unknown"


def choose_series(series: list[SeriesInfo], series_uid: str | None = None, root: str | Path | None = None,
                  selection: dict[str, Any] | None = None) -> SeriesChoice:
    """The series to quantify: ``series_uid`` if given, else by the ``series_selection`` rule.

    The rule: among the suitable series (axial CT volumes), most images, then the thinnest slices,
    then the kernel (``smooth``: the smoothest reconstruction; ``sharp``; ``any``). Suitable series
    from more than one study are refused (the folder mixes time points or patients): ``--series``
    must choose. Equal candidates of one study are a warning (the first in series-number order wins).
    """
    selection = _selection_rule(selection)
    if series_uid is not None:
        for info in series:
            if info.series_uid == series_uid:
                reason = info.unsuitable_reason()
                if reason:
                    raise InputError(f"series {_clean(series_uid)} cannot be quantified: {reason}", root)
                return SeriesChoice(info, "named with --series", kernel_class(info.kernel, selection))
        raise InputError(f"series {_clean(series_uid)} not found among {len(series)} series", root)
    candidates = [s for s in series if s.unsuitable_reason() is None]
    if not candidates:
        found = "; ".join(f"{_clean(s.modality, 16) or '?'} '{_clean(s.description)}' ({s.unsuitable_reason()})"
                          for s in series[:5])
        if len(series) > 5:
            found += f"; and {len(series) - 5} more"
        raise InputError(f"no axial CT series to quantify (found: {found})", root)
    studies = sorted({s.study_key for s in candidates})
    if len(studies) > 1:
        dates = ", ".join(sorted({s.study_date or "no date" for s in candidates}))
        raise InputError(f"{len(candidates)} CT series from {len(studies)} different studies (dates {dates}): "
                         "pass one study's folder, or choose the series with --series (see ctquant series)", root)
    classes = {id(s): kernel_class(s.kernel, selection) for s in candidates}
    rank = {"smooth": {"smooth": 2, "unknown": 1, "sharp": 0}, "sharp": {"sharp": 2, "unknown": 1, "smooth": 0},
            "any": {"smooth": 0, "unknown": 0, "sharp": 0}}[selection["kernel"]]

    def geometry(s: SeriesInfo) -> tuple[int, float]:
        return s.n_images, -(s.slice_thickness_mm or 99.0)

    def key(s: SeriesInfo) -> tuple[int, float, int]:
        return (*geometry(s), rank[classes[id(s)]])

    best = max(candidates, key=key)  # max keeps the first of equals: series-number order
    if len(candidates) == 1:
        return SeriesChoice(best, "the only axial CT series", classes[id(best)])
    thickness = f"{best.slice_thickness_mm:g} mm" if best.slice_thickness_mm else "unknown thickness"
    reason = f"most images ({best.n_images}) at the thinnest slices ({thickness}) of {len(candidates)} axial CT series"
    same_geometry = [s for s in candidates if geometry(s) == geometry(best) and s is not best]
    if same_geometry:
        others = ", ".join(f"{_clean(s.kernel, 20) or 'no kernel'} ({classes[id(s)]})" for s in same_geometry)
        reason += (f"; kernel {_clean(best.kernel, 20) or 'none'} ({classes[id(best)]}) over {others} by "
                   f"series_selection.kernel = {selection['kernel']}")
        ties = [s for s in same_geometry if key(s) == key(best)]
        if ties:
            reason += f"; {len(ties)} other series as suitable, the first by series number taken"
            log.warning("%s: %d equally suitable CT series (%s); took series %s: choose with --series",
                        root, len(ties) + 1, ", ".join(_clean(s.series_uid) for s in [best, *ties]),
                        _clean(best.series_uid))
    return SeriesChoice(best, reason, classes[id(best)])


def select_series(series: list[SeriesInfo], series_uid: str | None = None,
                  root: str | Path | None = None, selection: dict[str, Any] | None = None) -> SeriesInfo:
    """The series :func:`choose_series` chooses (without the reason)."""
    return choose_series(series, series_uid, root, selection).info


# --------------------------------------------------------------------------------------------------
# DICOM series to an HU volume
# --------------------------------------------------------------------------------------------------


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # ImagePositionPatient (x, y, z) mm
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    slope: float
    intercept: float
    pixels: np.ndarray  # (rows, cols) stored values
    header: pydicom.Dataset
    decoder: str = "pydicom"  # who decoded the pixel data: "pydicom" or "gdcm" (SimpleITK)

    @property
    def pixel_format(self) -> tuple[Any, ...]:
        """(BitsAllocated, BitsStored, PixelRepresentation): the same for every slice of a series."""
        return tuple(_as_int(_tag(self.header, name)) for name in ("BitsAllocated", "BitsStored",
                                                                    "PixelRepresentation"))


def _check_size(ds: pydicom.Dataset, path: Path) -> tuple[int, int, int]:
    """Refuse pixel formats that are not a CT slice, and sizes too large, before decoding anything.

    Returns (frames, rows, columns).
    """
    rows_raw, cols_raw = _tag(ds, "Rows"), _tag(ds, "Columns")
    rows, cols = _as_int(rows_raw, 0) or 0, _as_int(cols_raw, 0) or 0
    frames_raw = _tag(ds, "NumberOfFrames")
    frames = 1 if frames_raw is None else _as_int(frames_raw, 0) or 0
    if rows <= 0 or cols <= 0:
        raise InputError(f"missing or invalid Rows/Columns ({_short(rows_raw)} x {_short(cols_raw)})", path)
    if frames <= 0:
        raise InputError(f"invalid NumberOfFrames {_short(frames_raw)}", path)
    samples = _as_int(_tag(ds, "SamplesPerPixel"), 1)
    photometric = str(_tag(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or (photometric and not photometric.startswith("MONOCHROME")):
        raise InputError(f"colour image ({_clean(photometric, 16) or '?'}, {samples} samples per pixel), not a CT slice",
                         path)
    if rows > MAX_MATRIX or cols > MAX_MATRIX:
        raise InputError(f"matrix {rows}x{cols} exceeds the {MAX_MATRIX} pixel limit", path)
    bits = _as_int(_tag(ds, "BitsAllocated"), 0)
    if bits not in (8, 16, 32):
        raise InputError(f"unsupported BitsAllocated {_short(_tag(ds, 'BitsAllocated'))} (8, 16 or 32)", path)
    stored = _as_int(_tag(ds, "BitsStored"), bits)
    if not stored or not 1 <= stored <= bits:
        raise InputError(f"invalid BitsStored {_short(_tag(ds, 'BitsStored'))}", path)
    if _as_int(_tag(ds, "PixelRepresentation"), 0) not in (0, 1):
        raise InputError(f"invalid PixelRepresentation {_short(_tag(ds, 'PixelRepresentation'))}", path)
    nbytes = rows * cols * frames * (bits // 8)
    if nbytes > MAX_VOLUME_BYTES:
        raise InputError(f"declared size {rows}x{cols}x{frames} ({nbytes / 1e9:.1f} GB) exceeds the "
                         f"{MAX_VOLUME_BYTES / 2**30:.0f} GiB limit", path)
    return frames, rows, cols


#: Transfer syntax of a file without file meta, from pydicom's (implicit VR, little endian) when read.
_RAW_SYNTAXES = {(True, True): pydicom.uid.ImplicitVRLittleEndian, (False, True): pydicom.uid.ExplicitVRLittleEndian,
                 (False, False): pydicom.uid.ExplicitVRBigEndian}


def _syntax_name(syntax: Any) -> str:
    name = _SYNTAX_NAMES.get(str(syntax)) or getattr(syntax, "name", "") or str(syntax)
    return _clean(name if name == str(syntax) else f"{name} ({syntax})", 100)


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored pixel values of a dataset, with clear errors for truncated or undecodable data."""
    frames, rows, cols = _check_size(ds, path)
    if "PixelData" not in ds:
        raise InputError("no pixel data", path)
    meta = getattr(ds, "file_meta", None)
    syntax = _tag(meta, "TransferSyntaxUID") if meta is not None else None
    if syntax is None:  # an old file without file meta: the encoding pydicom found when reading it
        syntax = _RAW_SYNTAXES.get(tuple(getattr(ds, "original_encoding", None) or ()))
        if syntax is not None:
            if meta is None:
                ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
            meta.TransferSyntaxUID = syntax
    if syntax is not None:
        try:
            compressed = pydicom.uid.UID(str(syntax)).is_compressed
        except ValueError:
            raise InputError(f"transfer syntax {_syntax_name(syntax)}: no installed decoder reads it", path) from None
        if not compressed:
            expected = rows * cols * frames * (int(ds.BitsAllocated) // 8)
            try:
                length = len(ds.PixelData)
            except Exception:  # noqa: BLE001 - a corrupt element
                length = -1
            if length < expected:
                raise InputError(f"truncated pixel data ({max(length, 0)} of {expected} bytes)", path)
    try:
        pixels = np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError) as exc:
        raise InputError(f"cannot decode pixel data ({_syntax_name(syntax)}): {_first_line(exc)}", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - decoder plugins raise many types on bad data, and the
        # Rust ones (pylibjpeg-rle) panic with pyo3's PanicException, which derives from BaseException
        raise InputError(f"corrupt pixel data: {_first_line(exc)}", path) from None
    expected_shape = (rows, cols) if frames == 1 else (frames, rows, cols)
    if pixels.shape != expected_shape or pixels.dtype.kind not in "iu":
        raise InputError(f"decoded pixel array {pixels.shape} {pixels.dtype} does not match the header "
                         f"({'x'.join(map(str, expected_shape))})", path)
    return pixels


def _gdcm_decodes(ds: pydicom.Dataset) -> bool:
    """A single-frame slice with pixel data in a :data:`GDCM_SYNTAXES` transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(_tag(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    return (syntax in GDCM_SYNTAXES and "PixelData" in ds and "PerFrameFunctionalGroupsSequence" not in ds
            and _as_int(_tag(ds, "NumberOfFrames"), 1) == 1)


def _gdcm_stored_values(path: Path, shape: tuple[int, int], slope: float, intercept: float) -> np.ndarray | None:
    """Stored values (rows, cols) of a slice decoded by GDCM through SimpleITK (see :data:`GDCM_SYNTAXES`),
    as int16, uint16 or int32, the first that holds them; None where GDCM cannot decode it (pydicom then
    decodes it, or says why not).

    GDCM applies RescaleSlope / RescaleIntercept; they are inverted here, and values that are not then
    whole numbers, or another shape than the header's, also give None.
    """
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat64)
    except RuntimeError:
        return None
    values = sitk.GetArrayViewFromImage(image)
    if values.shape != (1, *shape):
        return None
    stored = (values[0] - intercept) / slope
    whole = np.rint(stored)
    if np.abs(stored - whole).max() > 1e-3:
        return None
    low, high = whole.min(), whole.max()
    for dtype in (np.int16, np.uint16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return whole.astype(dtype)
    return None


def _rescale(source: Any, path: Path, where: str = "") -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a slice or frame, defaults (1, 0) when absent."""
    out = []
    for name, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = _tag(source, name) if source is not None else None
        if raw is None:
            out.append(default)
            continue
        value = _as_float(raw)
        if value is None:
            raise CalibrationError(f"{where}invalid {name} {_short(raw)}", path)
        out.append(value)
    if out[0] == 0:
        raise CalibrationError(f"{where}RescaleSlope is 0", path)
    if not MIN_RESCALE_SLOPE <= out[0] <= MAX_RESCALE_SLOPE:
        raise CalibrationError(f"{where}implausible RescaleSlope {out[0]:g} for CT (expected "
                               f"{MIN_RESCALE_SLOPE:g} to {MAX_RESCALE_SLOPE:g})", path)
    return out[0], out[1]


def _check_orientation(orientation: tuple[float, ...], path: Path, where: str = "") -> None:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    if not (abs(np.linalg.norm(row) - 1) < 1e-2 and abs(np.linalg.norm(col) - 1) < 1e-2
            and abs(row @ col) < 1e-2):
        raise GeometryError(f"{where}ImageOrientationPatient {list(orientation)} is not two orthonormal vectors",
                            path)


def _slices_from_file(path: Path, gdcm: bool = True) -> list[_Slice]:
    """One or more slices (Enhanced CT multi-frame files hold many) from a DICOM file.

    With ``gdcm``, a slice in a :data:`GDCM_SYNTAXES` syntax is decoded by GDCM (:func:`_gdcm_stored_values`)
    once its header has passed the checks; otherwise, and where GDCM fails, by pydicom.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
    except PermissionError:
        raise InputError("permission denied", path) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many exception types on malformed files
        raise InputError(f"unreadable DICOM file: {_first_line(exc)}", path) from None
    pixels = None
    if gdcm and _gdcm_decodes(ds):
        _, rows, cols = _check_size(ds, path)
        pixels = _gdcm_stored_values(path, (rows, cols), *_rescale(ds, path))
    decoder = "pydicom" if pixels is None else "gdcm"
    if pixels is None:
        pixels = _pixels(ds, path)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_slices(ds, pixels, path)
    if pixels.ndim != 2:
        raise InputError(f"multi-frame image {pixels.shape} without per-frame geometry", path)
    raw = _tag(ds, "ImagePositionPatient")
    position = _as_floats(raw, 3)
    if position is None:
        raise GeometryError("missing ImagePositionPatient" if raw is None
                            else f"invalid ImagePositionPatient {_short(raw)}", path)
    raw = _tag(ds, "PixelSpacing")
    spacing = _as_floats(raw, 2)
    if spacing is None or min(spacing) <= 0:
        raise GeometryError("missing PixelSpacing" if raw is None else f"invalid PixelSpacing {_short(raw)}", path)
    orientation = _frame_orientation(ds)
    if orientation is None:
        raise GeometryError("missing or invalid ImageOrientationPatient", path)
    _check_orientation(orientation, path)
    slope, intercept = _rescale(ds, path)
    del ds.PixelData
    return [_Slice(path, np.asarray(position), orientation, spacing, slope, intercept, pixels, ds, decoder)]


def _enhanced_slices(ds: pydicom.Dataset, pixels: np.ndarray, path: Path) -> list[_Slice]:
    frames = _tag(ds, "PerFrameFunctionalGroupsSequence") or []
    try:
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()
    except Exception:  # noqa: BLE001 - an empty or corrupt sequence
        shared = pydicom.Dataset()
    if pixels.ndim == 2:
        pixels = pixels[None]
    if len(frames) != pixels.shape[0]:
        raise GeometryError(f"{len(frames)} frame descriptions for {pixels.shape[0]} frames", path)

    def group(frame: pydicom.Dataset, name: str) -> pydicom.Dataset | None:
        for source in (frame, shared):
            try:
                if name in source and len(source[name].value):
                    return source[name].value[0]
            except Exception:  # noqa: BLE001 - a corrupt sequence counts as absent
                continue
        return None

    out = []
    for index, frame in enumerate(frames):
        where = f"frame {index + 1}: "
        position = _as_floats(_tag(group(frame, "PlanePositionSequence"), "ImagePositionPatient"), 3)
        orientation = _as_floats(_tag(group(frame, "PlaneOrientationSequence"), "ImageOrientationPatient"), 6)
        spacing = _as_floats(_tag(group(frame, "PixelMeasuresSequence"), "PixelSpacing"), 2)
        if position is None or orientation is None or spacing is None or min(spacing) <= 0:
            raise GeometryError(f"{where}missing or invalid plane position/orientation/pixel spacing", path)
        _check_orientation(orientation, path, where)
        transform = group(frame, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, path, where)
        out.append(_Slice(path, np.asarray(position), orientation, spacing, slope, intercept, pixels[index], ds))
    if "PixelData" in ds:
        del ds.PixelData
    return out


def _read_slices(files: list[Path], workers: int | None = None, gdcm: bool = True) -> list[_Slice]:
    workers = workers or min(8, (os.cpu_count() or 2) * 2, max(1, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [s for group in pool.map(lambda path: _slices_from_file(path, gdcm), files) for s in group]


def _decode_series(files: list[Path]) -> list[_Slice]:
    """The slices of ``files``. Where GDCM decoded slices and a decoder wrote to stderr meanwhile (libjpeg
    reports corrupt data there and goes on), the series is decoded again by pydicom alone, which raises
    where its decoder finds the data corrupt (the error the user then sees). Any text counts, so headers
    that make pydicom warn on stderr cost a second decoding too (the CLI sends pydicom's warnings to the
    debug log, not to stderr)."""
    with _quiet_stderr() as said:  # decoders written in C or Rust print on stderr when data is corrupt
        slices = _read_slices(files)
    if said and any(s.decoder == "gdcm" for s in slices):
        with _quiet_stderr():
            slices = _read_slices(files, gdcm=False)
    return slices


def _order_slices(slices: list[_Slice], root: Path) -> tuple[list[_Slice], float, np.ndarray]:
    """Sort slices along the slice normal and check that they form a regular volume.

    Returns the ordered slices, the slice spacing in mm and the normal.
    """
    if len(slices) < 2:
        raise GeometryError(f"{len(slices)} slice(s): not a volume", root)
    first = slices[0]
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) > 1:
        odd = next(s for s in slices if s.pixels.shape != first.pixels.shape)
        raise GeometryError(f"mixed image sizes in one series: {sorted(shapes)}", odd.path)
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise GeometryError("mixed slice orientations in one series", s.path)
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise GeometryError(f"mixed pixel spacing in one series: {list(s.pixel_spacing)} vs "
                                f"{list(first.pixel_spacing)}", s.path)
        if s.pixel_format != first.pixel_format:
            raise InputError("mixed pixel formats in one series (BitsAllocated, BitsStored, PixelRepresentation): "
                             f"{s.pixel_format} vs {first.pixel_format}", s.path)
    row, col = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    heights = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    slices = [slices[i] for i in order]
    heights = heights[order]
    gaps = np.diff(heights)
    if np.any(gaps < 1e-3):
        k = int(np.argmax(gaps < 1e-3))
        raise GeometryError(
            f"duplicate slice position {heights[k]:.2f} mm (also in {slices[k].path.name})", slices[k + 1].path)
    spacing = float(np.median(gaps))
    bad = np.abs(gaps - spacing) > SLICE_GAP_TOLERANCE * spacing
    if np.any(bad):
        k = int(np.argmax(bad))
        kind = "missing slice(s)" if gaps[k] > 1.5 * spacing else "irregular slice spacing"
        raise GeometryError(
            f"{kind}: gap of {gaps[k]:.2f} mm after {heights[k]:.2f} mm where the series spacing is {spacing:.2f} mm",
            slices[k + 1].path)
    # Gantry tilt / sheared stacks: successive positions must move along the normal only.
    steps = np.diff(np.stack([s.position for s in slices]), axis=0)
    in_plane = steps - np.outer(steps @ normal, normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) > 0.05 * spacing + 1e-3:
        tilt = _as_float(_tag(first.header, "GantryDetectorTilt"), 0.0) or 0.0
        raise GeometryError(
            f"slices are sheared along the stack (gantry tilt {tilt:g}°): resample the series before quantifying",
            root)
    return slices, spacing, normal


def subject_hash(patient_id: str) -> str:
    """A pseudonymous subject ID derived from the patient ID (never the ID itself)."""
    return "sub-" + hashlib.sha256(patient_id.encode()).hexdigest()[:10]


def _series_meta(info: SeriesInfo, header: pydicom.Dataset, root: Path) -> dict[str, Any]:
    patient_id = str(_tag(header, "PatientID", "") or "")
    return {
        "format": "dicom",
        "input": str(root),
        "series_instance_uid": None if info.uid_missing else info.series_uid,
        "series_key": info.series_uid,
        "series_uid_missing": info.uid_missing,
        "study_instance_uid": info.study_uid,
        "frame_of_reference_uid": str(_tag(header, "FrameOfReferenceUID", "")),
        "study_date": info.study_date,
        "series_description": info.description,
        "series_number": info.series_number,
        "convolution_kernel": info.kernel,
        "manufacturer": str(_tag(header, "Manufacturer", "")),
        "slice_thickness_mm": info.slice_thickness_mm,
        "patient_position": _text(_tag(header, "PatientPosition", "")).upper() or None,  # HFS, HFP, ...
        "subject_hash": subject_hash(patient_id) if patient_id else None,
    }


def _hu_slice(s: _Slice) -> np.ndarray:
    """A slice's stored values mapped to HU, rounded and clipped to int16."""
    if s.slope == 1 and float(s.intercept).is_integer() and abs(s.intercept) < 2**20:
        values = s.pixels.astype(np.int64) + int(s.intercept)
    else:
        values = np.rint(s.pixels.astype(np.float64) * s.slope + s.intercept)
    return np.clip(values, -32768, 32767).astype(np.int16)


def load_dicom_series(root: str | Path, series_uid: str | None = None,
                      selection: dict[str, Any] | None = None) -> Scan:
    """Load the CT series of a DICOM folder (or the one named) as an HU volume in LPS orientation.

    ``selection``: the ``series_selection`` settings of the quantify config (default: the shipped ones).

    Raises:
        InputError, GeometryError, CalibrationError: with the offending file and the reason.
    """
    root = Path(root)
    found = _scan_folder(root)
    choice = choose_series(found.series, series_uid, root, selection)
    info = choice.info
    for path, nbytes in zip(info.files, info.file_bytes):
        if nbytes > MAX_VOLUME_BYTES:
            raise InputError(f"declared pixel data of {nbytes / 1e9:.1f} GB exceeds the "
                             f"{MAX_VOLUME_BYTES / 2**30:.0f} GiB limit", path)
    if info.declared_bytes > MAX_VOLUME_BYTES:
        raise InputError(f"series of {info.n_images} images declares {info.declared_bytes / 1e9:.1f} GB of pixel "
                         f"data, more than the {MAX_VOLUME_BYTES / 2**30:.0f} GiB limit", root)
    try:
        slices = _decode_series(info.files)
        slices, dz, normal = _order_slices(slices, root)
    except GeometryError as exc:
        if found.corrupt:  # the corrupt file is probably the slice that is missing
            path, problem = found.corrupt[0]
            raise InputError(f"{problem}; the series is incomplete without it ({exc.reason})", path) from None
        raise
    first = slices[0]
    hu = np.empty((len(slices),) + first.pixels.shape, dtype=np.int16)
    for k, s in enumerate(slices):
        hu[k] = _hu_slice(s)
    row, col = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    direction = np.stack([row, col, normal], axis=1)  # columns: x (along a row), y, z index axes
    dy, dx = first.pixel_spacing
    geometry = sitk.Image([1, 1, 1], sitk.sitkInt16)  # the series' grid, checked by SimpleITK; voxels in hu
    try:
        geometry.SetSpacing((float(dx), float(dy), float(dz)))
        geometry.SetOrigin(tuple(float(v) for v in first.position))
        geometry.SetDirection(tuple(float(v) for v in direction.ravel()))
    except RuntimeError as exc:
        raise GeometryError(f"invalid geometry: {_first_line(exc)}", root) from None
    meta = _series_meta(info, first.header, root)
    meta["series_choice"] = choice.reason
    meta["kernel_class"] = choice.kernel_class
    meta["source_files"] = [str(s.path) for s in slices]
    meta["pixel_decoder"] = "+".join(sorted({s.decoder for s in slices}))
    _check_rescale_groups(slices, hu)
    scan = _scan_from_image(geometry, meta, root, voxels=hu)
    check_hounsfield(scan.hu, root)
    scan.source_datasets = [s.header for s in slices] if scan.meta["reoriented_from"] is None else []
    if info.uid_missing:  # said once the series has loaded (an error stays the only line on stderr)
        log.warning("%s: %d DICOM file(s) without SeriesInstanceUID read as one series (%s), grouped by "
                    "StudyInstanceUID, SeriesNumber, FrameOfReferenceUID, orientation, pixel grid, kernel "
                    "and slice thickness", root, len(info.files), info.series_uid)
    return scan


def _check_rescale_groups(slices: list[_Slice], hu: np.ndarray) -> None:
    """Slices with their own rescale (slope, intercept) must each be in HU on their own.

    The whole volume's check would not see one slice with a wrong intercept among many good ones.
    """
    groups: dict[tuple[float, float], list[int]] = {}
    for k, s in enumerate(slices):
        groups.setdefault((s.slope, s.intercept), []).append(k)
    if len(groups) < 2:
        return
    for (slope, intercept), ks in groups.items():
        try:
            check_hounsfield(hu[ks])
        except CalibrationError as exc:
            raise CalibrationError(f"slice(s) with RescaleSlope {slope:g} and RescaleIntercept {intercept:g}: "
                                   f"{exc.reason}", slices[ks[0]].path) from None


def _scan_from_image(image: sitk.Image, meta: dict[str, Any], path: Path | None = None,
                     voxels: np.ndarray | None = None) -> Scan:
    """A Scan in LPS orientation from a SimpleITK image; records the original orientation.

    ``voxels``: the (z, y, x) voxels when ``image`` carries the geometry only; used as they are (no
    copy) when the grid is already LPS.
    """
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    meta = dict(meta)
    meta["original_direction"] = list(image.GetDirection())
    meta["reoriented_from"] = None if original == "LPS" else original
    if original == "LPS":
        hu = sitk.GetArrayFromImage(image) if voxels is None else voxels
    else:
        if voxels is not None:  # the voxels onto the geometry, to reorient them
            geometry, image = image, sitk.GetImageFromArray(voxels)
            image.SetSpacing(geometry.GetSpacing())
            image.SetOrigin(geometry.GetOrigin())
            image.SetDirection(geometry.GetDirection())
        image = sitk.DICOMOrient(image, "LPS")
        hu = sitk.GetArrayFromImage(image)
    if hu.dtype != np.int16:
        if hu.dtype.kind == "f" and not np.isfinite(hu).all():
            raise InputError("image holds NaN or infinite values", path)
        hu = np.clip(np.round(hu), -32768, 32767).astype(np.int16)
    return Scan(
        hu=hu,
        spacing_mm=tuple(float(s) for s in image.GetSpacing()[::-1]),
        origin_mm=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
        meta=meta,
    )


def is_volume_file(path: str | Path) -> bool:
    """True for file names SimpleITK reads as whole volumes (NIfTI, NRRD, MetaImage)."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[list[str]]:
    """Hold what C libraries (ITK, niftilib) print on file descriptor 2 instead of showing it.

    Yields a list that receives the held text (also logged at debug level). A lock keeps threads
    from interleaving the redirections.
    """
    said: list[str] = []
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield said
            return
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield said
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                text = held.read().decode("utf-8", "replace").strip()
                if text:
                    said.append(text)
                    log.debug("image reader said: %s", text)


def _itk_detail(exc: RuntimeError, said: list[str], path: Path) -> str:
    """The useful part of an ITK exception (or of what the reader printed), on one line."""
    lines = [ln.strip() for text in said for ln in text.splitlines() if ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        lines = [ln.split("):", 1)[-1].strip() if "ITK ERROR" in ln else ln for ln in lines
                 if "Exception thrown" not in ln and not ln.startswith("Reason:")]
    detail = " ".join(lines[:2]).replace(str(path), "").replace("** ERROR:", "").strip(" :")
    return _clean(" ".join(detail.split()), 160)


def _nifti_data_end(header: bytes) -> int | None:
    """Offset of the end of a NIfTI-1/2 file's voxel data, from its header; None if not NIfTI."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or not math.isfinite(offset) or offset < 0:
        return None
    voxels = math.prod(max(0, int(d)) for d in dims[1:dims[0] + 1])
    return int(offset) + voxels * bitpix // 8


def _check_nifti_length(path: Path) -> None:
    """Refuse a NIfTI file shorter than its header says (ITK reads the missing voxels as zeros)."""
    import gzip
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            end = _nifti_data_end(handle.read(540))
            if end is None:
                return
            if compressed:
                with open(path, "rb") as raw:  # the gzip trailer holds the length (mod 2**32)
                    raw.seek(-4, os.SEEK_END)
                    if struct.unpack("<I", raw.read(4))[0] == end % 2**32:
                        return
                size = 540
                while chunk := handle.read(1 << 22):
                    size += len(chunk)
            else:
                size = path.stat().st_size
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(f"truncated or corrupt compressed image data ({_first_line(exc)})", path) from None
    except OSError as exc:
        raise InputError(f"unreadable image file: {exc.strerror or exc}", path) from None
    if size < end:
        raise InputError(f"truncated image data ({size} of {end} bytes)", path)


def load_volume_file(path: str | Path) -> Scan:
    """Load a NIfTI/NRRD/MHA CT volume (values must already be HU) in LPS orientation.

    The header is checked (3D, one channel, sane size and spacing) before the voxels are read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if not path.is_file():
        raise InputError("not a file", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_stderr() as said:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        detail = _itk_detail(exc, said, path)
        raise InputError(f"unreadable image header{': ' + detail if detail else ''}", path) from None
    size, dim, comps = reader.GetSize(), reader.GetDimension(), reader.GetNumberOfComponents()
    if dim != 3 or comps != 1:
        raise InputError(f"expected a 3D single-channel volume, got a {dim}D image of size {list(size)} "
                         f"with {comps} component(s)", path)
    if min(size) < 2:
        raise InputError(f"volume size {list(size)} is not a 3D scan", path)
    spacing = reader.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise GeometryError(f"invalid voxel spacing {list(spacing)}", path)
    nbytes = int(np.prod(size, dtype=np.int64)) * 2
    if nbytes > MAX_VOLUME_BYTES:
        raise InputError(f"volume of {'x'.join(map(str, size))} voxels exceeds the "
                         f"{MAX_VOLUME_BYTES / 2**30:.0f} GiB limit", path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_length(path)
    try:
        with _quiet_stderr() as said:
            image = reader.Execute()
    except RuntimeError as exc:
        detail = _itk_detail(exc, said, path)
        raise InputError(f"unreadable image data{': ' + detail if detail else ''}", path) from None
    fmt = next((s for s in VOLUME_SUFFIXES[::-1] if path.name.lower().endswith(s)), path.suffix).lstrip(".")
    meta = {"format": fmt, "input": str(path), "series_instance_uid": None,
            "study_instance_uid": None, "study_date": None, "subject_hash": None}
    scan = _scan_from_image(image, meta, path)
    check_hounsfield(scan.hu, path)
    return scan


def load_scan(path: str | Path, series_uid: str | None = None, selection: dict[str, Any] | None = None) -> Scan:
    """Load a CT scan from a DICOM folder/file or a NIfTI/NRRD/MHA volume file.

    ``selection``: how a series is chosen among several (``series_selection`` of the quantify config).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_file() and is_volume_file(path):
        return load_volume_file(path)
    return load_dicom_series(path, series_uid, selection)


# --------------------------------------------------------------------------------------------------
# Calibration check and writing
# --------------------------------------------------------------------------------------------------

#: Accepted range (HU) of the air level found in the image (outside the body, trachea, lung).
AIR_HU_RANGE = (-1200.0, -800.0)
#: Values at or below this may be padding outside the reconstructed field of view (scanners pad with
#: -2000, -2048, -3024 or -32768). Only values that also fill the slice corners are taken as padding:
#: padding is one constant outside the FOV circle, while air of a wrongly rescaled image is noisy.
PADDING_HU = -1500


def padding_values(hu: np.ndarray) -> np.ndarray:
    """The padding values of a volume: values at or below :data:`PADDING_HU` in its slice corners."""
    if hu.ndim != 3 or min(hu.shape) == 0:
        return np.array([np.iinfo(np.int16).min])
    corners = np.concatenate([hu[:, 0, 0], hu[:, 0, -1], hu[:, -1, 0], hu[:, -1, -1]])
    return np.union1d(np.unique(corners[corners <= PADDING_HU]), [np.iinfo(np.int16).min])


def _air_percentiles(hu: np.ndarray, max_samples: int = 2_000_000) -> tuple[float, float]:
    """The 0.1th and 0.5th percentiles of the values that are not padding (NaN when there are none)."""
    flat = hu.reshape(-1)
    if flat.size > max_samples:
        flat = flat[np.random.default_rng(0).integers(0, flat.size, max_samples)]
    sample = flat[~np.isin(flat, padding_values(hu))]
    if sample.size < 100:
        return float("nan"), float("nan")
    low, mid = np.percentile(sample, [0.1, 0.5])
    return float(low), float(mid)


def estimate_air_hu(hu: np.ndarray, max_samples: int = 2_000_000) -> float:
    """The image's air level, from its lowest values that are not padding.

    Air outside the body gives the 0.5th percentile; when the field of view excludes outside air, the
    0.1th percentile still falls in the trachea and lung. Returns whichever is in
    :data:`AIR_HU_RANGE` (the 0.5th percentile if neither), NaN when everything is padding.
    """
    low, mid = _air_percentiles(hu, max_samples)
    for value in (mid, low):
        if AIR_HU_RANGE[0] <= value <= AIR_HU_RANGE[1]:
            return value
    return mid


def check_hounsfield(hu: np.ndarray, path: str | Path | None = None) -> None:
    """Refuse volumes whose air is nowhere near -1000 HU (raw stored values, windowed exports...)."""
    air = estimate_air_hu(hu)
    if AIR_HU_RANGE[0] <= air <= AIR_HU_RANGE[1]:
        return
    if math.isnan(air):
        raise CalibrationError("the image holds nothing but padding values", path)
    lo, hi = int(hu.min()), int(hu.max())
    if 0 <= lo and hi <= 255:
        hint = f"values span {lo}..{hi}: an 8-bit windowed export?"
    elif -100 <= air <= 100 and lo >= -100:
        hint = "stored values, not HU (RescaleIntercept missing or wrong?)"
    else:
        hint = "not Hounsfield units"
    raise CalibrationError(f"air measures {air:.0f} instead of about -1000 HU: {hint}", path)


def write_label_image(scan: Scan, labels: np.ndarray, path: str | Path) -> None:
    """Write a uint8 label volume on the scan's original grid and orientation (NIfTI, NRRD, MHA)."""
    image = scan.to_sitk(labels.astype(np.uint8, copy=False))
    original = scan.meta.get("reoriented_from")
    if original:
        image = sitk.DICOMOrient(image, original)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_label_image(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label volume (z, y, x) in LPS orientation and its spacing (z, y, x) mm."""
    try:
        with _quiet_stderr():
            image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError("unreadable label image", path) from None
    image = sitk.DICOMOrient(image, "LPS")
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in image.GetSpacing()[::-1])
