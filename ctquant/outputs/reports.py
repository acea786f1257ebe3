"""Self-contained HTML reports: one per scan (``report.html`` beside ``measures.json``) and one per cohort.

Both are rendered from the Jinja2 templates in ``ctquant/outputs/templates`` (autoescaped) with the CSS inline
and every image embedded as a base64 ``data:`` URI, so the file opens offline, can be e-mailed or
archived, and references nothing outside itself.

- The per-scan report shows the quality flags, the measures per lung (right, left, both), the QC
  montage (:mod:`ctquant.outputs.qc`) and the provenance (ctquant version, method, model and config hashes,
  series/study UIDs, study date, software versions).
- The cohort report (``ctquant report RESULTS_DIR``) gathers every ``measures.json`` under a folder
  (e.g. a batch's or ``ctquant endpoints``' ``scans/<subject>/<timepoint>/`` layout): a summary table,
  then each scan's section with its QC image; plus, when present in the folder's root, the endpoint
  tables (``endpoints.csv``, ``subjects.csv``, ``failures.csv``) and plots (``*.png``), also from an
  ``endpoints/`` subfolder (``ctquant batch``'s layout).

Privacy: the reports show the subject ID given to ctquant (or its hash of the patient ID), never a
patient name or ID, and withhold the input path (folder names often carry names); file-system paths
in error messages of ``failures.csv`` are replaced by ``<path>``.
"""

from __future__ import annotations

