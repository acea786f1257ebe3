"""``ctquant batch``: quantify a manifest of scans — resumable, parallel, failure-isolated, distributable.

A manifest is a CSV with columns ``subject_id, timepoint, input`` (plus an optional ``series_uid`` and
any extra columns, which are carried through to ``cohort.csv``). Relative inputs resolve against the
manifest's folder. Everything is written under the output folder ``DIR``::

    DIR/scans/<subject>/<timepoint>/   one results folder per scan (see ctquant.run.scan), named from
                                       the sanitized manifest IDs only
    DIR/cohort.csv                     one row per manifest row: status ok / skipped / failed,
                                       the flattened measures (as in measures.csv), extra columns,
                                       manifest line, results folder relative to DIR
    DIR/failures.csv                   subject, time point, manifest line, exit code, category, reason
    DIR/inputs.csv                     subject, time point, manifest line, input path, series UID:
                                       the ONE output naming the inputs' paths (identifying: folder
                                       names often carry patient names; do not share it)
    DIR/failures.log                   tracebacks of internal errors (bugs), when there were any
    DIR/batch.json                     settings, counts and provenance of the last run
    DIR/endpoints/                     the cohort endpoint report, when a subject has >= 2 time points
                                       (``group_by``: per group as well)

IDs are written everywhere as the folders spell them (:func:`ctquant.run.scan.sanitize_id`).

**Checks before work.** Time points that no endpoint uses are warned about (with the endpoint's
spelling when only spaces, case or punctuation differ); the same scan under two subject/time points
(same input, same files, same manifest ``series_uid``, same series as a current result) is refused
unless ``allow_duplicates``; after quantifying, so is a SeriesInstanceUID found twice.

**Interruption.** Ctrl-C (SIGINT) cancels the queued scans, terminates the workers of the running
ones, removes their temporary folders and raises :class:`~ctquant.errors.Interrupted` (exit code
130); later SIGINTs are ignored while this happens. Finished results stay; a re-run resumes.

**Resuming.** A scan is skipped when its ``measures.json`` (written last, atomically, by the pipeline)
exists and is current: same input fingerprint (relative paths, sizes and mtimes of the input's
files), same ctquant code (a hash of the package's files), same quantification config hash, same
model hash, same method, and the label files of the asked ``--seg-format`` are there. Anything else is recomputed (``--force``: everything). A killed run
leaves at most hidden ``.<timepoint>.tmp-*`` folders, which the next run removes.

**Failure isolation.** :func:`run_one` never raises: a :class:`~ctquant.errors.CtquantError` is
recorded with its exit code and reason, any other exception as an internal error (exit code 1);
the batch goes on and the CLI exits with 8 when anything failed.

**Executors.** The same task function :func:`run_one` runs

* in-process (``workers=1``),
* in a local process pool (``--workers N``; each worker loads the lesion model once and uses
  ``cpu_count // N`` torch/ITK threads so N workers do not oversubscribe the cores), or
* on a Dask cluster (``--scheduler tcp://host:8786``; ``pip install 'ctquant[dask]'``); each Dask
  worker process loads the model once (a per-process cache keyed by model path and device).

Pointing it at a real cluster::

    # on the scheduler node
    dask scheduler                                    # listens on tcp://<host>:8786
    # on each compute node (same ctquant version, same paths to the data, models and DIR)
    dask worker tcp://<host>:8786 --nworkers 1 --nthreads 1
    # anywhere that sees the same paths
    ctquant batch manifest.csv --out /shared/results --scheduler tcp://<host>:8786

On a SLURM/PBS cluster, ``dask-jobqueue`` (``SLURMCluster``; not a ctquant dependency) starts the
workers as batch jobs; pass its scheduler address. All workers must see the manifest's inputs and
``DIR`` under the **same filesystem paths** as the machine running ``ctquant batch`` (a shared
filesystem), because tasks carry absolute paths. See ``scripts/dask_cluster_example.py``.

Only one batch may write to a ``DIR`` at a time (``DIR/.batch.lock``).
"""

from __future__ import annotations

import csv
import ctypes
import datetime as dt
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, TextIO

from ..version import __version__
from ..config import code_sha256, config_hash, file_sha256, load_quantify_config
from ..errors import CtquantError, InputError, Interrupted, ModelError, OutputError
from ..outputs.atomic import atomic_write_text

log = logging.getLogger(__name__)

SCHEMA = "ctquant.batch/1"
REQUIRED_COLUMNS = ("subject_id", "timepoint", "input")
#: Optional manifest column naming the DICOM series to use (not an "extra" column).
SERIES_COLUMN = "series_uid"
STATUSES = ("ok", "skipped", "failed")
SEG_FILES = {"nifti": ("lungs.nii.gz", "lesions.nii.gz"), "dicom-seg": ("segmentation.dcm", "measurements.dcm"),
             "both": ("lungs.nii.gz", "lesions.nii.gz", "segmentation.dcm", "measurements.dcm")}
FAILURE_COLUMNS = ["subject_id", "timepoint", "manifest_line", "exit_code", "category", "reason"]
#: ``DIR/inputs.csv``: the only batch output that names the inputs' paths (identifying).
INPUT_COLUMNS = ["subject_id", "timepoint", "manifest_line", "input", "series_uid"]
LOCK_NAME = ".batch.lock"


# --------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row: IDs as written, the resolved input, and the extra columns' values."""

    line: int
    subject_id: str
    timepoint: str
    input: str
    series_uid: Optional[str] = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """Sanitized (subject, time point): the results folder's two path components."""
        return _sanitize(self.subject_id), _sanitize(self.timepoint)


def _sanitize(text: str) -> str:
    from .scan import sanitize_id

    return sanitize_id(text)


