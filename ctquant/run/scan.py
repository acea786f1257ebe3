"""One scan end to end: load, segment lungs and lesions, measure, write the results folder atomically.

A results folder holds ``measures.json`` (written last: its presence marks a complete result),
``measures.csv``, ``lungs.nii.gz`` (1 right, 2 left) and ``lesions.nii.gz`` (1 GGO, 2 consolidation),
on the input's grid and geometry (``segmentation.dcm``, a DICOM SEG, with ``measurements.dcm``, a
DICOM SR of the numbers, instead or as well with ``seg_format``), ``qc.png`` (QC montage) and
``report.html`` (self-contained per-scan report).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..version import __version__
from ..config import code_sha256, config_hash, file_sha256, load_quantify_config, resolve_device
from ..errors import InputError, OutputError
from ..io.scans import Scan, load_scan, write_label_image
from ..outputs.atomic import atomic_output_dir

# The lung, lesion and measure steps (scipy, scikit-image) are imported where they run, so that a bad
# option or output folder is refused without waiting for those imports.

log = logging.getLogger(__name__)

SCHEMA = "ctquant.measures/1"
METHODS = ("model", "hu")
SEG_FORMATS = ("nifti", "dicom-seg", "both")
#: Files a results folder of an older ctquant (one whose measures.json lists no ``files``) may hold.
LEGACY_OUTPUTS = ("measures.json", "measures.csv", "lungs.nii.gz", "lesions.nii.gz", "segmentation.dcm",
                  "qc.png", "report.html")
#: Free space asked for beyond the size estimate of a result (reports, QC picture, CSV), bytes.
MIN_FREE_BYTES = 16 * 1024**2
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_id(text: str) -> str:
    """A subject/time-point ID safe as a single path component (letters, digits, ``._-``)."""
    cleaned = _SAFE_ID.sub("_", str(text)).strip("._")
    if not cleaned:
        raise InputError(f"invalid identifier {text!r}")
    return cleaned[:64]


@dataclass
class Result:
    """One quantified scan: the scan, its lung and lesion labels, the measures (with provenance) and stage
    timings (seconds). What :func:`quantify` returns; :meth:`save` writes what ``ctquant quantify`` writes."""

    scan: Scan
    lung_labels: np.ndarray
    lesion_labels: np.ndarray
    measures: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """``lungs`` (0 outside, 1 right, 2 left) and ``lesions`` (0 none, 1 GGO, 2 consolidation), (z, y, x)."""
        return {"lungs": self.lung_labels, "lesions": self.lesion_labels}

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the numbers come from: versions, code hash, method, model, config, input series, device."""
        return self.measures["provenance"]

    def save(self, out_dir: str | Path, seg_format: str = "nifti", report: bool = True) -> Path:
        """Write the results folder (``measures.json``, ``measures.csv``, masks, ``qc.png``,
        ``report.html``) atomically, as ``ctquant quantify --out`` does; returns ``out_dir``."""
        return write_results(self, out_dir, seg_format, report)


def software_versions() -> dict[str, str]:
    """Versions of ctquant and the libraries that shape its numbers."""
    import monai
    import pydicom
    import SimpleITK as sitk
    import skimage
    import torch

    return {"ctquant": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "monai": monai.__version__, "simpleitk": sitk.__version__,
            "pydicom": pydicom.__version__, "scikit-image": skimage.__version__}


def segment_lungs(scan: Scan, *, lung_model: Any = None, device: str = "cpu", dense_lung_model: bool = True
                  ) -> np.ndarray:
    """Lung labels of a loaded scan (0 outside, 1 right, 2 left) on its grid; a scan without lungs is refused.

    The classical step (:func:`ctquant.segment.lungs.segment_lungs`) recovers dense lung up to the rib cage
    on the dependent side that the scan's ``PatientPosition`` gives (anterior when prone, else posterior);
    then, with ``dense_lung_model``, the shipped lung network (or ``lung_model``, loaded on demand) adds
    the dense lung it cannot see (:func:`ctquant.segment.lung_model.add_dense_lung`)."""
    from ..segment.lung_model import load_lung_model, segment_lungs_with_model
    from ..segment.lungs import dependent_side

    model = (lung_model or load_lung_model(device=device)) if dense_lung_model else None
    lung_labels = segment_lungs_with_model(scan.hu, scan.spacing_mm, model,
                                           dependent=dependent_side(scan.meta.get("patient_position")))
    if not lung_labels.any():
        raise InputError("no lung found in the scan (an abdominal or non-chest series?): nothing to quantify",
                         scan.meta.get("input"))
    return lung_labels


