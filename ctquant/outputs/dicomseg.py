"""DICOM Segmentation (SEG) objects of ctquant's lungs and lesions, written and read with highdicom.

:func:`write_seg` writes ONE binary DICOM SEG instance with four segments that reference the source
CT series (same Study, same Frame of Reference, per-frame source image references; frames where a
segment is empty are omitted):

====  ======================  ===========================================  ==============================
 #    label                   segmented property category                  segmented property type
====  ======================  ===========================================  ==============================
 1    Right lung              SCT 91723000 "Anatomical Structure"          SCT 39607008 "Lung",
                                                                           modifier SCT 24028007 "Right"
 2    Left lung               SCT 91723000 "Anatomical Structure"          SCT 39607008 "Lung",
                                                                           modifier SCT 7771000 "Left"
 3    Ground-glass opacity    SCT 49755003 "Morphologically Abnormal       DCM 112120 "Ground glass opacity"
                              Structure"
 4    Consolidation           SCT 49755003 "Morphologically Abnormal       SCT 9656002 "Consolidation"
                              Structure"
====  ======================  ===========================================  ==============================

Where the codes come from (checked against the code dictionaries installed with pydicom 3,
``pydicom.sr.codedict.codes``, except where said):

- categories: CID 7150 "Segmentation Property Categories" (``codes.cid7150``);
- "Lung" SCT 39607008 is in CID 7151 "Segmentation Property Types"; the installed dictionaries hold no
  pre-coordinated right/left lung concepts, so laterality is a Segmented Property Type Modifier from
  CID 244 "Laterality" (``codes.cid244.Right`` / ``.Left``), as 3D Slicer's and IDC's lung
  segmentations do;
- "Ground glass opacity" DCM 112120 is in CID 6102/6104 (chest CT findings); lesion segments carry the
  anatomic region SCT 39607008 "Lung";
- consolidation is SNOMED CT 9656002 "Consolidation" (a morphologically abnormal structure; not in
  the installed dictionaries, so typed in here). ctquant 0.1's SEGs used a private code,
  ``99CTQ CTQ0002``; :func:`read_seg` still recognises it.

Made to validate (``dciodvfy``, David Clunie's validator) and to be read by dcmqi (3D Slicer's SEG
reader):

- the patient and study attributes are copied from the source series, which DICOM requires, but what
  in them is not conformant is not copied forward (:func:`conformant_header`): items of copied
  sequences that lack a required UID or code part are left out (e.g. a ReferencedStudySequence item
  without ReferencedSOPClassUID, as in TCIA's Lung-PET-CT-Dx), and a person name of one component
  without a ``^`` (the retired ACR-NEMA form) is written with its family-name delimiter (``Doe`` →
  ``Doe^``, the same name under PS3.5 6.2, where trailing empty components may be dropped). Study ID
  stays as the source has it (empty is allowed, Type 2, and it must match the study's other series);
- the file is written in the *Deflated Explicit VR Little Endian* transfer syntax (lossless zlib)
  with empty frames omitted: 1.4 MB instead of 32 MB for a 255 × 512² COVID-19 scan. Measured on
  that scan, highdicom's encapsulated syntaxes do not serve: dcmqi 1.5.7 (DCMTK) refuses JPEG 2000
  and JPEG-LS SEGs ("uses lossy compression"), and RLE is only written for 8-bit FRACTIONAL SEGs
  (7.0 MB there, and dcmqi then writes every segment as value 1, so Slicer's merged import shows the
  two lungs as one segment). ``dciodvfy`` (the PyPI build) cannot parse deflated files: validate the
  same data set re-encoded uncompressed (:func:`uncompressed_copy`, as the tests do).

The algorithm identification names ctquant, its version and the lesion method (family DCM 123110
"Artificial Intelligence" for ``--method model``, DCM 123105 "Histogram Analysis" — HU bands — for
``--method hu``; the lungs always DCM 123104 "Morphological Operations"), with the method and model
hash as parameters. The SEG files under the same patient and study as its source.

Opening it
----------
- **3D Slicer** (5.x, with the QuantitativeReporting extension, which provides the DICOM SEG plug-in):
  DICOM module → *Import DICOM files* → select the CT series folder and ``segmentation.dcm`` → *Load*
  the SEG (the CT loads with it); the four segments show in the Segment Editor / Data module with
  their names and colours; *Segmentations* → *Show 3D* renders them. ``measurements.dcm`` (the SR
  beside it, :mod:`ctquant.outputs.dicomsr`) loads with the same import as QuantitativeReporting's
  measurements table (see the README for a caveat).
- **OHIF viewer** (v3): upload the CT series and ``segmentation.dcm`` to the DICOMweb server (e.g.
  Orthanc: drag and drop into its web UI, or ``storescu``) and open the study, or use OHIF's local
  mode (``/local``) and drop the CT files and the SEG together; in the study panel double-click the
  SEG thumbnail ("ctquant segmentation ...") to overlay it.

:func:`read_seg` reads any binary/fractional DICOM SEG (ctquant's or a reader's, e.g. exported from
Slicer) back into SimpleITK label images, finding each class by its code or, failing that, its label.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from ..version import __version__
from ..errors import InputError, OutputError
from ..segment.lesions import CONSOLIDATION, GGO
from ..segment.lungs import LEFT, RIGHT

log = logging.getLogger(__name__)

#: The private coding scheme of ctquant 0.1's consolidation code (``99CTQ CTQ0002``), still read.
LOCAL_SCHEME = "99CTQ"
#: SNOMED CT 9656002 "Consolidation" (morphologically abnormal structure); not in pydicom's dictionaries.
CONSOLIDATION_CODE = ("9656002", "SCT", "Consolidation")
#: ``compression`` values of :func:`write_seg` and their transfer syntaxes.
TRANSFER_SYNTAXES = {"deflate": DeflatedExplicitVRLittleEndian, "none": ExplicitVRLittleEndian}

#: Segment display colours (RGB): Okabe–Ito colour-blind-safe palette, shared with the QC montage.
COLOURS = {
    "right_lung": (0x56, 0xB4, 0xE9),   # sky blue
    "left_lung": (0x00, 0x9E, 0x73),    # bluish green
    "ggo": (0xF0, 0xE4, 0x42),          # yellow
    "consolidation": (0xD5, 0x5E, 0x00),  # vermillion
}


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


#: Segment number → (key, label, description, category, type, type modifier, anatomic region).
def segment_definitions() -> list[dict[str, Any]]:
    """The four segments ctquant writes, with their coded concepts (see the module docstring)."""
    lung = codes.SCT.Lung  # 39607008, CID 7151
    return [
        {"number": 1, "key": "right_lung", "label": "Right lung",
         "description": "Right lung (ctquant lung segmentation, includes opacified lung)",
         "category": codes.cid7150.AnatomicalStructure, "type": lung, "modifier": codes.cid244.Right,
         "region": None},
        {"number": 2, "key": "left_lung", "label": "Left lung",
         "description": "Left lung (ctquant lung segmentation, includes opacified lung)",
         "category": codes.cid7150.AnatomicalStructure, "type": lung, "modifier": codes.cid244.Left,
         "region": None},
        {"number": 3, "key": "ggo", "label": "Ground-glass opacity",
         "description": "Ground-glass opacity within the lungs",
         "category": codes.cid7150.MorphologicallyAbnormalStructure, "type": codes.DCM.GroundGlassOpacity,
         "modifier": None, "region": lung},
        {"number": 4, "key": "consolidation", "label": "Consolidation",
         "description": "Consolidation within the lungs",
         "category": codes.cid7150.MorphologicallyAbnormalStructure,
         "type": _code(*CONSOLIDATION_CODE), "modifier": None, "region": lung},
    ]


# --------------------------------------------------------------------------------------------------
# Source images
# --------------------------------------------------------------------------------------------------


def _source_images(scan, arrays: list[np.ndarray]) -> tuple[list[Dataset], list[np.ndarray]]:
    """The source datasets and the label arrays in their frame order.

    ``arrays`` are on the scan's (LPS) grid. Single-frame series loaded without reorientation use
    ``scan.source_datasets`` as they are; a series that was reoriented to LPS on loading has its
    headers re-read (without pixel data) from ``scan.meta['source_files']`` and the arrays turned
    back to its original orientation.
    """
    where = scan.meta.get("input")
    check_source(scan)
    if scan.source_datasets:
        if len(scan.source_datasets) != scan.hu.shape[0]:
            raise InputError("the source series no longer matches the loaded volume; cannot write DICOM SEG",
                             where)
        return list(scan.source_datasets), arrays
    files = scan.meta["source_files"]
    original = scan.meta.get("reoriented_from")
    try:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"cannot re-read the source series for DICOM SEG: {exc}", where) from None
    out = []
    for array in arrays:
        image = scan.to_sitk(array.astype(np.uint8))
        if original:
            image = sitk.DICOMOrient(image, original)
        out.append(sitk.GetArrayFromImage(image))
    first = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    origin = np.array(sitk.DICOMOrient(scan.to_sitk(), original).GetOrigin() if original else scan.origin_mm)
    if out[0].shape[0] != len(datasets) or not np.allclose(first, origin, atol=1e-2):
        raise InputError("the source series no longer matches the loaded volume; cannot write DICOM SEG",
                         where)
    return datasets, out


#: Attributes of a code (PS3.3 Table 8.8-1): a value (one of three forms), its scheme and meaning.
_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")
_REFERENCE_UIDS = ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID")


def _conformant_item(item: Dataset) -> bool:
    """False for a sequence item that is an incomplete SOP instance reference or coded entry."""
    if any(k in item for k in _REFERENCE_UIDS) and not all(item.get(k) for k in _REFERENCE_UIDS):
        return False
    coded = [k for k in (*_CODE_VALUES, "CodingSchemeDesignator", "CodeMeaning") if k in item]
    if coded and not (any(item.get(k) for k in _CODE_VALUES) and item.get("CodingSchemeDesignator")
                      and item.get("CodeMeaning")):
        return False
    return True


def conformant_person_name(value: Any) -> str:
    """A person name with its family-name delimiter: ``Doe`` → ``Doe^`` (the same name, PS3.5 6.2),
    so that it is not read as the retired single-string form; other values unchanged."""
    text = str(value) if value is not None else ""
    if text and "^" not in text and "=" not in text:
        return text + "^"
    return text


def conformant_header(ds: Dataset) -> Dataset:
    """A copy of a source image's header (no pixel data) with what is not conformant left out or repaired.

    Top-level sequence items that are incomplete SOP instance references (one of Referenced SOP Class /
    Instance UID missing or empty) or incomplete codes are dropped, and the sequence with them when
    none is left; person names (PN) get their family-name delimiter (:func:`conformant_person_name`).
    Derived objects (SEG, SR) copy the patient and study attributes from this copy, not the source.
    """
    out = Dataset()
    for element in ds:
        if element.tag != 0x7FE00010:  # all but PixelData
            out.add(copy.deepcopy(element))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    for element in list(out):
        if element.VR == "SQ":
            kept = [item for item in element.value if _conformant_item(item)]
            if len(kept) != len(element.value):
                log.info("not copying %d non-conformant item(s) of %s from the source",
                         len(element.value) - len(kept), element.keyword)
                if kept:
                    element.value = kept
                else:
                    del out[element.tag]
        elif element.VR == "PN" and element.value not in (None, ""):
            names = element.value if element.VM > 1 else [element.value]
            fixed = [conformant_person_name(v) for v in names]
            element.value = fixed if element.VM > 1 else fixed[0]
    return out


def check_source(scan) -> None:
    """Raise the :class:`InputError` :func:`write_seg` would raise for lack of a usable DICOM source
    series, without building anything: call it right after loading to fail before the segmentation."""
    where = scan.meta.get("input")
    datasets = list(scan.source_datasets or [])
    if datasets:
        if len({str(ds.SOPInstanceUID) for ds in datasets}) != len(datasets):
            raise InputError("DICOM SEG of an enhanced (multi-frame) CT source is not supported; "
                             "use --seg-format nifti", where)
        return
    files = scan.meta.get("source_files") or []
    if scan.meta.get("format") != "dicom" or not files:
        raise InputError("DICOM SEG needs a DICOM source series (this input is "
                         f"{scan.meta.get('format') or 'not DICOM'}); use --seg-format nifti", where)
    if len(set(files)) != len(files):
        raise InputError("DICOM SEG of an enhanced (multi-frame) CT source is not supported; "
                         "use --seg-format nifti", where)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def build_seg(scan, lung_labels: np.ndarray, lesion_labels: np.ndarray, *, method: str | None = None,
              model_sha256: str | None = None, series_number: int | None = None):
    """A :class:`highdicom.seg.Segmentation` of the lungs and lesions (see :func:`write_seg`)."""
    import highdicom as hd

    if lung_labels.shape != scan.hu.shape or lesion_labels.shape != scan.hu.shape:
        raise ValueError(f"label shapes {lung_labels.shape}/{lesion_labels.shape} differ from the scan's "
                         f"{scan.hu.shape}")
    masks = [lung_labels == RIGHT, lung_labels == LEFT, lesion_labels == GGO, lesion_labels == CONSOLIDATION]
    sources, masks = _source_images(scan, masks)
    # highdicom copies the patient and study attributes from the first source image: a conformant copy.
    sources = [conformant_header(sources[0]), *sources[1:]]
    pixels = np.stack(masks, axis=-1).astype(np.uint8)  # (frames, rows, columns, segments)

    params = {"method": method or "unknown"}
    if model_sha256:
        params["model_sha256"] = model_sha256
    lesion_family = codes.cid7162.ArtificialIntelligence if method == "model" else codes.cid7162.HistogramAnalysis
    algorithms = {
        "lungs": hd.AlgorithmIdentificationSequence(
            name="ctquant lungs", family=codes.cid7162.MorphologicalOperations, version=__version__,
            source="ctquant", parameters={"method": "threshold and morphology"}),
        "lesions": hd.AlgorithmIdentificationSequence(
            name=f"ctquant lesions ({method or 'unknown'})", family=lesion_family, version=__version__,
            source="ctquant", parameters=params),
    }
    descriptions = []
    for d in segment_definitions():
        is_lung = d["key"].endswith("lung")
        desc = hd.seg.SegmentDescription(
            segment_number=d["number"], segment_label=d["label"],
            segmented_property_category=d["category"], segmented_property_type=d["type"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithms["lungs" if is_lung else "lesions"],
            tracking_id=d["label"], tracking_uid=hd.UID(),
            anatomic_regions=[d["region"]] if d["region"] is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*COLOURS[d["key"]]),
        )
        desc.SegmentDescription = d["description"]
        if d["modifier"] is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(d["modifier"].value, d["modifier"].scheme_designator, d["modifier"].meaning)]
        descriptions.append(desc)

    source_series = sources[0].get("SeriesNumber")
    if series_number is None:
        try:
            series_number = 1000 + int(source_series) if source_series not in (None, "") else 999
        except (TypeError, ValueError):
            series_number = 999
    series_number = max(1, min(int(series_number), 2**31 - 1))
    empty = not pixels.any()
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctquant",
        manufacturer_model_name="ctquant",
        software_versions=__version__,
        device_serial_number="0",
        content_label="CTQUANT",
        content_description=f"ctquant lungs, GGO, consolidation ({method or 'unknown'} method)"[:64],
        series_description=f"ctquant segmentation ({method or 'unknown'})"[:64],
        omit_empty_frames=not empty,  # an all-empty SEG still needs its frames
    )
    return seg


def source_headers(scan) -> list[Dataset]:
    """The headers of the scan's DICOM source images, in the scan's slice order (for references)."""
    if scan.source_datasets:
        return list(scan.source_datasets)
    check_source(scan)
    where = scan.meta.get("input")
    try:
        return [pydicom.dcmread(f, stop_before_pixels=True) for f in scan.meta["source_files"]]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"cannot re-read the source series: {exc}", where) from None


def save_dataset(ds: Dataset, path: str | Path, compression: str = "deflate") -> Path:
    """Save a highdicom object (written uncompressed) in the transfer syntax of ``compression``."""
    if compression not in TRANSFER_SYNTAXES:
        raise ValueError(f"compression must be one of {sorted(TRANSFER_SYNTAXES)}, not {compression!r}")
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        raise ValueError("save_dataset takes a natively encoded data set")
    ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES[compression]
    path = Path(path)
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError as exc:
        raise OutputError(f"cannot write {path.name}: {exc.strerror or exc}", path) from None
    return path


def uncompressed_copy(path: str | Path, out: str | Path) -> Path:
    """The DICOM file at ``path`` re-encoded as Explicit VR Little Endian (same data set) at ``out``,
    for validators that cannot read the deflated transfer syntax (the PyPI build of dciodvfy)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return Path(out)