import base64
import copy
import csv
import datetime as dt
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..version import __version__
from ..errors import InputError
from .atomic import atomic_write_text
from .columns import SUBJECT_COLUMNS

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
SIDES = (("right", "Right lung"), ("left", "Left lung"), ("both", "Both lungs"))
ROWS = (
    ("Lung volume (mL)", "lung_volume_ml", ".1f"),
    ("GGO volume (mL)", "ggo_volume_ml", ".1f"),
    ("GGO (% of lung)", "ggo_pct", ".2f"),
    ("Consolidation volume (mL)", "consolidation_volume_ml", ".1f"),
    ("Consolidation (% of lung)", "consolidation_pct", ".2f"),
    ("Opacity, GGO + consolidation (mL)", "opacity_volume_ml", ".1f"),
    ("Opacity (% of lung)", "opacity_pct", ".2f"),
    ("Mean lung density (HU)", "mean_lung_hu", ".0f"),
)
#: Columns of the endpoint tables never shown (paths and anything that may identify a patient).
_HIDDEN_COLUMNS = re.compile(r"input|path|file|patient|name|birth|mrn|accession", re.I)
_PATH_TOKEN = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s:;,'\"\\/]+)+[\\/]?")
#: QC images in the cohort report are thumbnails: JPEG no wider than this (pixels), linked to the
#: scan's full-size ``qc.png``; the per-scan report embeds the full image (click to zoom).
COHORT_QC_MAX_WIDTH = 640
COHORT_QC_JPEG_QUALITY = 70


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec`` ("–" when missing or not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    if number != number:  # NaN
        return "–"
    return format(number, spec)


def data_uri(data: bytes, mime: str) -> str:
    """A base64 ``data:`` URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png_bytes(qc_png: bytes | str | Path | None) -> bytes | None:
    if qc_png is None:
        return None
    if isinstance(qc_png, bytes):
        return qc_png
    path = Path(qc_png)
    return path.read_bytes() if path.is_file() else None


def _as_jpeg(png: bytes, max_width: int = COHORT_QC_MAX_WIDTH,
             quality: int = COHORT_QC_JPEG_QUALITY) -> tuple[bytes, str]:
    """A smaller JPEG of a PNG for embedding many of them (falls back to the PNG)."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            image = image.convert("RGB")
            if image.width > max_width:
                image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality, optimize=True)
        return buf.getvalue(), "image/jpeg"
    except Exception as exc:  # noqa: BLE001 - a broken image must not stop the report
        log.warning("cannot re-encode a QC image (%s); embedding it as it is", exc)
        return png, "image/png"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _redacted_measures(measures: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(measures)
    prov = doc.get("provenance")
    if isinstance(prov, dict) and prov.get("input") is not None:
        prov["input"] = "(withheld)"
    return doc


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------------------------------
# One scan
# --------------------------------------------------------------------------------------------------


# -- how far to trust the numbers: the lung step's measured accuracy (configs/lung_accuracy.json) and the
# lesion method's (the model card metadata) ---
def lung_accuracy_lines(record_path: str | Path | None = None) -> list[str]:
    """Plain-text lines on the measured accuracy of the lung step on real CT.

    Read from ``configs/lung_accuracy.json`` (``scripts/evaluate_lungs.py --real --record-accuracy``);
    shown only when its ``lung_code_sha256`` is the hash of the lung code running now
    (:data:`ctquant.segment.lungs.CODE_FILES`) and its ``lung_model_sha256`` that of the shipped lung network.
    """
    from ..config import CONFIG_DIR, code_sha256, file_sha256
    from ..segment.lung_model import DEFAULT_MODEL_PATH
    from ..segment.lungs import CODE_FILES

    try:
        record = json.loads(Path(record_path or CONFIG_DIR / "lung_accuracy.json").read_text())
    except (OSError, ValueError):
        record = {}
    network = file_sha256(DEFAULT_MODEL_PATH) if DEFAULT_MODEL_PATH.is_file() else None
    if (not record.get("lines") or record.get("lung_code_sha256") != code_sha256(CODE_FILES)
            or record.get("lung_model_sha256") != network):
        return ["No measured accuracy is recorded for this version of the lung step (its code differs from the "
                "code that was measured): treat the lung masks, and every % of lung, as unvalidated."]
    return list(record["lines"])


def lesion_accuracy_lines(method: str | None, model_sha256: str | None,
                          metadata_path: str | Path | None = None) -> list[str]:
    """Plain-text lines on the measured accuracy of this scan's lesion method.

    Read from ``ctquant_accuracy`` in ``configs/metadata.json`` (written with the model card); the
    model's figures are shown only when ``model_sha256`` is the checkpoint they were measured on.
    """
    from ..config import CONFIG_DIR

    try:
        card = json.loads(Path(metadata_path or CONFIG_DIR / "metadata.json").read_text()).get("ctquant_accuracy") or {}
    except (OSError, ValueError):
        card = {}
    if method == "model":
        acc = card.get("model") or {}
        if not acc or not model_sha256 or card.get("model_sha256") != model_sha256:
            return ["No measured accuracy is recorded for this lesion model file (its SHA-256 differs from the "
                    "model card's): treat the GGO and consolidation figures as unvalidated."]
        lines = [acc["validation"], acc.get("cross_validation"), acc.get("specificity")]
    elif method == "hu":
        lines = [(card.get("hu") or {}).get("specificity")]
    else:
        lines = []
    return [line for line in lines if line] + ([card["see"]] if lines and card.get("see") else [])


def scan_context(measures: dict[str, Any], qc_png: bytes | str | Path | None = None, *,
                 jpeg: bool = False, relpath: str = "", anchor: str = "scan") -> dict[str, Any]:
    """The template variables of one scan (numbers formatted, provenance listed, QC image embedded).

    ``jpeg``: embed a thumbnail (cohort report) that links to the full-size ``qc.png`` in ``relpath``;
    otherwise the full image, which a click enlarges to its natural size (per-scan report).
    """
    lungs = measures.get("lungs") or {}
    prov = measures.get("provenance") or {}
    subject = measures.get("subject_id") or "unnamed"
    timepoint = measures.get("timepoint") or "–"
    rows = [{"name": name, "cells": [fmt((lungs.get(side) or {}).get(key), spec) for side, _ in SIDES]}
            for name, key, spec in ROWS]
    bilateral = [(name, bool((measures.get("bilateral") or {}).get(key)))
                 for key, name in (("ggo", "GGO"), ("consolidation", "consolidation"), ("opacity", "opacity"))]
    config = prov.get("config") or {}
    software = prov.get("software") or {}
    spacing = prov.get("spacing_mm")
    provenance = [
        ("Subject ID", subject),
        ("Time point", timepoint),
        ("Method", measures.get("method") or prov.get("method") or "–"),
        ("ctquant version", prov.get("ctquant_version") or "–"),
        ("ctquant code SHA-256", prov.get("code_sha256") or "–"),
        ("Lesion model file", prov.get("model_file") or "– (none: HU bands)"),
        ("Lesion model SHA-256", prov.get("model_sha256") or "–"),
        ("Lung model SHA-256", prov.get("lung_model_sha256") or "–"),
        ("Config SHA-256", prov.get("config_sha256") or "–"),
        ("Series Instance UID", prov.get("series_instance_uid") or "–"),
        ("Study Instance UID", prov.get("study_instance_uid") or "–"),
        ("Study date", _date(prov.get("study_date"))),
        ("Input format", prov.get("input_format") or "–"),
        ("Voxel spacing z, y, x (mm)", ", ".join(f"{float(s):g}" for s in spacing) if spacing else "–"),
        ("Volume shape z, y, x", " × ".join(str(s) for s in prov.get("shape") or []) or "–"),
        ("Device", prov.get("device") or "–"),
        ("Quantified (UTC)", prov.get("created_utc") or "–"),
        ("Software", ", ".join(f"{k} {v}" for k, v in software.items()) or "–"),
        ("Schema", measures.get("schema") or "–"),
    ]
    png = _png_bytes(qc_png)
    qc_uri = None
    if png:
        data, mime = _as_jpeg(png) if jpeg else (png, "image/png")
        qc_uri = data_uri(data, mime)
    both = lungs.get("both") or {}
    right, left = lungs.get("right") or {}, lungs.get("left") or {}
    summary = [fmt(both.get("lung_volume_ml"), ".0f"), fmt(right.get("lung_volume_ml"), ".0f"),
               fmt(left.get("lung_volume_ml"), ".0f"), fmt(both.get("ggo_pct"), ".2f"),
               fmt(both.get("consolidation_pct"), ".2f"), fmt(both.get("opacity_pct"), ".2f"),
               f"{fmt(right.get('ggo_pct'), '.2f')} / {fmt(left.get('ggo_pct'), '.2f')}",
               f"{fmt(right.get('consolidation_pct'), '.2f')} / {fmt(left.get('consolidation_pct'), '.2f')}"]
    return {
        "title": f"{subject} · {timepoint}",
        "subject": subject,
        "timepoint": timepoint,
        "method": measures.get("method") or "–",
        "study_date": _date(prov.get("study_date")),
        "ctquant_version": prov.get("ctquant_version") or "–",
        "flags": list(measures.get("flags") or []),
        "sides": [{"key": key, "title": title} for key, title in SIDES],
        "rows": rows,
        "bilateral": bilateral,
        "bilateral_threshold": fmt(config.get("bilateral_min_pct_of_lung", 0.5), "g"),
        "provenance": provenance,
        "config_json": json.dumps(config, indent=2, sort_keys=True, default=_json_default),
        "measures_json": json.dumps(_redacted_measures(measures), indent=2, default=_json_default),
        "qc_uri": qc_uri,
        "qc_thumbnail": jpeg,
        "qc_link": f"{relpath}/qc.png" if relpath and relpath != "." else "qc.png",
        "summary": summary,
        "relpath": relpath,
        "anchor": anchor,
        "signature": (measures.get("method"), prov.get("model_sha256"), prov.get("config_sha256")),
        "accuracy": lung_accuracy_lines() + lesion_accuracy_lines(measures.get("method") or prov.get("method"),
                                                                   prov.get("model_sha256")),
    }


def _date(value: Any) -> str:
    text = str(value or "")
    if re.fullmatch(r"\d{8}", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "–"


def render_scan_report(measures: dict[str, Any], qc_png: bytes | str | Path | None = None) -> str:
    """The per-scan HTML report as a string."""
    return _env().get_template("scan.html").render(scan=scan_context(measures, qc_png), version=__version__,
                                                   generated_utc=_now())


def write_scan_report(measures: dict[str, Any], path: str | Path, qc_png: bytes | str | Path | None = None) -> Path:
    """Write the per-scan HTML report (atomically)."""
    return atomic_write_text(Path(path), render_scan_report(measures, qc_png), what="cannot write the report")


def write_scan_outputs(seg, folder: str | Path) -> tuple[Path, Path]:
    """Write ``qc.png`` and ``report.html`` of a :class:`ctquant.run.scan.Result` into ``folder``."""
    from .qc import qc_montage

    folder = Path(folder)
    qc = qc_montage(seg.scan, seg.lung_labels, seg.lesion_labels, seg.measures, folder / "qc.png")
    report = folder / "report.html"
    report.write_text(render_scan_report(seg.measures, qc), encoding="utf-8")
    return qc, report


# --------------------------------------------------------------------------------------------------
# A cohort
# --------------------------------------------------------------------------------------------------


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text or "")]