def position_flags(patient_position: str | None) -> list[str]:
    """Flags for a patient position the lung step is not validated for: prone (its dependent side is
    recovered, but measured only on supine scans with pneumonia painted in front) and decubitus (not
    handled: the lower side's dense lung is not recovered)."""
    from ..segment.lungs import PRONE_POSITIONS

    position = str(patient_position or "").strip().upper()
    if position in PRONE_POSITIONS:
        return [f"prone_scan: PatientPosition {position}; dense lung recovered on the anterior (dependent) side, "
                "validated only on supine scans with pneumonia painted in front"]
    if position.startswith(("HFD", "FFD")):
        return [f"decubitus_scan: PatientPosition {position}; dense lung on the lower side is not recovered"]
    return []


def segment_lesions(scan: Scan, lung_labels: np.ndarray, *, method: str = "model",
                    config: dict[str, Any] | None = None, device: str = "auto", model: Any = None) -> np.ndarray:
    """Lesion labels inside the lungs (0 none, 1 GGO, 2 consolidation).

    ``method``: ``model`` (the shipped MONAI network; ``model`` an already loaded one, else loaded on
    ``device``) or ``hu`` (the HU bands and vessel removal of ``config``, default configs/quantify.yaml).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (model or hu)")
    if method == "hu":
        from ..segment.lesions import segment_lesions_hu_config

        return segment_lesions_hu_config(scan.hu, lung_labels, scan.spacing_mm, config or load_quantify_config())
    from ..segment.lesion_model import load_lesion_model, postprocess_settings, segment_lesions as lesions_of

    return lesions_of(scan.hu, lung_labels, model or load_lesion_model(device=device), spacing_mm=scan.spacing_mm,
                      **postprocess_settings(config or load_quantify_config()))


def measure(scan: Scan, lung_labels: np.ndarray, lesion_labels: np.ndarray,
            config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-lung volumes, fractions and mean HU (``lungs``), bilateral involvement (``bilateral``) and
    quality ``flags`` of labelled masks (thresholds from ``config``, default configs/quantify.yaml)."""
    from ..measures.volumes import bilateral_flags, lung_measures, quality_flags

    config = config or load_quantify_config()
    lungs = lung_measures(scan.hu, lung_labels, lesion_labels, scan.spacing_mm)
    return {"lungs": lungs,
            "bilateral": bilateral_flags(lungs, float(config.get("bilateral_min_pct_of_lung", 0.5))),
            "flags": quality_flags(lung_labels, lungs, config)}