def write_seg(scan, lung_labels: np.ndarray, lesion_labels: np.ndarray, path: str | Path, *,
              method: str | None = None, model_sha256: str | None = None,
              series_number: int | None = None, compression: str = "deflate") -> Path:
    """Write one binary DICOM SEG (right lung, left lung, GGO, consolidation) referencing the scan's series.

    Args:
        scan: a :class:`ctquant.io.scans.Scan` loaded from a DICOM series.
        lung_labels: (z, y, x) on the scan grid, 1 right lung, 2 left lung.
        lesion_labels: (z, y, x) on the scan grid, 1 GGO, 2 consolidation.
        method: the lesion method (``model`` or ``hu``), recorded in the algorithm identification.
        model_sha256: the lesion model's hash, recorded as an algorithm parameter.
        series_number: the SEG's series number (default: 1000 + the source's, else 999).
        compression: ``deflate`` (Deflated Explicit VR Little Endian, the default; see the module
            docstring for why) or ``none`` (Explicit VR Little Endian).

    Raises:
        InputError: the scan has no DICOM source series (NIfTI/NRRD input) or an unsupported one.
        OutputError: the file cannot be written.
    """
    if compression not in TRANSFER_SYNTAXES:
        raise ValueError(f"compression must be one of {sorted(TRANSFER_SYNTAXES)}, not {compression!r}")
    seg = build_seg(scan, lung_labels, lesion_labels, method=method, model_sha256=model_sha256,
                    series_number=series_number)
    return save_dataset(seg, path, compression)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