def _timepoint_key(tp: str | None) -> tuple[int, list[Any]]:
    tp = tp or ""
    return (0 if tp.lower() in ("baseline", "screening", "day0", "d0") else 1, _natural(tp))


def collect_results(results_dir: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Every readable ``measures.json`` under ``results_dir`` (hidden/temporary folders skipped),
    sorted by subject and time point; and the relative paths of those that could not be read."""
    root = Path(results_dir)
    found, skipped = [], []
    for path in sorted(root.rglob("measures.json")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or "lungs" not in doc:
                raise ValueError("not a ctquant measures file")
        except (OSError, ValueError) as exc:
            log.warning("%s: skipped (%s)", path, exc)
            skipped.append(str(rel))
            continue
        found.append((path, doc))
    found.sort(key=lambda item: (_natural(str(item[1].get("subject_id") or "")),
                                 _timepoint_key(item[1].get("timepoint")), str(item[0])))
    return found, skipped


def _cell(text: str) -> dict[str, Any]:
    try:
        number = float(text)
    except (TypeError, ValueError):
        return {"text": text, "num": False, "long": len(text) > 40, "head": False}
    if re.fullmatch(r"-?\d+\.\d{4,}", text.strip()):
        text = f"{number:.3f}"
    return {"text": text, "num": True, "long": False, "head": False}


#: subjects.csv columns shown (besides the manifest's extra columns), in this order.
SUBJECT_SHOWN = ("subject_id", "endpoint", "from_timepoint", "to_timepoint", "evaluable", "verdict", "reason",
                 "both_from", "both_to", "both_abs_change", "both_rel_change_pct", "right_rel_change_pct",
                 "left_rel_change_pct", "days_between", "mismatch", "acquisition_differs", "from_flags", "to_flags")


def read_csv_table(path: Path, title: str, *, redact_paths: bool = False, transpose: bool = False,
                   shown: Sequence[str] | None = None, known: Sequence[str] = ()) -> dict[str, Any] | None:
    """A CSV as a template table, without columns that may identify a patient or a path.

    ``shown``: the columns to show, in order (plus any column not in ``known``, e.g. a manifest's
    extra columns); ``transpose``: one row per column (for a few wide records such as endpoints).
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [c for c in (reader.fieldnames or []) if not _HIDDEN_COLUMNS.search(c)]
            if shown is not None:
                columns = [c for c in shown if c in columns] + [c for c in columns if c not in shown and c not in known]
            records = [[str(record.get(c) if record.get(c) is not None else "") for c in columns]
                       for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("%s: not shown (%s)", path, exc)
        return None
    if redact_paths:
        records = [[_PATH_TOKEN.sub("<path>", v) for v in values] for values in records]
    if transpose and records:
        head = columns[0]
        return {"title": title, "columns": [head] + [r[0] for r in records],
                "rows": [[{"text": name, "num": False, "long": False, "head": True}]
                         + [_cell(r[k]) for r in records] for k, name in enumerate(columns) if k > 0]}
    return {"title": title, "columns": columns, "rows": [[_cell(v) for v in values] for values in records]}


def _anchors(names: Iterable[str]) -> list[str]:
    out, seen = [], set()
    for name in names:
        base = "scan-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "x")
        anchor, k = base, 1
        while anchor in seen:
            k += 1
            anchor = f"{base}-{k}"
        seen.add(anchor)
        out.append(anchor)
    return out


def cohort_context(results_dir: str | Path, *, embed_qc: bool = True,
                   report_dir: str | Path | None = None) -> dict[str, Any]:
    """The template variables of the cohort report of ``results_dir``; links to the scans' full-size
    QC images are relative to ``report_dir`` (the report's folder; default ``results_dir``)."""
    root = Path(results_dir)
    base = Path(report_dir) if report_dir is not None else root
    if not root.is_dir():
        raise InputError("not a folder", root)
    results, skipped = collect_results(root)
    anchors = _anchors(f"{m.get('subject_id')}-{m.get('timepoint')}" for _, m in results)
    scans = []
    for (path, measures), anchor in zip(results, anchors):
        qc = path.parent / "qc.png"
        context = scan_context(measures, qc if embed_qc and qc.is_file() else None, jpeg=True,
                               relpath=str(path.parent.relative_to(root)) or ".", anchor=anchor)
        context["qc_link"] = Path(os.path.relpath(qc.resolve(), base.resolve())).as_posix()
        scans.append(context)
    # Endpoint outputs: in the folder itself (a report folder) or its ``endpoints/`` (``ctquant batch`` and
    # ``ctquant endpoints``); when both hold a report, the top one is an older ctquant's copy: not shown twice.
    sub = root / "endpoints"
    places = [root] + ([sub] if sub.is_dir() else [])
    newer = {p.name for p in sub.iterdir()} if sub.is_dir() else set()

    def shown_here(place: Path, name: str) -> bool:
        return (place / name).is_file() and not (place == root and name in newer)
    tables = []
    for place in places:
        if shown_here(place, "endpoints.csv"):
            tables.append(read_csv_table(place / "endpoints.csv", "Endpoints: participants with reduction "
                                         "(endpoints.csv)", transpose=True))
        if shown_here(place, "subjects.csv"):
            tables.append(read_csv_table(place / "subjects.csv", "Per participant and endpoint (subjects.csv)",
                                         shown=SUBJECT_SHOWN, known=SUBJECT_COLUMNS))
    tables = [t for t in tables if t]
    failures = read_csv_table(root / "failures.csv", "Failed scans", redact_paths=True) \
        if (root / "failures.csv").is_file() else None
    plots = [{"name": str(p.relative_to(root)), "uri": data_uri(p.read_bytes(), "image/png")}
             for place in places for p in sorted(place.glob("*.png"), key=lambda p: _natural(p.name))
             if shown_here(place, p.name)]
    if not scans and not tables and not plots:
        raise InputError("no ctquant results here (no measures.json, endpoints.csv or plots)", root)
    signatures = sorted({s["signature"] for s in scans}, key=str)
    mixed = []
    if len(signatures) > 1:
        for method, model, config in signatures:
            n = sum(1 for s in scans if s["signature"] == (method, model, config))
            mixed.append(f"{n} scan(s): method {method}, model {(model or '–')[:12]}, config {(config or '–')[:12]}")
    if skipped:
        mixed.append(f"unreadable measures.json skipped: {', '.join(skipped)}")
    return {
        "title": root.resolve().name,
        "scans": scans,
        "n_subjects": len({s["subject"] for s in scans}),
        "methods": sorted({str(s["method"]) for s in scans}),
        "mixed": mixed,
        "endpoint_tables": tables,
        "plots": plots,
        "failures": failures if failures and failures["rows"] else None,
    }


def render_cohort_report(results_dir: str | Path, *, embed_qc: bool = True,
                         report_dir: str | Path | None = None) -> str:
    """The cohort HTML report of a results folder as a string (``report_dir``: where it will be
    written, for the links to the full-size QC images; default ``results_dir``)."""
    context = cohort_context(results_dir, embed_qc=embed_qc, report_dir=report_dir)
    return _env().get_template("cohort.html").render(**context, version=__version__, generated_utc=_now())


def write_cohort_report(results_dir: str | Path, out: str | Path | None = None, *, embed_qc: bool = True) -> Path:
    """Write the cohort report (default ``RESULTS_DIR/cohort_report.html``, which never overwrites a
    scan's own ``report.html``) atomically; returns its path."""
    out = Path(out) if out is not None else Path(results_dir) / "cohort_report.html"
    return atomic_write_text(out, render_cohort_report(results_dir, embed_qc=embed_qc, report_dir=out.parent),
                             what="cannot write the report")