def analyse_scan(scan: Scan, *, method: str = "model", device: str = "cpu", config: dict[str, Any] | None = None,
                 model: Any = None, lung_model: Any = None, subject_id: str | None = None,
                 timepoint: str | None = None, progress: Callable[[str], None] | None = None) -> Result:
    """Lungs, lesions and measures for a loaded scan (no file output): :func:`segment_lungs`,
    :func:`segment_lesions`, :func:`measure` and the provenance.

    Args:
        method: ``model`` (the shipped MONAI network) or ``hu`` (HU bands).
        model, lung_model: already loaded lesion and lung models (batch workers load them once); loaded on
            demand if None.
        progress: called with the name of each stage as it starts (for a status line).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (model or hu)")
    progress = progress or (lambda stage: None)
    config = config or load_quantify_config()
    timings: dict[str, float] = {}
    progress("segmenting the lungs")
    t0 = time.perf_counter()
    from ..segment.lung_model import load_lung_model

    if lung_model is None:
        lung_model = load_lung_model(device=device)
    lung_labels = segment_lungs(scan, lung_model=lung_model)
    timings["lungs"] = time.perf_counter() - t0
    progress(f"segmenting lesions ({method})")
    t0 = time.perf_counter()
    model_info: dict[str, Any] = {"model_file": None, "model_sha256": None}
    if method == "model":
        from ..segment.lesion_model import load_lesion_model

        model = model or load_lesion_model(device=device)
        model_info = {"model_file": Path(model.path).name, "model_sha256": model.sha256}
    lesion_labels = segment_lesions(scan, lung_labels, method=method, config=config, device=device, model=model)
    timings["lesions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = measure(scan, lung_labels, lesion_labels, config)
    lungs, bilateral = measured["lungs"], measured["bilateral"]
    flags = measured["flags"] + position_flags(scan.meta.get("patient_position"))
    timings["quantify"] = time.perf_counter() - t0
    subject = sanitize_id(subject_id) if subject_id else (scan.meta.get("subject_hash") or None)
    measures = {
        "schema": SCHEMA,
        "subject_id": subject,
        "timepoint": sanitize_id(timepoint) if timepoint else None,
        "method": method,
        "lungs": lungs,
        "bilateral": bilateral,
        "flags": flags,
        "provenance": {
            "ctquant_version": __version__,
            "code_sha256": code_sha256(),
            "method": method,
            **model_info,
            "lung_model_file": Path(lung_model.path).name,
            "lung_model_sha256": lung_model.sha256,
            "config": config,
            "config_sha256": config_hash(config),
            "input": Path(scan.meta["input"]).name if scan.meta.get("input") else None,  # full path: identifying
            "input_format": scan.meta.get("format"),
            "series_instance_uid": scan.meta.get("series_instance_uid"),
            "series_key": scan.meta.get("series_key"),
            "convolution_kernel": scan.meta.get("convolution_kernel"),
            "kernel_class": scan.meta.get("kernel_class"),
            "series_choice": scan.meta.get("series_choice"),
            "patient_position": scan.meta.get("patient_position"),
            "study_instance_uid": scan.meta.get("study_instance_uid"),
            "study_date": scan.meta.get("study_date"),
            "spacing_mm": [round(s, 6) for s in scan.spacing_mm],
            "shape": list(scan.hu.shape),
            "device": device,
            "pixel_decoder": scan.meta.get("pixel_decoder"),
            "software": software_versions(),
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    for flag in flags:
        log.warning("%s: %s", scan.meta.get("input"), flag)
    return Result(scan, lung_labels, lesion_labels, measures, timings)


def previous_run_files(out_dir: Path) -> set[str]:
    """Names of the files an older run left in ``out_dir``: those its measures.json lists (older results
    without the list: the names ctquant writes). Files the user put there are never among them."""
    try:
        old = json.loads((out_dir / "measures.json").read_text())
    except (OSError, ValueError):
        old = None
    listed = old.get("files") if isinstance(old, dict) else None
    names = set(listed) if isinstance(listed, list) and all(isinstance(n, str) for n in listed) else set(LEGACY_OUTPUTS)
    return {n for n in names if n == Path(n).name and n not in ("", ".", "..") and (out_dir / n).is_file()}


def write_results(seg: Result, out_dir: str | Path, seg_format: str = "nifti", report: bool = True) -> Path:
    """Write a results folder atomically (see module docstring); ``report``: also ``qc.png`` and
    ``report.html`` (:mod:`ctquant.outputs.qc`, :mod:`ctquant.outputs.reports`)."""
    from ..measures.volumes import flatten

    check_seg_format(seg_format)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, last="measures.json", stale=previous_run_files) as tmp:
        if seg_format in ("nifti", "both"):
            write_label_image(seg.scan, seg.lung_labels, tmp / "lungs.nii.gz")
            write_label_image(seg.scan, seg.lesion_labels, tmp / "lesions.nii.gz")
        if seg_format in ("dicom-seg", "both"):
            from ..outputs.dicomseg import source_headers, write_seg
            from ..outputs.dicomsr import write_sr

            seg_path = write_seg(seg.scan, seg.lung_labels, seg.lesion_labels, tmp / "segmentation.dcm",
                                 method=seg.measures["method"],
                                 model_sha256=seg.measures["provenance"].get("model_sha256"))
            # The numbers as a DICOM SR (TID 1500) beside the SEG, referencing its segments.
            write_sr(seg_path, source_headers(seg.scan), seg.measures, tmp / "measurements.dcm")
        m = seg.measures
        row = {"subject_id": m["subject_id"], "timepoint": m["timepoint"], "method": m["method"],
               **flatten(m["lungs"], m["bilateral"]), "flags": ";".join(m["flags"]),
               "series_instance_uid": m["provenance"]["series_instance_uid"],
               "model_sha256": m["provenance"]["model_sha256"],
               "config_sha256": m["provenance"]["config_sha256"],
               "ctquant_version": m["provenance"]["ctquant_version"]}
        with open(tmp / "measures.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        if report:
            from ..outputs.reports import write_scan_outputs

            write_scan_outputs(seg, tmp)  # qc.png, report.html
        m["files"] = sorted([p.name for p in tmp.iterdir()] + ["measures.json"])  # the files of this run
        (tmp / "measures.json").write_text(json.dumps(m, indent=2, default=_json_default) + "\n")
    return out_dir


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_seg_format(seg_format: str) -> None:
    """Refuse an unknown ``--seg-format`` (before any work)."""
    if seg_format not in SEG_FORMATS:
        raise InputError(f"unknown --seg-format {seg_format!r} ({', '.join(SEG_FORMATS[:-1])} or {SEG_FORMATS[-1]})")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out_dir: Path, probe_bytes: int = 1 << 20) -> None:
    """Refuse an output folder that cannot be written, before any work and without creating it: the
    folder, or the closest folder above it that exists, must take a file of ``probe_bytes`` (a full
    disk or a read-only mount fails here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", out_dir)
    where = _nearest_existing(out_dir)
    if not where.is_dir():
        raise OutputError(f"cannot write here: {where} is not a folder", out_dir)
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{out_dir.name}.probe-", dir=where) as probe:
            probe.write(b"\0" * probe_bytes)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", out_dir) from None


def estimated_result_bytes(scan: Scan, seg_format: str) -> int:
    """A generous estimate of a result folder's size: DICOM SEG frames are 1 bit per voxel and segment
    (4 segments), compressed NIfTI labels well under a byte per voxel; plus reports and CSV."""
    voxels = int(np.prod(scan.hu.shape))
    seg = voxels * 4 // 8 if seg_format in ("dicom-seg", "both") else 0
    nifti = voxels // 4 if seg_format in ("nifti", "both") else 0
    return seg + nifti + MIN_FREE_BYTES


def check_free_space(out_dir: Path, needed_bytes: int) -> None:
    """Refuse an output folder on a disk with less than ``needed_bytes`` free (twice: temporary + final)."""
    try:
        free = shutil.disk_usage(_nearest_existing(out_dir)).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < 2 * needed_bytes:
        raise OutputError(f"not enough free disk space ({free / 1e6:.0f} MB free, about "
                          f"{2 * needed_bytes / 1e6:.0f} MB needed)", out_dir)


def run_identity(scan: Scan, subject_id: str | None) -> dict[str, Any]:
    """What says which scan a result is of: subject and series (the input file for volumes)."""
    subject = sanitize_id(subject_id) if subject_id else (scan.meta.get("subject_hash") or None)
    series = scan.meta.get("series_key") or scan.meta.get("series_instance_uid")
    return {"subject_id": subject, "series": series,
            "input": None if series else str(Path(str(scan.meta.get("input"))).resolve())}


def check_other_run(out_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to write over the result of another subject or series (``--force`` allows it)."""
    try:
        old = json.loads((out_dir / "measures.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    prov = old.get("provenance") or {}
    series = prov.get("series_key") or prov.get("series_instance_uid")
    old_input = prov.get("input")
    before = {"subject_id": old.get("subject_id"), "series": series,
              "input": None if series else (str(Path(str(old_input)).resolve()) if old_input else None)}
    differs = [what for what in ("subject_id", "series", "input") if before[what] != identity[what]]
    if differs:
        names = {"subject_id": "subject", "series": "series", "input": "input"}
        detail = "; ".join(f"{names[w]} {before[w] or 'none'} there, {identity[w] or 'none'} now" for w in differs)
        raise OutputError(f"holds the result of another scan ({detail}): choose another --out, or --force to "
                          "replace it", out_dir)


def _check_seg_source(scan: Scan, seg_format: str) -> None:
    """DICOM SEG needs a DICOM source with its UIDs: refuse before segmenting."""
    if seg_format == "nifti":
        return
    from ..outputs.dicomseg import check_source

    if scan.meta.get("series_uid_missing") or any(
            not str(getattr(ds, "SOPInstanceUID", "") or "").strip() for ds in scan.source_datasets):
        raise InputError("DICOM SEG needs the source's SeriesInstanceUID and SOPInstanceUIDs, which this series "
                         "lacks; use --seg-format nifti", scan.meta.get("input"))
    check_source(scan)


def quantify(input_path: str | Path, *, out_dir: str | Path | None = None, method: str = "model",
             device: str = "auto", subject_id: str | None = None, timepoint: str | None = None,
             config_path: str | Path | None = None, series_uid: str | None = None, seg_format: str = "nifti",
             model: Any = None, lung_model: Any = None, extra_provenance: dict[str, Any] | None = None,
             progress: Callable[[str], None] | None = None, refuse_other_run: bool = False) -> Result:
    """Load ``input_path`` (DICOM folder/file or volume), segment and measure it: ``ctquant quantify``.

    With ``out_dir`` the results folder is written too (as by :meth:`Result.save`), and the folder is
    checked before the scan is read: options, the config and the output folder first, free space and
    the DICOM SEG source right after loading (before the long segmentation). ``refuse_other_run``:
    refuse an ``out_dir`` holding the result of another subject or series (``ctquant quantify``
    without ``--force``); either way files of an older run that this run does not write are removed.
    ``extra_provenance`` (e.g. the batch runner's input fingerprint) is merged into ``provenance``;
    ``progress`` is called with each stage's name as it starts.
    """
    progress = progress or (lambda stage: None)
    config = load_quantify_config(config_path)
    if device not in ("auto", "cpu", "cuda"):
        resolve_device(device)  # a bad --device is refused before a long load
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (model or hu)")
    check_seg_format(seg_format)
    if out_dir is not None:
        out_dir = Path(out_dir)
        check_writable(out_dir)
    progress("reading the scan")
    t0 = time.perf_counter()
    scan = load_scan(input_path, series_uid, config.get("series_selection"))
    load_s = time.perf_counter() - t0
    if out_dir is not None:
        _check_seg_source(scan, seg_format)
        if refuse_other_run:
            check_other_run(out_dir, run_identity(scan, subject_id))
        check_free_space(out_dir, estimated_result_bytes(scan, seg_format))
    device = resolve_device(device)  # imports torch: only once the input is known to load
    result = analyse_scan(scan, method=method, device=device, config=config, model=model, lung_model=lung_model,
                          subject_id=subject_id, timepoint=timepoint, progress=progress)
    if extra_provenance:
        result.measures["provenance"].update(extra_provenance)
    result.timings_s = {"load": load_s, **result.timings_s}
    if out_dir is not None:
        progress("writing results")
        t0 = time.perf_counter()
        result.save(out_dir, seg_format)
        result.timings_s["write"] = time.perf_counter() - t0
        log.info("timings (s): %s", {k: round(v, 2) for k, v in result.timings_s.items()})
    return result


def quantify_to_dir(input_path: str | Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """:func:`quantify` with a results folder; returns the measures dict (the batch runner's call)."""
    return quantify(input_path, out_dir=out_dir, **options).measures