#: Label map values returned by :func:`read_seg`.
LUNG_VALUES = {"right_lung": RIGHT, "left_lung": LEFT}
LESION_VALUES = {"ggo": GGO, "consolidation": CONSOLIDATION}

_LABEL_PATTERNS = {
    "right_lung": re.compile(r"\bright\b.*\blung|\blung\b.*\bright\b|^r(ight)?[ _-]?lung$", re.I),
    "left_lung": re.compile(r"\bleft\b.*\blung|\blung\b.*\bleft\b|^l(eft)?[ _-]?lung$", re.I),
    "ggo": re.compile(r"ground[ -]?glass|\bggo\b", re.I),
    "consolidation": re.compile(r"consolidat", re.I),
}


def _codes_of(item: Dataset, name: str) -> set[tuple[str, str]]:
    return {(str(c.CodingSchemeDesignator), str(c.CodeValue)) for c in item.get(name, [])
            if "CodeValue" in c and "CodingSchemeDesignator" in c}


def classify_segments(seg) -> dict[str, list[int]]:
    """Segment numbers of each class (right_lung, left_lung, ggo, consolidation) in a SEG.

    A segment is recognised by its coded property type (ctquant's codes) or, for SEGs from other
    tools, by its label (e.g. "Right lung", "GGO", "ground glass", "consolidation").
    """
    found: dict[str, list[int]] = {key: [] for key in _LABEL_PATTERNS}
    lung = ("SCT", codes.SCT.Lung.value)
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        types = _codes_of(item, "SegmentedPropertyTypeCodeSequence")
        modifiers = set()
        for t in item.get("SegmentedPropertyTypeCodeSequence", []):
            modifiers |= _codes_of(t, "SegmentedPropertyTypeModifierCodeSequence")
        key = None
        if lung in types and ("SCT", codes.cid244.Right.value) in modifiers:
            key = "right_lung"
        elif lung in types and ("SCT", codes.cid244.Left.value) in modifiers:
            key = "left_lung"
        elif ("DCM", codes.DCM.GroundGlassOpacity.value) in types:
            key = "ggo"
        elif (CONSOLIDATION_CODE[1], CONSOLIDATION_CODE[0]) in types or (LOCAL_SCHEME, "CTQ0002") in types:
            key = "consolidation"
        else:
            label = " ".join(str(item.get(n, "")) for n in ("SegmentLabel", "SegmentDescription"))
            key = next((k for k, pattern in _LABEL_PATTERNS.items() if pattern.search(label)), None)
        if key is not None:
            found[key].append(number)
    return found