def read_manifest(path: str | Path) -> tuple[list[ManifestRow], list[str]]:
    """The rows of a manifest CSV and the names of its extra columns.

    Raises :class:`InputError` (one line, naming the manifest and line) when the file is unreadable,
    lacks a required column, has no rows, has an empty or unusable ID, or lists a subject/time point
    twice (also after sanitizing the IDs into folder names). An empty ``input`` cell is not an
    error here: that scan fails on its own.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            body = list(reader)
    except FileNotFoundError:
        raise InputError("manifest not found", path) from None
    except IsADirectoryError:
        raise InputError("manifest is a folder, not a CSV file", path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read manifest: {str(exc).splitlines()[0]}", path) from None
    if not header or not any(h.strip() for h in header):
        raise InputError("manifest is empty (needs a header: subject_id,timepoint,input)", path)
    columns = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"manifest lacks column(s) {', '.join(missing)} (needs subject_id, timepoint, input; "
                         f"has {', '.join(c for c in columns if c) or 'none'})", path)
    dupes = sorted({c for c in columns if c and columns.count(c) > 1})
    if dupes:
        raise InputError(f"manifest has duplicate column(s) {', '.join(dupes)}", path)
    extras = [c for c in columns if c and c not in REQUIRED_COLUMNS and c != SERIES_COLUMN]
    rows: list[ManifestRow] = []
    seen: dict[tuple[str, str], int] = {}
    for line, cells in enumerate(body, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(columns):
            raise InputError(f"line {line}: {len(cells)} cells but the header has {len(columns)} columns", path)
        values = {col: (cells[i].strip() if i < len(cells) else "") for i, col in enumerate(columns) if col}
        sid, tp, src = values["subject_id"], values["timepoint"], values["input"]
        for what, value in (("subject_id", sid), ("timepoint", tp)):
            if not value:
                raise InputError(f"line {line}: empty {what}", path)
            try:
                _sanitize(value)
            except InputError:
                raise InputError(f"line {line}: {what} {value!r} has no letters or digits", path) from None
        row = ManifestRow(line, sid, tp, _resolve_input(src, path), values.get(SERIES_COLUMN) or None,
                          {c: values.get(c, "") for c in extras})
        if row.key in seen:
            raise InputError(f"line {line}: duplicate subject/time point {sid}/{tp} (same results folder "
                             f"{row.key[0]}/{row.key[1]} as line {seen[row.key]})", path)
        seen[row.key] = line
        rows.append(row)
    if not rows:
        raise InputError("manifest has no rows", path)
    return rows, extras


def _resolve_input(text: str, manifest: Path) -> str:
    if not text:
        return ""
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = manifest.resolve().parent / p
    return os.path.normpath(str(p))


def manifest_has_follow_up(rows: Sequence[ManifestRow]) -> bool:
    """True when some subject has two or more time points (an endpoint report makes sense)."""
    per_subject = Counter(r.key[0] for r in rows)
    return any(n >= 2 for n in per_subject.values())


def _squash(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def _folder_spelling(label: str) -> Optional[str]:
    try:
        return _sanitize(label)
    except InputError:
        return None


def timepoint_warnings(rows: Sequence[ManifestRow], endpoint_timepoints: Sequence[str]) -> list[str]:
    """Warnings about the manifest's time points: one that no endpoint uses (with the endpoint time
    point it probably means, e.g. ``day 14`` for ``day14``), and one spelt differently in folders."""
    wanted = {_folder_spelling(tp): tp for tp in endpoint_timepoints if _folder_spelling(tp)}
    out = []
    for label in dict.fromkeys(r.timepoint for r in rows):
        key = _sanitize(label)
        if key != label:
            out.append(f"manifest time point {label!r} is written {key!r} in folders and tables")
        if wanted and key not in wanted:
            guess = [tp for tp in wanted.values() if _squash(tp) == _squash(label)]
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            out.append(f"manifest time point {label!r} is used by no endpoint (they use "
                       f"{', '.join(sorted(wanted.values()))}){hint}")
    return out


def same_scans(values: Mapping[tuple[str, str], Optional[str]], what: str) -> list[str]:
    """One message per ``what`` (input folder, series UID, ...) shared by two subject/time points."""
    by_value: dict[str, list[tuple[str, str]]] = {}
    for key, value in values.items():
        if value:
            by_value.setdefault(value, []).append(key)
    return [f"the same {what} is listed as {' and '.join(f'{s}/{t}' for s, t in keys)}"
            for keys in by_value.values() if len(keys) > 1]


def duplicate_scans_before(rows: Sequence[ManifestRow], fingerprints: Mapping[tuple[str, str], Optional[str]],
                           result_uids: Mapping[tuple[str, str], Optional[str]]) -> list[str]:
    """The same scan under two subject/time points, as far as is known before quantifying: same
    input path, same files (fingerprint), same manifest ``series_uid``, same series of a current result."""
    empty = hashlib.sha256().hexdigest()[:32]  # a folder without files is no scan to compare
    return (same_scans({r.key: r.input for r in rows}, "input")
            + same_scans({k: v for k, v in fingerprints.items() if v != empty}, "input files (names, sizes, times)")
            + same_scans({r.key: r.series_uid for r in rows}, "manifest series_uid")
            + same_scans(result_uids, "SeriesInstanceUID"))


def result_series_uids(records: Mapping[tuple[str, str], "ScanRecord"]) -> dict[tuple[str, str], Optional[str]]:
    """The SeriesInstanceUID each result was made from."""
    return {key: (r.measures or {}).get("provenance", {}).get("series_instance_uid")
            for key, r in records.items() if r.measures}


# --------------------------------------------------------------------------------------------------
# Fingerprints and planning


def input_fingerprint(path: str | Path) -> Optional[str]:
    """A hash of the input's files (relative paths, sizes, mtimes); ``None`` when it does not exist.

    Hidden files and folders are ignored, as the DICOM reader ignores them.
    """
    path = Path(path)
    digest = hashlib.sha256()
    try:
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    full = Path(dirpath) / name
                    st = full.stat()
                    rel = full.relative_to(path).as_posix()
                    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            return None
    except OSError:
        return None
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class BatchSettings:
    """What every scan of a batch is quantified with, and the hashes a current result must match."""

    method: str = "model"
    device: str = "auto"
    config_path: Optional[str] = None
    seg_format: str = "nifti"
    model_path: Optional[str] = None
    config_sha256: str = ""
    model_sha256: Optional[str] = None
    torch_threads: Optional[int] = None
    code_sha256: str = ""
    lung_model_sha256: Optional[str] = None


def make_settings(method: str = "model", device: str = "auto", config_path: str | Path | None = None,
                  seg_format: str = "nifti", model_path: str | Path | None = None) -> BatchSettings:
    """Validate the options and compute the config and model hashes (model file read, not loaded)."""
    from .scan import METHODS

    if method not in METHODS:
        raise InputError(f"unknown method {method!r} (model or hu)")
    if seg_format not in SEG_FILES:
        raise InputError(f"unknown --seg-format {seg_format!r} (nifti, dicom-seg or both)")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"unknown device {device!r} (auto, cpu or cuda)")
    config_file = str(Path(config_path).expanduser().resolve()) if config_path else None
    chash = config_hash(load_quantify_config(config_file))
    mpath, mhash = None, None
    if method == "model":
        if model_path is None:
            from ..segment.lesion_model import DEFAULT_MODEL_PATH

            model_path = DEFAULT_MODEL_PATH
        mpath = str(Path(model_path).expanduser().resolve())
        if not Path(mpath).is_file():
            raise ModelError("lesion model weight file not found (use --method hu, or install the model)", mpath)
        mhash = file_sha256(mpath)
    from ..segment.lung_model import DEFAULT_MODEL_PATH as LUNG_MODEL_PATH

    if not LUNG_MODEL_PATH.is_file():
        raise ModelError("lung model weight file not found (reinstall ctquant)", LUNG_MODEL_PATH)
    return BatchSettings(method, device, config_file, seg_format, mpath, chash, mhash, code_sha256=code_sha256(),
                         lung_model_sha256=file_sha256(LUNG_MODEL_PATH))


@dataclass(frozen=True)
class ScanTask:
    """Everything one worker needs to quantify one scan (picklable; absolute paths)."""

    subject_id: str
    timepoint: str
    input: str
    output_dir: str
    settings: BatchSettings
    series_uid: Optional[str] = None
    fingerprint: Optional[str] = None
    line: Optional[int] = None


@dataclass
class ScanRecord:
    """The outcome of one manifest row: ``ok`` (quantified now), ``skipped`` (current) or ``failed``."""

    subject_id: str
    timepoint: str
    input: str
    output_dir: str
    status: str
    seconds: Optional[float] = None
    exit_code: int = 0
    category: str = ""
    reason: str = ""
    measures: Optional[dict[str, Any]] = None
    traceback: Optional[str] = None
    line: Optional[int] = None

    @property
    def key(self) -> tuple[str, str]:
        """Sanitized (subject, time point), as :attr:`ManifestRow.key`."""
        return _sanitize(self.subject_id), _sanitize(self.timepoint)

    def failure_row(self) -> dict[str, Any]:
        """This record as a ``failures.csv`` row (the manifest line, not the input's path)."""
        return {"subject_id": self.subject_id, "timepoint": self.timepoint, "manifest_line": self.line,
                "exit_code": self.exit_code, "category": self.category, "reason": self.reason}


def result_is_current(result_dir: str | Path, settings: BatchSettings, fingerprint: Optional[str],
                      key: tuple[str, str], series_uid: Optional[str] = None) -> tuple[bool, str]:
    """Whether ``result_dir`` holds a complete result made from this input with these settings
    (and of the manifest's ``series_uid``, when it names one).

    Returns ``(current, why_not)``.
    """
    result_dir = Path(result_dir)
    path = result_dir / "measures.json"
    if not path.is_file():
        return False, "no result yet"
    try:
        measures = json.loads(path.read_text())
        prov = measures["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "unreadable measures.json"
    if fingerprint is None:
        return False, "input missing or unreadable"
    checks = (
        ("method", measures.get("method"), settings.method),
        ("ctquant code", prov.get("code_sha256"), settings.code_sha256),
        ("config", prov.get("config_sha256"), settings.config_sha256),
        ("model", prov.get("model_sha256"), settings.model_sha256),
        ("lung model", prov.get("lung_model_sha256"), settings.lung_model_sha256),
        ("input", prov.get("input_fingerprint"), fingerprint),
        ("subject", measures.get("subject_id"), key[0]),
        ("time point", measures.get("timepoint"), key[1]),
        ("series", prov.get("series_instance_uid") if series_uid else None, series_uid),
    )
    for what, have, want in checks:
        if have != want:
            return False, f"{what} changed"
    missing = [name for name in SEG_FILES[settings.seg_format] + ("measures.csv",)
               if not (result_dir / name).is_file()]
    if missing:
        return False, f"missing {', '.join(missing)}"
    return True, ""


def remove_stale_temp_dirs(out_dir: str | Path) -> list[Path]:
    """Remove the hidden temporary folders a killed run left under ``out_dir/scans``."""
    removed = []
    for tmp in sorted(Path(out_dir, "scans").glob("*/.*.tmp-*")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def scan_output_dir(out_dir: str | Path, row: ManifestRow) -> Path:
    """``out_dir/scans/<subject>/<timepoint>`` from the sanitized manifest IDs."""
    return Path(out_dir) / "scans" / row.key[0] / row.key[1]


def plan(rows: Sequence[ManifestRow], out_dir: str | Path, settings: BatchSettings,
         force: bool = False) -> tuple[list[ScanTask], list[ScanRecord]]:
    """Split the manifest into scans to quantify and scans whose results are current (skipped).

    A result that is to be redone because it is *not* current (input, config, model or method
    changed) loses its ``measures.json`` now, so a failed or interrupted redo never leaves an outdated
    result that looks complete. Results whose input is missing or unreadable are left alone (an
    unmounted share must not cost every result); those scans fail and are retried next time.
    """
    out_dir = Path(out_dir).resolve()
    todo: list[ScanTask] = []
    skipped: list[ScanRecord] = []
    for row in rows:
        target = scan_output_dir(out_dir, row)
        fingerprint = input_fingerprint(row.input) if row.input else None
        current, why = result_is_current(target, settings, fingerprint, row.key, row.series_uid)
        if current and not force:
            measures = json.loads((target / "measures.json").read_text())
            skipped.append(ScanRecord(*row.key, row.input, str(target), "skipped", measures=measures,
                                      line=row.line))
            continue
        if not current and fingerprint is not None and (target / "measures.json").is_file():
            log.info("%s/%s: outdated result (%s), recomputing", row.subject_id, row.timepoint, why)
            (target / "measures.json").unlink()
        todo.append(ScanTask(*row.key, row.input, str(target), settings, row.series_uid, fingerprint, row.line))
    return todo, skipped


def check_paths(rows: Sequence[ManifestRow], out_dir: Path) -> None:
    """Refuse an output folder inside an input folder, or an input inside the results tree."""
    out_dir = out_dir.resolve()
    scans = out_dir / "scans"
    for row in rows:
        if not row.input:
            continue
        src = Path(row.input).resolve()
        if src.is_dir() and (out_dir == src or src in out_dir.parents):
            raise InputError(f"the output folder lies inside the input of {row.subject_id}/{row.timepoint} "
                             f"(line {row.line}); inputs are never written to", out_dir)
        if src == scans or scans in src.parents:
            raise InputError(f"input of {row.subject_id}/{row.timepoint} (line {row.line}) lies inside "
                             "the batch's own results folder", src)


# --------------------------------------------------------------------------------------------------
# The per-scan task (runs in workers)

_MODELS: dict[tuple[str, str, str], Any] = {}
_MODEL_LOCK = threading.Lock()
_THREADS_SET: list[int] = []


def cached_model(path: str | None, device: str, kind: str = "lesion") -> Any:
    """The ``kind`` (``lesion`` or ``lung``) model at ``path`` (None: the shipped lung model) on ``device``,
    loaded once per process (thread-safe)."""
    key = (kind, str(path), device)
    with _MODEL_LOCK:
        if key not in _MODELS:
            if kind == "lung":
                from ..segment.lung_model import load_lung_model as load
            else:
                from ..segment.lesion_model import load_lesion_model as load
            _MODELS[key] = load(path, device=device)
        return _MODELS[key]


def set_threads(n: Optional[int]) -> None:
    """Limit this process's torch, ITK and BLAS threads to ``n`` (once per process)."""
    if not n or _THREADS_SET:
        return
    _THREADS_SET.append(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except Exception:  # pragma: no cover - optional tuning only
        pass
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # pragma: no cover
        pass


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks below ``limit_bytes`` for reuse instead of returning them to the OS.

    The lesion network and the array steps allocate and free many 5-80 MB buffers per scan. By default
    glibc unmaps the larger ones on free, and the next allocation page-faults fresh zeroed pages back
    in. Keeping them in the heap took the network from 16.1 to 13.5 ms per slice and the lesion stage
    of the 300-slice benchmark series from 4.75 to 3.20 s (medians, 2-core machine), for about 150 MB
    more peak memory (``scripts/benchmark.py``); the labels are the same.
    Process-wide and permanent, so only entry points call it (``ctquant quantify``, :func:`run_one`, a
    user's script). Returns whether glibc took both settings (``False`` elsewhere: macOS, musl, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, no mallopt (Windows: no CDLL(None))
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    limit = int(min(limit_bytes, 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def run_one(task: ScanTask) -> ScanRecord:
    """Quantify one scan into ``task.output_dir`` and return its record. Never raises an Exception.

    The result folder is written atomically by the pipeline (``measures.json`` last) and records
    ``input_fingerprint`` in its provenance, which the next run's :func:`plan` compares.
    """
    t0 = time.perf_counter()
    s = task.settings
    base = dict(subject_id=task.subject_id, timepoint=task.timepoint, input=task.input, output_dir=task.output_dir,
                line=task.line)
    try:
        set_threads(s.torch_threads)
        reuse_freed_memory()
        if not task.input:
            raise InputError("no input given in the manifest")
        from . import scan as pipeline

        model = cached_model(s.model_path, s.device) if s.method == "model" else None
        measures = pipeline.quantify_to_dir(
            task.input, task.output_dir, method=s.method, device=s.device, subject_id=task.subject_id,
            timepoint=task.timepoint, config_path=s.config_path, series_uid=task.series_uid,
            seg_format=s.seg_format, model=model, lung_model=cached_model(None, s.device, "lung"),
            extra_provenance={"input_fingerprint": task.fingerprint})
        return ScanRecord(**base, status="ok", seconds=time.perf_counter() - t0, measures=measures)
    except CtquantError as exc:
        shown = _path_in_input(exc.path, task.input) if exc.path else ""
        where = f"{shown}: " if shown else ""
        return ScanRecord(**base, status="failed", seconds=time.perf_counter() - t0, exit_code=exc.exit_code,
                          category=type(exc).__name__, reason=_one_line(where + exc.reason))
    except Exception as exc:  # a bug: isolate it, keep the traceback for failures.log
        first = str(exc).splitlines()[0] if str(exc) else ""
        return ScanRecord(**base, status="failed", seconds=time.perf_counter() - t0, exit_code=1,
                          category="InternalError", reason=_one_line(f"internal error ({type(exc).__name__}: {first})"),
                          traceback=traceback.format_exc())


def _path_in_input(path: str, input_path: str) -> str:
    """``path`` as a failure reason shows it: relative to the scan's input (whose own path is
    identifying and kept in ``inputs.csv`` only); ``""`` for the input itself."""
    path, root = os.path.normpath(path), os.path.normpath(input_path) if input_path else ""
    if not root or path == root:
        return ""
    if path.startswith(root + os.sep):
        return os.path.relpath(path, root)
    return path if not os.path.isabs(path) else os.path.basename(path)


def lost_record(task: ScanTask, exc: BaseException | str) -> ScanRecord:
    """A failed record for a task whose worker died or whose result could not be returned."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ScanRecord(task.subject_id, task.timepoint, task.input, task.output_dir, "failed", exit_code=1,
                      category="WorkerLost", reason=_one_line(f"worker failed: {text}"), line=task.line)


# --------------------------------------------------------------------------------------------------
# Executors: same task function, results yielded as they finish


class ScanExecutor(Protocol):
    """Runs :func:`run_one` over tasks, yielding each :class:`ScanRecord` as it finishes."""

    description: str

    def run(self, tasks: Sequence[ScanTask]) -> Iterator[ScanRecord]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """One scan after another in this process (``--workers 1``)."""

    description = "in-process"

    def run(self, tasks: Sequence[ScanTask]) -> Iterator[ScanRecord]:
        for task in tasks:
            yield run_one(task)

    def close(self) -> None:
        pass


_STARTED: list[Any] = []  # in pool workers: the queue that announces each task as it starts


def _init_worker(settings: BatchSettings, started: Any = None) -> None:
    """Process-pool initializer: limit threads, quiet warnings, load the models once (errors deferred)."""
    _STARTED[:] = [started]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    set_threads(settings.torch_threads)
    logging.getLogger("ctquant").setLevel(logging.ERROR)
    try:
        cached_model(None, settings.device, "lung")
        if settings.method == "model" and settings.model_path:
            cached_model(settings.model_path, settings.device)
    except Exception:  # reported per scan by run_one, not by breaking the pool
        pass


def _tracked(task_fn: Callable[[ScanTask], ScanRecord], index: int, task: ScanTask) -> ScanRecord:
    """Announce that task ``index`` started (so a crash can be pinned on it), then run it."""
    if _STARTED and _STARTED[0] is not None:
        _STARTED[0].put(index)
    return task_fn(task)


def available_cpus() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class ProcessExecutor:
    """A local pool of ``workers`` processes (forkserver start, safe with threads in the parent).

    Each worker uses ``cpu_count // workers`` torch/ITK/BLAS threads (unless the settings say).
    A worker that dies (killed, out of memory) breaks the pool: the scans that had started then are
    re-run one at a time in a pool of their own (the one that dies again is recorded as failed), and
    the scans that had not started go on in a fresh pool.
    """

    def __init__(self, workers: int, task_fn: Callable[[ScanTask], ScanRecord] = run_one):
        self.workers = max(1, int(workers))
        self.task_fn = task_fn
        self.description = f"{self.workers} local worker processes"
        if "forkserver" in multiprocessing.get_all_start_methods():
            self._context = multiprocessing.get_context("forkserver")
            # Workers fork from a server that has already imported torch and the pipeline (fast
            # start; importing torch does not initialise CUDA or thread pools, so forking is safe).
            # As with "spawn", each worker also imports the caller's __main__: scripts need a main guard.
            self._context.set_forkserver_preload(["torch", "ctquant.run.batch", "ctquant.run.scan"])
        else:  # pragma: no cover - not Linux
            self._context = multiprocessing.get_context("spawn")

    def run(self, tasks: Sequence[ScanTask]) -> Iterator[ScanRecord]:
        threads = max(1, available_cpus() // self.workers)
        pending = [t if t.settings.torch_threads else replace(t, settings=replace(t.settings, torch_threads=threads))
                   for t in tasks]
        while pending:
            broken: list[ScanTask] = []
            suspects: list[ScanTask] = []
            yield from self._round(pending, self.workers, broken, suspects)
            for task in suspects:  # alone in a pool: if it dies again, it is the culprit
                yield from self._round([task], 1, [], [], last_try=True)
            if broken and len(broken) == len(pending):  # died before any scan started: give up
                for task in broken:
                    yield lost_record(task, "worker processes die on start-up")
                return
            pending = broken

    def close(self) -> None:
        pass

    def _round(self, tasks: list[ScanTask], workers: int, broken: list[ScanTask], suspects: list[ScanTask],
               last_try: bool = False) -> Iterator[ScanRecord]:
        """Run ``tasks`` in one pool; on a crash, sort the unfinished into started (suspects) and not.

        When the caller stops early (Ctrl-C, or the generator is closed) the queued scans are
        cancelled and the running ones' worker processes are terminated before this returns.
        """
        start_forkserver(self._context)
        started = self._context.SimpleQueue()
        pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=self._context,
                                   initializer=_init_worker, initargs=(tasks[0].settings, started))
        futures = {pool.submit(_tracked, self.task_fn, i, t): i for i, t in enumerate(tasks)}
        crashed: list[int] = []
        clean = False
        try:
            for fut in as_completed(futures):
                index = futures[fut]
                try:
                    record = fut.result()
                except BrokenProcessPool:
                    if not last_try:
                        crashed.append(index)
                        continue
                    record = lost_record(tasks[index], "worker process died (killed, or out of memory?)")
                except Exception as exc:
                    record = lost_record(tasks[index], exc)
                yield record
            clean = True
        except BaseException:  # KeyboardInterrupt, GeneratorExit: no scan may go on behind our back
            terminate_pool(pool)
            raise
        finally:
            pool.shutdown(wait=clean, cancel_futures=True)
        if crashed:
            began = set()
            while not started.empty():
                began.add(started.get())
            for index in sorted(crashed):
                (suspects if index in began else broken).append(tasks[index])
            log.warning("a worker process died; re-running %d scan(s) that were running, one at a time",
                        len([i for i in crashed if i in began]))
        started.close()


def start_forkserver(context: Any) -> None:
    """Start the forkserver (once per process) with this process's import path, not the cwd.

    Python's forkserver runs ``python -c`` in the current folder and (before 3.12) ignores the
    path it is given, so a folder named ``ctquant`` there (the parent of a clone) shadows an editable
    install in every worker: they die with "cannot import name '__version__'". ``PYTHONSAFEPATH``
    keeps the cwd off the path and ``PYTHONPATH`` hands over this process's path (``''`` as the cwd
    it stands for). On Python 3.10, which has no ``PYTHONSAFEPATH``, the package's own parent
    folder goes first instead (a regular package there wins over a namespace folder).
    """
    if context.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    if sys.version_info < (3, 11):  # pragma: no cover - no PYTHONSAFEPATH
        path.insert(0, str(Path(__file__).resolve().parents[1]))
    with _environment(PYTHONSAFEPATH="1", PYTHONPATH=os.pathsep.join(dict.fromkeys(path))):
        forkserver.ensure_running()


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside the block."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def terminate_pool(pool: ProcessPoolExecutor, timeout_s: float = 5.0) -> None:
    """Cancel a pool's queued tasks and end its worker processes (SIGTERM, then SIGKILL)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():  # pragma: no cover - a worker stuck in uninterruptible I/O
            proc.kill()
            proc.join(1.0)


@contextmanager
def sigint_once() -> Iterator[None]:
    """Within the block the first Ctrl-C (SIGINT) raises :class:`KeyboardInterrupt` and later ones
    are ignored, so that cleaning up is not itself interrupted; the old handler is back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("--scheduler needs Dask distributed: pip install 'ctquant[dask]'") from None
    return distributed


class DaskExecutor:
    """Tasks on a Dask cluster: ``address`` (``tcp://host:8786``) or an existing ``client``.

    Each Dask worker process imports ctquant and loads the models once (:func:`cached_model`); all
    workers must see the inputs and the output folder under the same paths.
    """

    def __init__(self, address: Optional[str] = None, client: Any = None, connect_timeout_s: float = 30):
        distributed = _import_distributed()
        self._own = client is None
        if client is None:
            try:
                client = distributed.Client(address, timeout=connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot connect to the Dask scheduler: {str(exc).splitlines()[0]}", address) from None
        self.client = client
        self.description = f"Dask scheduler {getattr(client.scheduler, 'address', address)}"

    def run(self, tasks: Sequence[ScanTask]) -> Iterator[ScanRecord]:
        distributed = _import_distributed()
        run_id = uuid.uuid4().hex[:8]
        keys = [f"ctquant-scan-{run_id}-{i}" for i in range(len(tasks))]
        futures = self.client.map(run_one, list(tasks), key=keys, pure=False, retries=0)
        by_key = {f.key: t for f, t in zip(futures, tasks)}
        clean = False
        try:
            for fut in distributed.as_completed(futures):
                task = by_key[fut.key]
                try:
                    yield fut.result()
                except Exception as exc:  # KilledWorker, unpicklable result, worker without ctquant, ...
                    yield lost_record(task, exc)
                finally:
                    fut.release()
            clean = True
        finally:
            if not clean:
                self.client.cancel(futures)

    def close(self) -> None:
        if self._own:
            self.client.close()


def make_executor(workers: int = 1, scheduler: Optional[str] = None) -> ScanExecutor:
    """In-process for one worker, a process pool for more, Dask when a scheduler address is given."""
    if scheduler:
        return DaskExecutor(scheduler)
    if workers < 1:
        raise InputError(f"--workers must be at least 1 (got {workers})")
    return InlineExecutor() if workers == 1 else ProcessExecutor(workers)


# --------------------------------------------------------------------------------------------------
# Progress


class BatchProgress:
    """Progress reporting; this base reports nothing."""

    def start(self, total: int, skipped: int, description: str) -> None:
        pass

    def advance(self, record: ScanRecord) -> None:
        pass

    def stop(self) -> None:
        pass


class PlainProgress(BatchProgress):
    """One log line per finished scan (for logs and pipes)."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.total = self.done = self.failed = 0
        self.t0 = time.monotonic()

    def _print(self, text: str) -> None:
        print(f"ctquant batch: {text}", file=self.stream or sys.stderr, flush=True)

    def start(self, total: int, skipped: int, description: str) -> None:
        self.total, self.t0 = total, time.monotonic()
        self._print(f"{total} scan(s) to quantify, {skipped} current result(s) skipped; {description}")

    def advance(self, record: ScanRecord) -> None:
        self.done += 1
        self.failed += record.status == "failed"
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        what = (f"ok {record.seconds:.1f} s" if record.status == "ok"
                else f"FAILED (exit {record.exit_code}, {record.category}): {record.reason}")
        self._print(f"[{self.done}/{self.total}] {record.subject_id}/{record.timepoint} {what}"
                    f" (failed so far {self.failed}, eta {_duration(eta)})")


class RichProgress(BatchProgress):
    """A rich progress bar with counts, failures and ETA (for terminals)."""

    def __init__(self, console: Any = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._progress = None
        self._task = None
        self.failed = 0

    def start(self, total: int, skipped: int, description: str) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console.print(f"{total} scan(s) to quantify, {skipped} current result(s) skipped; {description}")
        self._progress = Progress(TextColumn("quantifying"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(),
                                  TextColumn("eta"), TimeRemainingColumn(), console=self.console)
        self._progress.start()
        self._task = self._progress.add_task("scans", total=total, failed=0)

    def advance(self, record: ScanRecord) -> None:
        if record.status == "failed":
            from rich.markup import escape

            self.failed += 1
            self._progress.console.print(f"[red]failed[/red] {escape(record.subject_id)}/{escape(record.timepoint)}: "
                                         f"{escape(record.reason)}", highlight=False)
        self._progress.update(self._task, advance=1, failed=self.failed)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def make_progress(stream: Optional[TextIO] = None) -> BatchProgress:
    """A rich bar when stderr is a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    return RichProgress() if getattr(stream, "isatty", lambda: False)() else PlainProgress(stream)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------------------------------
# Outputs


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def _measures_csv_row(result_dir: str | Path) -> dict[str, str]:
    try:
        with open(Path(result_dir) / "measures.csv", newline="") as handle:
            return next(csv.DictReader(handle), None) or {}
    except OSError:
        return {}


def cohort_rows(rows: Sequence[ManifestRow], records: Mapping[tuple[str, str], ScanRecord],
                extras: Sequence[str], out_dir: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``cohort.csv`` rows (manifest order) and columns: IDs (as the folders spell them), status,
    measures.csv's columns, extras, the results folder (relative to ``out_dir``) and the manifest line.

    The inputs' paths are not in it (they often carry patient names): see :func:`input_rows`.
    """
    tail = ["manifest_line", "output_dir", "seconds", "exit_code", "category", "reason"]
    measure_cols: list[str] = []
    per_row = []
    for row in rows:
        rec = records[row.key]
        measures = _measures_csv_row(rec.output_dir) if rec.status != "failed" else {}
        measures = {k: v for k, v in measures.items() if k not in ("subject_id", "timepoint")}
        measure_cols += [c for c in measures if c not in measure_cols]
        per_row.append((row, rec, measures))
    taken = {"subject_id", "timepoint", "status", *measure_cols, *tail}
    names = {c: f"manifest_{c}" if c in taken else c for c in extras}
    out = [{"subject_id": row.key[0], "timepoint": row.key[1], "status": rec.status, **measures,
            **{names[c]: v for c, v in row.extra.items()}, "manifest_line": row.line,
            "output_dir": _relative(rec.output_dir, out_dir),
            "seconds": round(rec.seconds, 2) if rec.seconds is not None else None,
            "exit_code": rec.exit_code if rec.status == "failed" else None,
            "category": rec.category, "reason": rec.reason} for row, rec, measures in per_row]
    columns = ["subject_id", "timepoint", "status", *measure_cols, *(names[c] for c in extras), *tail]
    return out, columns


def _relative(path: str, base: str | Path | None) -> str:
    try:
        return Path(path).relative_to(base).as_posix() if base is not None else path
    except ValueError:
        return path


def input_rows(rows: Sequence[ManifestRow]) -> list[dict[str, Any]]:
    """``inputs.csv``: which input each subject/time point was read from — the one identifying table."""
    return [{"subject_id": r.key[0], "timepoint": r.key[1], "manifest_line": r.line, "input": r.input,
             "series_uid": r.series_uid} for r in rows]


# --------------------------------------------------------------------------------------------------
# Lock


class BatchLock:
    """``DIR/.batch.lock``: one batch per output folder; a lock of a dead local process is taken over."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_NAME
        self.held = False

    def __enter__(self) -> "BatchLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_utc": _now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputError("another ctquant batch is writing to this folder (remove "
                                  f"{LOCK_NAME} if none is running)", self.path.parent) from None
            except OSError as exc:
                raise OutputError(f"cannot write here: {exc.strerror or exc}", self.path.parent) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise OutputError("cannot take the batch lock", self.path)

    def _stale(self) -> bool:
        try:
            other = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return True
        if other.get("host") != socket.gethostname():
            return False
        import psutil

        return not psutil.pid_exists(int(other.get("pid", -1)))

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Endpoint report (supplied by ctquant.trial.endpoints, the stage above this one)


class EndpointStep(Protocol):
    """What a batch asks of the endpoint stage: :data:`ctquant.trial.endpoints.ENDPOINT_STEP`."""

    def timepoints(self, endpoints_config: str | Path | None) -> list[str]:
        """The time points the endpoints compare (the config is validated here, before any work)."""

    def report(self, manifest: Path, records: Mapping[tuple[str, str], ScanRecord], out_dir: Path,
               endpoints_config: str | Path | None, group_by: Optional[str]) -> dict[str, Any]:
        """The cohort endpoint report of ``records`` in ``out_dir/endpoints``; quantifies nothing."""


def check_group_column(extras: Sequence[str], group_by: Optional[str], manifest: Path) -> None:
    """``--group-by`` must name an extra manifest column."""
    if group_by and group_by not in extras:
        raise InputError(f"--group-by {group_by}: no such manifest column (extra columns: "
                         f"{', '.join(extras) or 'none'})", manifest)


# --------------------------------------------------------------------------------------------------
# The batch


@dataclass
class BatchSummary:
    """What :func:`run_batch` did and wrote."""

    out_dir: Path
    records: list[ScanRecord]
    cohort_csv: Path
    failures_csv: Path
    executor: str
    endpoints: Optional[dict[str, Any]] = None
    endpoints_error: Optional[CtquantError] = None
    duplicates_error: Optional[CtquantError] = None

    @property
    def counts(self) -> dict[str, int]:
        """Scans per status."""
        c = Counter(r.status for r in self.records)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def failed(self) -> list[ScanRecord]:
        """The failed scans."""
        return [r for r in self.records if r.status == "failed"]


def run_batch(manifest: str | Path, out_dir: str | Path, *, method: str = "model", device: str = "auto",
              config_path: str | Path | None = None, seg_format: str = "nifti", workers: int = 1,
              scheduler: Optional[str] = None, executor: Optional[ScanExecutor] = None, force: bool = False,
              model_path: str | Path | None = None, endpoints_config: str | Path | None = None,
              endpoints: Optional[bool] = None, progress: Optional[BatchProgress] = None,
              allow_duplicates: bool = False, group_by: Optional[str] = None,
              endpoint_step: Optional[EndpointStep] = None) -> BatchSummary:
    """Quantify every manifest row into ``out_dir`` (see the module docstring); never raises for one scan.

    ``ctquant batch`` is :func:`ctquant.trial.endpoints.run_cohort`: this with the endpoint step.

    Args:
        workers: local processes (1: in this process); ignored when ``scheduler`` or ``executor`` is given.
        scheduler: a Dask scheduler address (``tcp://host:8786``).
        executor: an executor object (e.g. ``DaskExecutor(client=...)``); not closed here.
        endpoints: write the endpoint report (default: when some subject has >= 2 time points and
            ``endpoint_step`` is given).
        endpoint_step: the endpoint stage (:data:`ctquant.trial.endpoints.ENDPOINT_STEP`); without it no
            endpoint report is written.
        allow_duplicates: the same scan (input, files or SeriesInstanceUID) under two subject/time
            points is a warning, not an error.
        group_by: an extra manifest column (e.g. ``arm``): the endpoint report per group as well.

    Before any scan is quantified the manifest is checked: time points no endpoint uses are warned
    about, the same scan under two subject/time points is refused. After quantifying, a
    SeriesInstanceUID found twice is refused too (``duplicates_error``; no endpoint report).

    With ``workers > 1`` the worker processes import the caller's main module (as with any
    ``multiprocessing`` spawn/forkserver start): call this from under ``if __name__ == "__main__":``.

    Raises:
        CtquantError: for the batch as a whole (bad manifest, options, config, model file, output folder).
        Interrupted: on Ctrl-C (SIGINT): queued scans are cancelled, running ones stopped, their
            temporary folders removed; the finished results stay and a re-run resumes.
    """
    manifest = Path(manifest)
    out_dir = Path(out_dir).expanduser().resolve()
    rows, extras = read_manifest(manifest)
    check_group_column(extras, group_by, manifest)
    settings = make_settings(method, device, config_path, seg_format, model_path)
    if endpoints and endpoint_step is None:
        raise ValueError("an endpoint report needs endpoint_step (ctquant.trial.endpoints.run_cohort passes it)")
    want_endpoints = endpoint_step is not None and (manifest_has_follow_up(rows) if endpoints is None else endpoints)
    if want_endpoints:
        for message in timepoint_warnings(rows, endpoint_step.timepoints(endpoints_config)):
            log.warning("%s: %s", manifest, message)
    if executor is None and not scheduler:
        from ..config import resolve_device

        resolve_device(device)  # --device cuda without a GPU: fail once, not per scan
    check_paths(rows, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder: {exc.strerror or exc}", out_dir) from None
    progress = progress or BatchProgress()
    started = _now()
    with BatchLock(out_dir):
        for tmp in remove_stale_temp_dirs(out_dir):
            log.info("removed temporary folder of an interrupted run: %s", tmp)
        fingerprints = {r.key: input_fingerprint(r.input) if r.input else None for r in rows}
        current = {r.key: _current_uid(scan_output_dir(out_dir, r)) for r in rows}
        _refuse_or_warn(duplicate_scans_before(rows, fingerprints, current), allow_duplicates, manifest)
        tasks, skipped = plan(rows, out_dir, settings, force)
        records: dict[tuple[str, str], ScanRecord] = {r.key: r for r in skipped}
        own = executor is None
        executor = executor or make_executor(workers, scheduler)
        progress.start(len(tasks), len(skipped), executor.description)
        interrupted = False
        with sigint_once():
            running = executor.run(tasks)
            try:
                for record in running:
                    records[record.key] = record
                    progress.advance(record)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                running.close()  # a process pool cancels and stops its workers here
                progress.stop()
                if own:
                    executor.close()
            if interrupted:
                remove_stale_temp_dirs(out_dir)
        if interrupted:
            done = len(records) - len(skipped)
            raise Interrupted(f"interrupted: {done} of {len(tasks)} scan(s) finished, the others cancelled; "
                              "run the same command again to resume", out_dir)
        ordered = [records[row.key] for row in rows]
        summary = _write_outputs(manifest, rows, extras, records, ordered, out_dir, settings, executor.description)
        dupes = same_scans(result_series_uids(records), "SeriesInstanceUID")
        if dupes:
            try:
                _refuse_or_warn(dupes, allow_duplicates, manifest)
            except InputError as exc:
                summary.duplicates_error = exc
        if want_endpoints and summary.duplicates_error is None:
            try:
                summary.endpoints = endpoint_step.report(manifest, records, out_dir, endpoints_config, group_by)
            except CtquantError as exc:
                log.warning("endpoint report not written: %s", exc)
                summary.endpoints_error = exc
        _write_batch_json(summary, manifest, settings, started, force)
    return summary


def _current_uid(result_dir: Path) -> Optional[str]:
    try:
        return json.loads((result_dir / "measures.json").read_text())["provenance"]["series_instance_uid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_or_warn(messages: Sequence[str], allow: bool, manifest: Path) -> None:
    if not messages:
        return
    if not allow:
        raise InputError(f"{'; '.join(messages)} (one scan under two subject/time points; "
                         "--allow-duplicate-scans to accept)", manifest)
    for message in messages:
        log.warning("%s: %s (allowed)", manifest, message)


def _write_outputs(manifest: Path, rows: Sequence[ManifestRow], extras: Sequence[str],
                   records: Mapping[tuple[str, str], ScanRecord], ordered: Sequence[ScanRecord], out_dir: Path,
                   settings: BatchSettings, executor: str) -> BatchSummary:
    failures = [r for r in ordered if r.status == "failed"]
    failures_csv, cohort_csv = out_dir / "failures.csv", out_dir / "cohort.csv"
    atomic_write_text(failures_csv, _csv_text([r.failure_row() for r in failures], FAILURE_COLUMNS))
    table, columns = cohort_rows(rows, records, extras, out_dir)
    atomic_write_text(cohort_csv, _csv_text(table, columns))
    atomic_write_text(out_dir / "inputs.csv", _csv_text(input_rows(rows), INPUT_COLUMNS))
    tracebacks = [r for r in failures if r.traceback]
    log_path = out_dir / "failures.log"
    if tracebacks:
        atomic_write_text(log_path, "".join(f"== {r.subject_id}/{r.timepoint} (manifest line {r.line})\n{r.traceback}\n"
                                        for r in tracebacks))
    elif log_path.exists():
        log_path.unlink()
    return BatchSummary(out_dir, list(ordered), cohort_csv, failures_csv, executor)


def _write_batch_json(summary: BatchSummary, manifest: Path, settings: BatchSettings, started: str,
                      force: bool) -> None:
    doc = {
        "schema": SCHEMA,
        "ctquant_version": __version__,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": file_sha256(manifest),
        "settings": asdict(settings),
        "force": force,
        "executor": summary.executor,
        "counts": summary.counts,
        "failures": [r.failure_row() for r in summary.failed],
        "endpoints": ("written" if summary.endpoints is not None
                      else str(summary.endpoints_error) if summary.endpoints_error else None),
        "started_utc": started,
        "finished_utc": _now(),
    }
    atomic_write_text(summary.out_dir / "batch.json", json.dumps(doc, indent=2) + "\n")