def _read(path: str | Path):
    import highdicom as hd

    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises various errors on non-SEG files
        raise InputError(f"not a readable DICOM SEG: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         path) from None
    return seg


def _label_volume(seg, classes: dict[str, list[int]], values: dict[str, int], path: Path):
    """A highdicom Volume (spatial, uint8 labels) of the given classes; later classes win overlaps."""
    numbers = sorted({n for key in values for n in classes[key]})
    if not numbers:
        return None
    try:
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, dtype=np.float32,
                                skip_overlap_checks=True)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"the SEG frames do not form a regular volume: {str(exc).splitlines()[0]}",
                         path) from None
    stack = volume.array
    labels = np.zeros(stack.shape[:3], dtype=np.uint8)
    for key, value in values.items():  # dict order: lesions GGO then consolidation (consolidation wins)
        for number in classes[key]:
            labels[stack[..., numbers.index(number)] >= 0.5] = value
    return volume.with_array(labels)


def _as_reference(reference: Any) -> sitk.Image | None:
    if reference is None or isinstance(reference, sitk.Image):
        return reference
    if hasattr(reference, "to_sitk"):
        return reference.to_sitk()
    from ..io.scans import load_scan

    return load_scan(reference).to_sitk()


def read_seg(path: str | Path, which: str = "lesions", reference: Any = None) -> sitk.Image:
    """A DICOM SEG as a SimpleITK uint8 label image.

    Args:
        path: a DICOM SEG file (ctquant's, or a reader's from 3D Slicer, OHIF...).
        which: ``lesions`` (1 GGO, 2 consolidation; consolidation wins where both are marked) or
            ``lungs`` (1 right lung, 2 left lung).
        reference: where to put the labels: a SimpleITK image, a :class:`ctquant.io.scans.Scan`, or a path
            to the source CT (DICOM folder or volume file). The labels are then on the reference grid
            (nearest neighbour; exact when the SEG was made on that grid). Without it, the image spans
            the SEG's own frames (the source's rows and columns, but only the slices from the first to
            the last non-empty frame, as empty frames are not stored), in LPS orientation.

    Raises:
        InputError: not a readable SEG, no segment of the requested kind, irregular frames.
    """
    if which not in ("lesions", "lungs"):
        raise ValueError(f"which must be 'lesions' or 'lungs', not {which!r}")
    path = Path(path)
    seg = _read(path)
    classes = classify_segments(seg)
    values = LESION_VALUES if which == "lesions" else LUNG_VALUES
    volume = _label_volume(seg, classes, values, path)
    if volume is None:
        labels = [str(item.get("SegmentLabel", "?")) for item in seg.SegmentSequence]
        raise InputError(f"no {which} segments in this SEG (segments: {', '.join(labels)})", path)
    image = sitk.DICOMOrient(volume.to_simpleitk(), "LPS")
    image = sitk.Cast(image, sitk.sitkUInt8)
    ref = _as_reference(reference)
    if ref is not None:
        image = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return image


def read_seg_arrays(path: str | Path, source_datasets: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """(lung_labels, lesion_labels) arrays (z, y, x) indexed like ``source_datasets``, matched by SOP UID.

    Exact (no resampling): frame k of the result is the SEG's frame(s) referencing source image k.
    """
    path = Path(path)
    seg = _read(path)
    classes = classify_segments(seg)
    uids = [str(ds.SOPInstanceUID) for ds in source_datasets]
    rows, cols = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    out = []
    for values in (LUNG_VALUES, LESION_VALUES):
        labels = np.zeros((len(uids), rows, cols), dtype=np.uint8)
        numbers = sorted({n for key in values for n in classes[key]})
        if numbers:
            stack = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=False,
                ignore_spatial_locations=False, assert_missing_frames_are_empty=True)
            for key, value in values.items():
                for number in classes[key]:
                    labels[stack[..., numbers.index(number)] > 0] = value
        out.append(labels)
    return out[0], out[1]
