"""Trial endpoints: per-patient comparison of two time points and cohort response rates.

Endpoints are data (``configs/endpoints.yaml``, or a user file with ``--config``): a measure of a
``ctquant quantify`` result (``ggo_pct``, ``opacity_pct``, ...), two time points, a scope (``bilateral``:
the finding in both lungs at the first time point) and a reduction rule (a relative AND an absolute
decrease, so that measurement noise is not called improvement). See the comments in that file.

The pure functions (:func:`change`, :func:`is_bilateral`, :func:`reduction_verdict`,
:func:`cohort_summary`, :func:`clopper_pearson`) do the arithmetic; :func:`run_compare` and
:func:`run_endpoints` are the ``ctquant compare`` / ``ctquant endpoints`` commands without the CLI.
A cohort's scans are quantified by :mod:`ctquant.run.batch` (resumable, parallel, failure-isolated).
All outputs are staged in temporary files and renamed into place only when every one is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from ..version import __version__
from ..run.batch import (BatchSummary, ManifestRow, ScanRecord, check_group_column, make_progress, read_manifest,
                         run_batch, timepoint_warnings)
from ..config import CONFIG_DIR, code_sha256, config_hash, file_sha256, load_yaml, merge
from ..errors import InputError, IncompatibleResults, OutputError
from ..outputs.atomic import atomic_output_dir
from ..outputs.columns import SUBJECT_COLUMNS

log = logging.getLogger("ctquant.trial.endpoints")

#: Schema tags of the files read and written here.
MEASURES_SCHEMA = "ctquant.measures/1"
ENDPOINTS_SCHEMA = "ctquant.endpoints/1"
COMPARISON_SCHEMA = "ctquant.comparison/1"
COHORT_SCHEMA = "ctquant.endpoints.cohort/1"

DEFAULT_CONFIG = CONFIG_DIR / "endpoints.yaml"
LUNGS = ("right", "left", "both")
#: Every per-lung measure of a result, in table order.
MEASURES = (
    "lung_volume_ml",
    "ggo_volume_ml",
    "ggo_pct",
    "consolidation_volume_ml",
    "consolidation_pct",
    "opacity_volume_ml",
    "opacity_pct",
    "mean_lung_hu",
)
#: Measures an endpoint may use, with the %-of-lung measure that decides "involved" for the scope.
ENDPOINT_MEASURES = {
    "ggo_pct": "ggo_pct",
    "consolidation_pct": "consolidation_pct",
    "opacity_pct": "opacity_pct",
    "ggo_volume_ml": "ggo_pct",
    "consolidation_volume_ml": "consolidation_pct",
    "opacity_volume_ml": "opacity_pct",
}
MEASURE_LABELS = {
    "lung_volume_ml": "lung volume (ml)",
    "ggo_volume_ml": "GGO volume (ml)",
    "ggo_pct": "GGO % of lung",
    "consolidation_volume_ml": "consolidation volume (ml)",
    "consolidation_pct": "consolidation % of lung",
    "opacity_volume_ml": "infiltration (GGO + consolidation) volume (ml)",
    "opacity_pct": "infiltration (GGO + consolidation) % of lung",
    "mean_lung_hu": "mean lung density (HU)",
}
SCOPES = ("bilateral", "all")
EVALUATE = ("both", "each")
_ENDPOINT_FIELDS = {"name", "description", "measure", "from", "to", "scope",
                    "bilateral_min_pct_of_lung", "evaluate", "reduction"}
_REDUCTION_FIELDS = {"min_relative_decrease_pct", "min_absolute_decrease"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Tolerance of threshold comparisons, so that 4.0 -> 3.0 is exactly "1 point" despite float rounding.
_EPS = 1e-9


# --------------------------------------------------------------------------------------------------
# Endpoint definitions


@dataclass(frozen=True)
class Endpoint:
    """One endpoint: a reduction of ``measure`` from time point ``from_tp`` to ``to_tp``."""

    name: str
    measure: str
    from_tp: str
    to_tp: str
    min_relative_decrease_pct: float
    min_absolute_decrease: float
    description: str = ""
    scope: str = "bilateral"
    bilateral_min_pct_of_lung: float = 0.5
    evaluate: str = "both"

    def as_dict(self) -> dict[str, Any]:
        """The definition as written in YAML (for provenance and the config hash)."""
        return {
            "name": self.name,
            "description": self.description,
            "measure": self.measure,
            "from": self.from_tp,
            "to": self.to_tp,
            "scope": self.scope,
            "bilateral_min_pct_of_lung": self.bilateral_min_pct_of_lung,
            "evaluate": self.evaluate,
            "reduction": {
                "min_relative_decrease_pct": self.min_relative_decrease_pct,
                "min_absolute_decrease": self.min_absolute_decrease,
            },
        }

    @property
    def unit(self) -> str:
        """Unit of an absolute change of the measure ("points" of lung %, or "ml")."""
        return "ml" if self.measure.endswith("_ml") else "points"


@dataclass(frozen=True)
class EndpointConfig:
    """The endpoints of one config file, with its path and a hash of the parsed definitions."""

    endpoints: tuple[Endpoint, ...]
    path: str
    sha256: str

    def for_timepoints(self, from_tp: str, to_tp: str) -> list[Endpoint]:
        """The endpoints that compare ``from_tp`` to ``to_tp``."""
        return [ep for ep in self.endpoints if ep.from_tp == from_tp and ep.to_tp == to_tp]


def _number(value: Any, what: str, path: Path, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a number, not {value!r}", path)
    if not lo <= value <= hi:
        raise InputError(f"{what} must be between {lo:g} and {hi:g}, not {value!r}", path)
    return float(value)


def _parse_endpoint(raw: Any, defaults: dict[str, Any], index: int, path: Path) -> Endpoint:
    label = f"endpoint #{index + 1}"
    if not isinstance(raw, dict):
        raise InputError(f"{label}: must be a mapping of fields", path)
    if isinstance(raw.get("name"), str):
        label = f"endpoint '{raw['name']}'"
    unknown = sorted(set(raw) - _ENDPOINT_FIELDS)
    if unknown:
        raise InputError(f"{label}: unknown field(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(_ENDPOINT_FIELDS))})", path)
    spec = merge(defaults, raw)
    for key in ("name", "measure", "from", "to", "reduction"):
        if spec.get(key) in (None, ""):
            raise InputError(f"{label}: missing field '{key}'", path)
    name = spec["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"{label}: name must be letters, digits, '_', '-' or '.', not {name!r}", path)
    measure = spec["measure"]
    if measure not in ENDPOINT_MEASURES:
        raise InputError(f"{label}: unknown measure {measure!r} "
                         f"(one of {', '.join(ENDPOINT_MEASURES)})", path)
    tps = {}
    for key in ("from", "to"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InputError(f"{label}: '{key}' must be a time point label, not {value!r}", path)
        tps[key] = str(value).strip()
    if tps["from"] == tps["to"]:
        raise InputError(f"{label}: 'from' and 'to' are the same time point ({tps['from']})", path)
    scope = spec.get("scope", "bilateral")
    if scope not in SCOPES:
        raise InputError(f"{label}: scope must be one of {', '.join(SCOPES)}, not {scope!r}", path)
    evaluate = spec.get("evaluate", "both")
    if evaluate not in EVALUATE:
        raise InputError(f"{label}: evaluate must be one of {', '.join(EVALUATE)}, not {evaluate!r}", path)
    min_pct = _number(spec.get("bilateral_min_pct_of_lung", 0.5),
                      f"{label}: bilateral_min_pct_of_lung", path, 0.0, 100.0)
    reduction = spec["reduction"]
    if not isinstance(reduction, dict):
        raise InputError(f"{label}: 'reduction' must be a mapping with "
                         f"{' and '.join(sorted(_REDUCTION_FIELDS))}", path)
    unknown = sorted(set(reduction) - _REDUCTION_FIELDS)
    if unknown:
        raise InputError(f"{label}: unknown reduction field(s) {', '.join(unknown)}", path)
    for key in sorted(_REDUCTION_FIELDS):
        if key not in reduction:
            raise InputError(f"{label}: missing field 'reduction.{key}'", path)
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise InputError(f"{label}: description must be text", path)
    return Endpoint(
        name=name,
        measure=measure,
        from_tp=tps["from"],
        to_tp=tps["to"],
        min_relative_decrease_pct=_number(reduction["min_relative_decrease_pct"],
                                          f"{label}: reduction.min_relative_decrease_pct", path, 0.0, 100.0),
        min_absolute_decrease=_number(reduction["min_absolute_decrease"],
                                      f"{label}: reduction.min_absolute_decrease", path),
        description=" ".join(description.split()),
        scope=scope,
        bilateral_min_pct_of_lung=min_pct,
        evaluate=evaluate,
    )


def load_endpoints(path: str | Path | None = None) -> EndpointConfig:
    """Read and validate an endpoints file (default: the shipped ``configs/endpoints.yaml``).

    A problem (unknown field or measure, missing field, bad value, duplicate name) is an
    :class:`InputError` naming the file and the endpoint.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = load_yaml(path)
    unknown = sorted(set(data) - {"schema", "defaults", "endpoints"})
    if unknown:
        raise InputError(f"unknown top-level key(s) {', '.join(unknown)} "
                         "(allowed: schema, defaults, endpoints)", path)
    if data.get("schema", ENDPOINTS_SCHEMA) != ENDPOINTS_SCHEMA:
        raise InputError(f"unsupported schema {data.get('schema')!r} (expected {ENDPOINTS_SCHEMA})", path)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise InputError("'defaults' must be a mapping", path)
    bad = sorted(set(defaults) - (_ENDPOINT_FIELDS - {"name"}))
    if bad:
        raise InputError(f"defaults: unknown or not defaultable field(s) {', '.join(bad)}", path)
    raw_endpoints = data.get("endpoints")
    if not isinstance(raw_endpoints, list) or not raw_endpoints:
        raise InputError("'endpoints' must be a non-empty list", path)
    endpoints = [_parse_endpoint(raw, defaults, i, path) for i, raw in enumerate(raw_endpoints)]
    names = [ep.name for ep in endpoints]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"duplicate endpoint name(s): {', '.join(dupes)}", path)
    digest = config_hash({"schema": ENDPOINTS_SCHEMA, "endpoints": [ep.as_dict() for ep in endpoints]})
    return EndpointConfig(tuple(endpoints), str(path), digest)


# --------------------------------------------------------------------------------------------------
# Per-scan results


def load_measures(path: str | Path) -> dict[str, Any]:
    """Read a ``measures.json`` (or the folder holding one) and check what the endpoints need.

    Raises :class:`InputError` naming the file when it is unreadable, of another schema, or lacks a
    per-lung lesion measure.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "measures.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("no measures.json (not a ctquant quantify result)", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read result: {str(exc).splitlines()[0]}", path) from None
    if not isinstance(data, dict):
        raise InputError("a result must be a JSON object", path)
    if data.get("schema") != MEASURES_SCHEMA:
        raise InputError(f"unsupported result schema {data.get('schema')!r} (expected {MEASURES_SCHEMA})", path)
    lungs = data.get("lungs")
    if not isinstance(lungs, dict):
        raise InputError("result has no 'lungs' table", path)
    for lung in LUNGS:
        entry = lungs.get(lung)
        if not isinstance(entry, dict):
            raise InputError(f"result has no lungs.{lung}", path)
        for measure in MEASURES:
            value = entry.get(measure)
            if measure == "mean_lung_hu" and (value is None or (isinstance(value, float) and math.isnan(value))):
                continue  # no lung voxels: quantify writes NaN
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"lungs.{lung}.{measure} is missing or not a number ({value!r})", path)
            if measure != "mean_lung_hu" and value < 0:
                raise InputError(f"lungs.{lung}.{measure} is negative ({value!r})", path)
    return data


def result_signature(measures: Mapping[str, Any]) -> dict[str, Optional[str]]:
    """What must agree for two results to be comparable: method, model and quantification config."""
    prov = measures.get("provenance") or {}
    return {
        "method": measures.get("method") or prov.get("method"),
        "model_sha256": prov.get("model_sha256"),
        "config_sha256": prov.get("config_sha256"),
    }


def result_mismatches(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The fields (method, model, config, subject) on which two results differ."""
    a, b = result_signature(first), result_signature(second)
    out = [{"field": key, "from": a[key], "to": b[key]} for key in a if a[key] != b[key]]
    sa, sb = first.get("subject_id"), second.get("subject_id")
    if sa and sb and sa != sb:
        out.append({"field": "subject_id", "from": sa, "to": sb})
    return out


#: Relative difference in slice spacing or pixel size above which two scans of a participant count as
#: acquired differently (a note, not a refusal). The % of lung figures depend on the reconstruction: the
#: real COVID-19 scan ricord-1a-000082 with its 1.25 mm slices averaged to 5 mm reads 0.4-0.8 points more
#: GGO and 0.15-0.26 points less consolidation per lung (README, Accuracy; scripts/evaluate_lungs.py
#: --protocols), the size of the endpoints' 1-point threshold.
ACQUISITION_REL_TOLERANCE = 0.25


def acquisition_differences(first: Mapping[str, Any], second: Mapping[str, Any],
                            rel_tolerance: float = ACQUISITION_REL_TOLERANCE) -> list[dict[str, Any]]:
    """How the two results' scans were reconstructed differently: slice spacing or pixel size (mm) more
    than ``rel_tolerance`` apart, or a smooth against a sharp kernel (``provenance.kernel_class``).
    Fields a result does not record are not compared."""
    a, b = first.get("provenance") or {}, second.get("provenance") or {}
    out: list[dict[str, Any]] = []
    spacing_a, spacing_b = a.get("spacing_mm"), b.get("spacing_mm")
    if spacing_a and spacing_b and len(spacing_a) == len(spacing_b) == 3:
        for name, axis in (("slice_spacing_mm", 0), ("pixel_spacing_mm", 2)):
            x, y = float(spacing_a[axis]), float(spacing_b[axis])
            if abs(x - y) > rel_tolerance * min(x, y):
                out.append({"field": name, "from": round(x, 3), "to": round(y, 3)})
    kernels = a.get("kernel_class"), b.get("kernel_class")
    if set(kernels) == {"smooth", "sharp"}:
        out.append({"field": "kernel_class", "from": kernels[0], "to": kernels[1]})
    return out


def describe_differences(differences: Sequence[Mapping[str, Any]]) -> str:
    """``slice_spacing_mm 1.25 vs 5.0; kernel_class smooth vs sharp`` (empty when none)."""
    return "; ".join(f"{d['field']} {d['from']} vs {d['to']}" for d in differences)


def _value(measures: Mapping[str, Any], lung: str, measure: str) -> Optional[float]:
    value = ((measures.get("lungs") or {}).get(lung) or {}).get(measure)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _days_between(first: Mapping[str, Any], second: Mapping[str, Any]) -> Optional[int]:
    """Days from the first study date to the second (DICOM YYYYMMDD), where both are known."""
    try:
        d1, d2 = ((m.get("provenance") or {}).get("study_date") for m in (first, second))
        parse = lambda s: date(int(s[:4]), int(s[4:6]), int(s[6:8]))  # noqa: E731
        return (parse(str(d2)) - parse(str(d1))).days
    except (TypeError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------
# Pure arithmetic


def change(baseline: Optional[float], follow_up: Optional[float]) -> dict[str, Optional[float]]:
    """Absolute and relative change from ``baseline`` to ``follow_up``.

    ``rel_change_pct`` is ``100 * (follow_up - baseline) / baseline``; it is None when the baseline is
    not positive (no relative change of nothing; nor of HU, which are not a ratio scale).
    """
    if baseline is None or follow_up is None:
        return {"baseline": baseline, "follow_up": follow_up, "abs_change": None, "rel_change_pct": None}
    diff = follow_up - baseline
    rel = 100.0 * diff / baseline if baseline > 0 else None
    return {"baseline": baseline, "follow_up": follow_up, "abs_change": diff, "rel_change_pct": rel}


def is_bilateral(measures: Mapping[str, Any], measure: str, min_pct: float) -> bool:
    """Whether the finding of ``measure`` occupies at least ``min_pct`` % of EACH lung (and > 0)."""
    pct_measure = ENDPOINT_MEASURES.get(measure, measure)
    for lung in ("right", "left"):
        value = _value(measures, lung, pct_measure)
        if value is None or value <= 0 or value < min_pct - _EPS:
            return False
    return True


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` confidence interval of the proportion k/n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=alpha, method="beta")
    lo = 0.0 if k == 0 or not math.isfinite(lo) else float(lo)
    hi = 1.0 if k == n or not math.isfinite(hi) else float(hi)
    return lo, hi


def _num(x: float, decimals: int = 2, sign: bool = False) -> str:
    """A number for a sentence: few decimals, no trailing zeros, a real minus sign."""
    text = f"{abs(x):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text != "0" and x < 0:
        return "−" + text
    if text != "0" and x > 0 and sign:
        return "+" + text
    return text


def _threshold_texts(endpoint: Endpoint) -> tuple[str, str]:
    a = endpoint.min_absolute_decrease
    unit = "ml" if endpoint.unit == "ml" else ("point" if a == 1 else "points")
    return f"{_num(a)} {unit}", f"{_num(endpoint.min_relative_decrease_pct, 1)} %"


def _rule(endpoint: Endpoint, ch: Mapping[str, Optional[float]], where: str) -> tuple[bool, str]:
    """Apply the reduction rule to one change; (met, sentence saying why)."""
    b, f, d, r = ch["baseline"], ch["follow_up"], ch["abs_change"], ch["rel_change_pct"]
    unit = "point" if endpoint.unit == "points" and _num(abs(d)) == "1" else endpoint.unit
    # shown as stored in the comparison table (rounded there first), decided on the exact values
    head = (f"{MEASURE_LABELS[endpoint.measure]}{where} {_num(b)} → {_num(f)}: "
            f"{_num(_round(d, ABS_CHANGE_DIGITS), sign=True)} {unit}")
    if r is not None:
        head += f" ({_num(_round(r, REL_CHANGE_DIGITS), 1, sign=True)} %)"
    abs_text, rel_text = _threshold_texts(endpoint)
    decrease = -d
    if decrease <= 0:
        return False, f"{head}: no decrease: no reduction"
    abs_ok = decrease >= endpoint.min_absolute_decrease - _EPS
    rel_ok = r is not None and -r >= endpoint.min_relative_decrease_pct - _EPS
    if abs_ok and rel_ok:
        return True, f"{head} ≥ {abs_text} and ≥ {rel_text}: reduction"
    fails = []
    if not abs_ok:
        fails.append(f"< {abs_text}")
    if not rel_ok:
        fails.append(f"< {rel_text}" if r is not None else "relative change undefined (baseline 0)")
    return False, f"{head}: decrease {' and '.join(fails)}: no reduction"


@dataclass
class Verdict:
    """The outcome of one endpoint for one participant.

    ``reduction`` is None when the participant is not evaluable; ``reason`` says why, in words, with
    the numbers and the rule that decided. ``changes`` holds :func:`change` of the endpoint measure
    per lung (right, left, both) where both time points are known.
    """

    endpoint: str
    evaluable: bool
    reduction: Optional[bool]
    reason: str
    bilateral_at_baseline: Optional[bool] = None
    changes: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """"reduction", "no reduction" or "not evaluable"."""
        if not self.evaluable:
            return "not evaluable"
        return "reduction" if self.reduction else "no reduction"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.label
        return out


def reduction_verdict(
    endpoint: Endpoint,
    baseline_measures: Optional[Mapping[str, Any]],
    followup_measures: Optional[Mapping[str, Any]],
) -> Verdict:
    """Judge one participant: in scope at ``endpoint.from_tp``? and did the measure go down enough?

    ``baseline_measures`` / ``followup_measures`` are ``measures.json`` mappings of the endpoint's
    ``from`` and ``to`` time points; None means that time point has no result (not evaluable).
    """
    missing = [f"no {tp} result" for tp, m in ((endpoint.from_tp, baseline_measures),
                                               (endpoint.to_tp, followup_measures)) if m is None]
    changes = {}
    if baseline_measures is not None and followup_measures is not None:
        changes = {lung: change(_value(baseline_measures, lung, endpoint.measure),
                                _value(followup_measures, lung, endpoint.measure)) for lung in LUNGS}
    if missing:
        return Verdict(endpoint.name, False, None, "; ".join(missing))
    bilateral = is_bilateral(baseline_measures, endpoint.measure, endpoint.bilateral_min_pct_of_lung)
    if endpoint.scope == "bilateral" and not bilateral:
        pct = ENDPOINT_MEASURES[endpoint.measure]
        r, l = (_value(baseline_measures, lung, pct) for lung in ("right", "left"))
        reason = (f"not bilateral at {endpoint.from_tp}: {MEASURE_LABELS[pct]} right {_num(r)}, "
                  f"left {_num(l)}; each lung needs ≥ {_num(endpoint.bilateral_min_pct_of_lung)} %")
        if baseline_measures.get("flags"):
            reason += f" (scan flags: {'; '.join(map(str, baseline_measures['flags']))})"
        return Verdict(endpoint.name, False, None, reason, False, changes)
    if endpoint.evaluate == "both":
        met, reason = _rule(endpoint, changes["both"], " (both lungs)")
    else:
        results = [_rule(endpoint, changes[lung], f" ({lung} lung)") for lung in ("right", "left")]
        met = all(ok for ok, _ in results)
        failed = [lung for (ok, _), lung in zip(results, ("right", "left")) if not ok]
        overall = ("reduction in each lung" if met
                   else f"no reduction (required in each lung; not met in the {' and '.join(failed)} lung)")
        reason = "; ".join(text for _, text in results) + f" ⇒ {overall}"
    return Verdict(endpoint.name, True, met, reason, bilateral, changes)


def cohort_summary(per_subject_table: Any, endpoint: Endpoint) -> dict[str, Any]:
    """Response rate of one endpoint over a per-subject table, with its exact 95 % interval.

    ``per_subject_table`` is a DataFrame or a list of mappings with columns ``subject_id``,
    ``endpoint``, ``evaluable``, ``reduction`` and ``reason`` (as in ``subjects.csv``); the rows of
    other endpoints are ignored. The percentage is of the evaluable participants.
    """
    rows = per_subject_table.to_dict("records") if hasattr(per_subject_table, "to_dict") else list(per_subject_table)
    rows = [r for r in rows if r.get("endpoint", endpoint.name) == endpoint.name]
    evaluable = [r for r in rows if _truthy(r["evaluable"])]
    k = sum(1 for r in evaluable if _truthy(r["reduction"]))
    n = len(evaluable)
    lo, hi = clopper_pearson(k, n) if n else (None, None)
    return {
        "endpoint": endpoint.name,
        "description": endpoint.description,
        "measure": endpoint.measure,
        "from": endpoint.from_tp,
        "to": endpoint.to_tp,
        "scope": endpoint.scope,
        "evaluate": endpoint.evaluate,
        "min_relative_decrease_pct": endpoint.min_relative_decrease_pct,
        "min_absolute_decrease": endpoint.min_absolute_decrease,
        "n_subjects": len(rows),
        "n_evaluable": n,
        "n_reduction": k,
        "proportion": k / n if n else None,
        "ci95": [lo, hi],
        "pct_reduction": round(100 * k / n, 2) if n else None,
        "ci95_low_pct": round(100 * lo, 2) if n else None,
        "ci95_high_pct": round(100 * hi, 2) if n else None,
        "ci_method": "Clopper-Pearson exact (beta), two-sided 95 %",
        "not_evaluable": [{"subject_id": r["subject_id"], "reason": r["reason"]}
                          for r in rows if not _truthy(r["evaluable"])],
    }


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return bool(value)


# --------------------------------------------------------------------------------------------------
# Output staging


class _StagedOutputs:
    """Writers of the files of one report, staged by :func:`ctquant.outputs.atomic.atomic_output_dir`:
    on an exception nothing of this run is left in the output folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> None:
        tmp = self.path(name)
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror or exc}", tmp) from None

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def write_csv(self, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
        self.write_text(name, buf.getvalue())


@contextlib.contextmanager
def _staged_outputs(out_dir: Path) -> Iterator[_StagedOutputs]:
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # the folder is there even when a write fails
    except OSError as exc:
        raise OutputError(f"cannot create output folder: {exc.strerror or exc}", out_dir) from None
    with atomic_output_dir(out_dir) as tmp:
        yield _StagedOutputs(tmp)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return value


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(value, digits)


#: Decimals kept for changes in comparison tables (comparison.csv/json); verdict sentences show these
#: same stored values, so a table and its verdict never round one change two ways.
ABS_CHANGE_DIGITS, REL_CHANGE_DIGITS = 4, 2


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas; no pyplot global state)

_COLOURS = {"reduction": "#1b9e77", "no reduction": "#d95f02", "not evaluable": "#9e9e9e"}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped to ``width_in`` inches (DejaVu Sans averages about 0.6 em per character, a
    margin kept), so that titles and axis labels are never clipped."""
    import textwrap

    per_line = max(20, int(0.9 * width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, per_line))


def plot_trajectories(rows: Sequence[Mapping[str, Any]], endpoint: Endpoint, path: Path, group: str = "") -> Any:
    """Per-participant lines of the endpoint measure (both lungs) from ``from`` to ``to``
    (``group``: named in the title, e.g. ``arm=active``)."""
    from matplotlib.lines import Line2D

    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    labels = []
    for row in rows:
        b, f = row.get("both_from"), row.get("both_to")
        if b is None or f is None:
            continue
        verdict = row["verdict"]
        style = dict(color=_COLOURS[verdict], marker="o", lw=1.8, alpha=0.9)
        if verdict == "not evaluable":
            style.update(ls=":", lw=1.2, alpha=0.7)
        ax.plot([0, 1], [b, f], **style)
        labels.append((f, str(row["subject_id"]), style["color"]))
    if labels:  # subject labels at the right end, nudged apart so that they do not overlap
        top = max(max(r.get("both_from") or 0, r.get("both_to") or 0) for r in rows) or 1.0
        gap, last = 0.035 * top, -math.inf
        for f, text, colour in sorted(labels):
            y = max(f, last + gap)
            ax.annotate(text, (1, f), xytext=(1.05, y), textcoords="data", va="center", fontsize=8,
                        color=colour, arrowprops=dict(arrowstyle="-", color=colour, lw=0.5, alpha=0.5))
            last = y
    else:
        ax.text(0.5, 0.5, "no participant with both time points", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_xticks([0, 1], [endpoint.from_tp, endpoint.to_tp])
    ax.set_xlim(-0.15, 1.35)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(_title(f"{MEASURE_LABELS[endpoint.measure]} (both lungs)", 3.6, 10))
    ev = [r for r in rows if r["evaluable"]]
    k = sum(1 for r in ev if r["reduction"])
    where = f" ({group})" if group else ""
    ax.set_title(_title(f"{endpoint.name}{where}: {k}/{len(ev)} evaluable with reduction", 6.4, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Line2D([], [], color=c, marker="o", ls=":" if v == "not evaluable" else "-", label=v)
                       for v, c in _COLOURS.items()], fontsize=8, loc="upper right")
    fig.savefig(path, format="png")
    return fig


def plot_waterfall(rows: Sequence[Mapping[str, Any]], endpoint: Endpoint, path: Path, group: str = "") -> Any:
    """Sorted bars of each evaluable participant's change (relative and absolute), thresholds marked
    (``group``: named in the title)."""
    ev = [r for r in rows if r["evaluable"]]
    ev.sort(key=lambda r: (r.get("both_rel_change_pct") is None, -(r.get("both_rel_change_pct") or 0.0)))
    width_in = max(6.4, 1.6 + 0.5 * len(ev))
    fig = _new_figure(width_in, 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    x = list(range(len(ev)))
    colours = [_COLOURS[r["verdict"]] for r in ev]
    abs_text, rel_text = _threshold_texts(endpoint)
    panels = (
        ("both_rel_change_pct", "relative change (%)", -endpoint.min_relative_decrease_pct, f"−{rel_text}"),
        ("both_abs_change", f"absolute change ({endpoint.unit})", -endpoint.min_absolute_decrease, f"−{abs_text}"),
    )
    for ax, (key, ylabel, threshold, text) in zip(axes, panels):
        values = [r.get(key) if r.get(key) is not None else math.nan for r in ev]
        ax.bar(x, values, color=colours, edgecolor="0.2", linewidth=0.5)
        ax.axhline(0, color="0.2", lw=0.8)
        ax.axhline(threshold, color="#7570b3", ls="--", lw=1.2, label=f"reduction threshold ({text})")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    if not ev:
        axes[0].text(0.5, 0.5, "no evaluable participant", ha="center", va="center",
                     transform=axes[0].transAxes, color="0.4")
    axes[1].set_xticks(x, [str(r["subject_id"]) for r in ev], rotation=45, ha="right", fontsize=8)
    rule = "both lungs" if endpoint.evaluate == "both" else "both lungs shown; rule applied in each lung"
    k = sum(1 for r in ev if r["reduction"])
    where = f" [{group}]" if group else ""
    axes[0].set_title(_title(f"{endpoint.name}{where}: {MEASURE_LABELS[endpoint.measure]}, {endpoint.from_tp} → "
                             f"{endpoint.to_tp} ({rule}); {k}/{len(ev)} with reduction", width_in, 9), fontsize=9)
    fig.savefig(path, format="png")
    return fig


# --------------------------------------------------------------------------------------------------
# ctquant compare


def _is_result(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() == ".json") or (path.is_dir() and (path / "measures.json").is_file())


def comparison_rows(first: Mapping[str, Any], second: Mapping[str, Any], from_tp: str, to_tp: str) -> list[dict[str, Any]]:
    """Every measure of every lung at both time points with its absolute and relative change."""
    rows = []
    for measure in MEASURES:
        for lung in LUNGS:
            ch = change(_value(first, lung, measure), _value(second, lung, measure))
            rows.append({
                "measure": measure, "lung": lung,
                "from_timepoint": from_tp, "from_value": ch["baseline"],
                "to_timepoint": to_tp, "to_value": ch["follow_up"],
                "abs_change": _round(ch["abs_change"], ABS_CHANGE_DIGITS),
                "rel_change_pct": _round(ch["rel_change_pct"], REL_CHANGE_DIGITS),
            })
    return rows


def run_compare(
    first: str | Path,
    second: str | Path,
    out_dir: str | Path,
    *,
    config_path: str | Path | None = None,
    allow_mismatch: bool = False,
    from_tp: Optional[str] = None,
    to_tp: Optional[str] = None,
    method: str = "model",
    device: str = "auto",
    subject_id: Optional[str] = None,
    quantify_config: str | Path | None = None,
) -> dict[str, Any]:
    """Compare two results (or quantify two scans first) and judge every matching endpoint.

    ``first``/``second`` are ``quantify`` output folders, ``measures.json`` files, or scans (DICOM
    folder, NIfTI file), which are quantified into ``out_dir/<time point>`` with the same method.
    Time points are ``from_tp``/``to_tp`` when given, else the results' own, else baseline / day14.
    Results made with different method, model or config (or of different subjects) raise
    :class:`IncompatibleResults` unless ``allow_mismatch``; then the mismatch is recorded.
    Writes ``comparison.csv``, ``verdicts.csv`` and ``comparison.json``; returns the JSON content.
    """
    config = load_endpoints(config_path)
    out_dir = Path(out_dir)
    inputs = {"from": Path(first), "to": Path(second)}
    results: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for role in ("from", "to"):
        if _is_result(inputs[role]):
            results[role] = load_measures(inputs[role])
            p = inputs[role]
            paths[role] = str(p / "measures.json" if p.is_dir() else p)
    labels = {
        "from": from_tp or (results.get("from") or {}).get("timepoint") or "baseline",
        "to": to_tp or (results.get("to") or {}).get("timepoint") or "day14",
    }
    if labels["from"] == labels["to"]:
        raise InputError(f"both results are labelled time point '{labels['from']}'; give --from and --to", inputs["to"])
    for role in ("from", "to"):
        given = (results.get(role) or {}).get("timepoint")
        if given and given != labels[role]:
            log.warning("%s is labelled '%s' but compared as '%s'", inputs[role], given, labels[role])
        if role not in results:
            if not inputs[role].exists():
                raise InputError("no such file or folder", inputs[role])
            from ..run.scan import quantify_to_dir, sanitize_id  # only when a scan must be quantified

            target = out_dir / sanitize_id(labels[role])
            sid = subject_id or (results.get("from") or results.get("to") or {}).get("subject_id")
            quantify_to_dir(inputs[role], target, method=method, device=device, subject_id=sid,
                            timepoint=labels[role], config_path=quantify_config)
            results[role] = load_measures(target)
            paths[role] = str(target / "measures.json")
    first_m, second_m = results["from"], results["to"]
    mismatch = result_mismatches(first_m, second_m)
    if mismatch and not allow_mismatch:
        raise IncompatibleResults(f"results differ in {describe_differences(mismatch)} "
                                  "(use --allow-mismatch to compare anyway)", paths["to"])
    # the mismatch is one of the notes below, which `ctquant compare` prints (once)

    endpoints = config.for_timepoints(labels["from"], labels["to"])
    if not endpoints:
        log.warning("no endpoint in %s compares %s → %s; writing the table only", config.path, labels["from"], labels["to"])
    verdicts = [reduction_verdict(ep, first_m, second_m) for ep in endpoints]
    days = _days_between(first_m, second_m)
    notes = []
    if days is not None and days < 0:
        notes.append(f"the {labels['to']} scan predates the {labels['from']} scan by {-days} days")
    if mismatch:
        notes.append("results made differently: " + describe_differences(mismatch))
    acquisition = acquisition_differences(first_m, second_m)
    if acquisition:
        notes.append(f"the scans were reconstructed differently ({describe_differences(acquisition)}): "
                     "the % of lung figures depend on it, so part of the change may be the reconstruction's")
    rows = comparison_rows(first_m, second_m, labels["from"], labels["to"])
    subject = subject_id or first_m.get("subject_id") or second_m.get("subject_id")
    verdict_rows = []
    for ep, v in zip(endpoints, verdicts):
        both = v.changes.get("both", {})
        verdict_rows.append({
            "subject_id": subject, "endpoint": ep.name, "measure": ep.measure,
            "from_timepoint": ep.from_tp, "to_timepoint": ep.to_tp,
            "from_value": both.get("baseline"), "to_value": both.get("follow_up"),
            "abs_change": _round(both.get("abs_change"), ABS_CHANGE_DIGITS),
            "rel_change_pct": _round(both.get("rel_change_pct"), REL_CHANGE_DIGITS),
            "evaluable": v.evaluable, "reduction": v.reduction, "verdict": v.label, "reason": v.reason,
            "mismatch": "; ".join(f"{m['field']}" for m in mismatch),
        })
    doc = {
        "schema": COMPARISON_SCHEMA,
        "subject_id": subject,
        "from_timepoint": labels["from"],
        "to_timepoint": labels["to"],
        "days_between": days,
        "measures": rows,
        "endpoints": [{**v.as_dict(), "definition": ep.as_dict()} for ep, v in zip(endpoints, verdicts)],
        "mismatch": mismatch,
        "acquisition_differences": acquisition,
        "notes": notes,
        "provenance": {
            "ctquant_version": __version__,
            "code_sha256": code_sha256(),
            "endpoints_config": config.path,
            "endpoints_config_sha256": config.sha256,
            "inputs": {labels["from"]: str(inputs["from"]), labels["to"]: str(inputs["to"])},
            "results": {
                labels[role]: {"measures": paths[role], **result_signature(results[role]),
                               "series_instance_uid": (results[role].get("provenance") or {}).get("series_instance_uid"),
                               "study_date": (results[role].get("provenance") or {}).get("study_date")}
                for role in ("from", "to")
            },
            "allow_mismatch": allow_mismatch,
            "created_utc": _now(),
        },
    }
    with _staged_outputs(out_dir) as out:
        out.write_csv("comparison.csv", rows, list(rows[0]))
        out.write_csv("verdicts.csv", verdict_rows,
                      ["subject_id", "endpoint", "measure", "from_timepoint", "to_timepoint", "from_value",
                       "to_value", "abs_change", "rel_change_pct", "evaluable", "reduction", "verdict",
                       "reason", "mismatch"])
        out.write_json("comparison.json", doc)
    return doc


# --------------------------------------------------------------------------------------------------
# ctquant endpoints (cohort)


def _result_path(record: ScanRecord) -> Optional[str]:
    """The ``measures.json`` of a scan that has a result."""
    return str(Path(record.output_dir) / "measures.json") if record.measures is not None else None


def _cohort_mismatch(results: Mapping[tuple[str, str], ScanRecord]) -> list[dict[str, Any]]:
    """Groups of results made with different method / model / quantification config."""
    groups: dict[tuple, list[str]] = {}
    for (sid, tp), r in results.items():
        if r.measures is not None:
            sig = result_signature(r.measures)
            groups.setdefault(tuple(sig.items()), []).append(f"{sid}/{tp}")
    if len(groups) <= 1:
        return []
    return [{**dict(sig), "results": scans} for sig, scans in groups.items()]


def _extra_values(rows: Sequence[ManifestRow], extras: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per subject, each extra manifest column: its value, or ``tp=value; ...`` where it varies."""
    out: dict[str, dict[str, str]] = {}
    for col in extras:
        per_subject: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            if row.extra.get(col):
                per_subject.setdefault(row.key[0], []).append((row.key[1], row.extra[col]))
        for sid, values in per_subject.items():
            distinct = {v for _, v in values}
            text = values[0][1] if len(distinct) == 1 else "; ".join(f"{tp}={v}" for tp, v in values)
            out.setdefault(sid, {})[col] = text
    return out


def _folder_tp(label: str) -> str:
    """A time point as folders and tables spell it (``day 14`` -> ``day_14``)."""
    from ..run.scan import sanitize_id

    try:
        return sanitize_id(label)
    except InputError:
        return label


def subject_row(endpoint: Endpoint, subject_id: str,
                results: Mapping[tuple[str, str], ScanRecord]) -> dict[str, Any]:
    """One ``subjects.csv`` row: the participant's values, changes, verdict and reason for an endpoint.

    ``results`` maps the manifest's (subject, time point), as folders spell them, to the scan's batch record.
    """
    first = results.get((subject_id, _folder_tp(endpoint.from_tp)))
    second = results.get((subject_id, _folder_tp(endpoint.to_tp)))
    problems = []
    for tp, r in ((endpoint.from_tp, first), (endpoint.to_tp, second)):
        if r is None:
            problems.append(f"no {tp} scan in the manifest")
        elif r.measures is None:
            problems.append(f"{tp} scan failed: {r.reason}")
    fm = first.measures if first else None
    sm = second.measures if second else None
    if problems:
        verdict = Verdict(endpoint.name, False, None, "; ".join(problems))
    else:
        verdict = reduction_verdict(endpoint, fm, sm)
    row: dict[str, Any] = {
        "subject_id": subject_id, "endpoint": endpoint.name, "measure": endpoint.measure,
        "from_timepoint": endpoint.from_tp, "to_timepoint": endpoint.to_tp,
        "evaluable": verdict.evaluable, "reduction": verdict.reduction, "verdict": verdict.label,
        "reason": verdict.reason,
        "bilateral_at_baseline": (is_bilateral(fm, endpoint.measure, endpoint.bilateral_min_pct_of_lung)
                                  if fm is not None else None),
    }
    for lung in LUNGS:
        ch = change(_value(fm, lung, endpoint.measure) if fm else None,
                    _value(sm, lung, endpoint.measure) if sm else None)
        row[f"{lung}_from"] = ch["baseline"]
        row[f"{lung}_to"] = ch["follow_up"]
        row[f"{lung}_abs_change"] = _round(ch["abs_change"])
        row[f"{lung}_rel_change_pct"] = _round(ch["rel_change_pct"], 2)
    row["days_between"] = _days_between(fm, sm) if fm and sm else None
    row["mismatch"] = "; ".join(m["field"] for m in result_mismatches(fm, sm)) if fm and sm else ""
    row["acquisition_differs"] = describe_differences(acquisition_differences(fm, sm)) if fm and sm else ""
    row["from_flags"] = "; ".join(map(str, fm.get("flags") or [])) if fm else ""
    row["to_flags"] = "; ".join(map(str, sm.get("flags") or [])) if sm else ""
    row["from_result"] = _result_path(first) if first else None
    row["to_result"] = _result_path(second) if second else None
    return row


COHORT_COLUMNS = [
    "endpoint", "group", "measure", "from", "to", "scope", "evaluate", "min_relative_decrease_pct",
    "min_absolute_decrease", "n_subjects", "n_evaluable", "n_reduction", "pct_reduction",
    "ci95_low_pct", "ci95_high_pct", "not_evaluable", "description", "endpoints_config_sha256",
    "ctquant_version",
]
#: The ``group`` of the whole cohort's rows in ``endpoints.csv``.
OVERALL = "all"
#: Where ``ctquant endpoints --out DIR`` (and ``ctquant batch``) write the endpoint report.
REPORT_FOLDER = "endpoints"


def subject_groups(rows: Sequence[ManifestRow], column: str, from_tp: str) -> dict[str, str]:
    """Each subject's value of a manifest column: at the endpoint's first time point, else the first
    non-empty one; ``(blank)`` when there is none."""
    out: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r.key[1] != _folder_tp(from_tp)):
        value = row.extra.get(column, "").strip()
        if value and row.key[0] not in out:
            out[row.key[0]] = value
    for row in rows:
        out.setdefault(row.key[0], "(blank)")
    return out


def group_label(column: str, value: str) -> str:
    """How a group is named in tables: ``arm=active``."""
    return f"{column}={value}"


def _plot_suffix(column: str, value: str) -> str:
    from ..run.scan import sanitize_id

    try:
        return f"_{sanitize_id(column)}-{sanitize_id(value)}"
    except InputError:
        return f"_{sanitize_id(column)}-{abs(hash(value)) % 10**8}"


def run_endpoints(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    config_path: str | Path | None = None,
    allow_mismatch: bool = False,
    method: Optional[str] = None,
    device: str = "auto",
    quantify_config: str | Path | None = None,
    workers: int = 1,
    scheduler: Optional[str] = None,
    scan_results: Optional[Mapping[tuple[str, str], ScanRecord]] = None,
    group_by: Optional[str] = None,
    allow_duplicates: bool = False,
) -> dict[str, Any]:
    """Evaluate every endpoint over a manifest's cohort; write the tables and plots.

    Without ``scan_results`` the manifest's scans are quantified by :func:`ctquant.run.batch.run_batch`
    into ``out_dir`` (``scans/``, ``cohort.csv``, ``failures.csv``, ``batch.json``; current results are
    reused, so a re-run only redoes what is missing, outdated or failed) and the report goes to
    ``out_dir/endpoints/``, as ``ctquant batch`` writes it. ``scan_results`` (batch records keyed by
    sanitized subject and time point, one per manifest row) are used instead; then nothing is
    quantified and the report goes to ``out_dir`` itself.

    Writes ``endpoints.csv``/``endpoints.json`` (one row per endpoint and group: n evaluable, n with
    reduction, % with exact 95 % CI, who is not evaluable and why), ``subjects.csv`` (one row per
    participant and endpoint) and per endpoint ``trajectory_<name>.png`` and ``waterfall_<name>.png``.
    ``group_by`` (an extra manifest column such as ``arm``) adds, for each of its values, a row per
    endpoint (group ``arm=<value>``, its own exact CI) and the two plots
    (``…_<name>_arm-<value>.png``); the overall rows have group ``all``. Results of different
    method/model/config among the evaluated time points raise :class:`IncompatibleResults` unless
    ``allow_mismatch``. Returns the ``endpoints.json`` content (its ``failures`` list holds the
    failed scans' ``failures.csv`` rows).
    """
    config = load_endpoints(config_path)
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    rows, extras = read_manifest(manifest)
    check_group_column(extras, group_by, manifest)
    timepoints = list(dict.fromkeys(tp for ep in config.endpoints for tp in (ep.from_tp, ep.to_tp)))
    report_dir = out_dir
    if scan_results is None:
        for message in timepoint_warnings(rows, timepoints):
            log.warning("%s: %s", manifest, message)
        summary = run_batch(manifest, out_dir, method=method or "model", device=device, config_path=quantify_config,
                            workers=workers, scheduler=scheduler, endpoints=False, progress=make_progress(),
                            allow_duplicates=allow_duplicates)
        if summary.duplicates_error is not None:
            raise summary.duplicates_error
        scan_results = {r.key: r for r in summary.records}
        report_dir = out_dir / REPORT_FOLDER
    missing = [f"{row.subject_id}/{row.timepoint}" for row in rows if row.key not in scan_results]
    if missing:
        raise InputError(f"no scan result for {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}", manifest)
    results = {row.key: scan_results[row.key] for row in rows}
    evaluated = {_folder_tp(tp) for tp in timepoints}
    mismatch = _cohort_mismatch({key: r for key, r in results.items() if key[1] in evaluated})
    if mismatch and not allow_mismatch:
        what = "; ".join(
            f"method={m['method']} model={str(m['model_sha256'])[:12]} config={str(m['config_sha256'])[:12]}: "
            f"{', '.join(m['results'][:4])}{' …' if len(m['results']) > 4 else ''}" for m in mismatch)
        raise IncompatibleResults(f"the cohort's results were made differently ({what}); "
                                  "use --allow-mismatch to evaluate anyway", manifest)

    subjects = list(dict.fromkeys(row.key[0] for row in rows))
    extra_values = _extra_values(rows, extras)
    extra_cols = [c if c not in SUBJECT_COLUMNS else f"manifest_{c}" for c in extras]
    subject_rows, summaries, group_summaries, plots = [], [], [], []
    for ep in config.endpoints:
        ep_rows = []
        for sid in subjects:
            row = subject_row(ep, sid, results)
            for col, out_col in zip(extras, extra_cols):
                row[out_col] = extra_values.get(sid, {}).get(col, "")
            ep_rows.append(row)
        subject_rows.extend(ep_rows)
        summaries.append({**cohort_summary(ep_rows, ep), "group": OVERALL})
        plots.append((ep, ep_rows, "", ""))
        if group_by:
            groups = subject_groups(rows, group_by, ep.from_tp)
            for value in sorted(set(groups.values())):
                members = [r for r in ep_rows if groups[r["subject_id"]] == value]
                group_summaries.append({**cohort_summary(members, ep), "group": group_label(group_by, value),
                                        "group_by": group_by, "group_value": value})
                plots.append((ep, members, _plot_suffix(group_by, value), group_label(group_by, value)))
    failures = [r.failure_row() for r in results.values() if r.status == "failed"]
    differing = list(dict.fromkeys(r["subject_id"] for r in subject_rows if r["acquisition_differs"]))
    if differing:
        log.warning("%d participant(s) have time points reconstructed differently (%s%s): the %% of lung figures "
                    "depend on it; see acquisition_differs in subjects.csv", len(differing),
                    ", ".join(differing[:4]), " …" if len(differing) > 4 else "")
    doc = {
        "schema": COHORT_SCHEMA,
        "endpoints": summaries,
        "group_by": group_by,
        "groups": group_summaries,
        "failures": failures,
        "mismatch": mismatch,
        "acquisition_differs": differing,
        "provenance": {
            "ctquant_version": __version__,
            "code_sha256": code_sha256(),
            "endpoints_config": config.path,
            "endpoints_config_sha256": config.sha256,
            "endpoint_definitions": [ep.as_dict() for ep in config.endpoints],
            "manifest": str(manifest),
            "manifest_sha256": file_sha256(manifest),
            "allow_mismatch": allow_mismatch,
            "scans": [{"subject_id": r.subject_id, "timepoint": r.timepoint, "manifest_line": r.line,
                       "status": r.status, "measures": _result_path(r), "reason": r.reason or None,
                       **(result_signature(r.measures) if r.measures else {})}
                      for r in results.values()],
            "created_utc": _now(),
        },
    }
    by_endpoint = {ep.name: [s for s in group_summaries if s["endpoint"] == ep.name] for ep in config.endpoints}
    table = [row for s in summaries for row in (s, *by_endpoint[s["endpoint"]])]
    cohort_rows = [{**s, "not_evaluable": [f"{x['subject_id']}: {x['reason']}" for x in s["not_evaluable"]],
                    "endpoints_config_sha256": config.sha256, "ctquant_version": __version__} for s in table]
    with _staged_outputs(report_dir) as out:
        out.write_csv("endpoints.csv", cohort_rows, COHORT_COLUMNS)
        out.write_json("endpoints.json", doc)
        out.write_csv("subjects.csv", subject_rows, SUBJECT_COLUMNS + extra_cols)
        for ep, members, suffix, label in plots:
            plot_trajectories(members, ep, out.path(f"trajectory_{ep.name}{suffix}.png"), group=label)
            plot_waterfall(members, ep, out.path(f"waterfall_{ep.name}{suffix}.png"), group=label)
    return doc


# --------------------------------------------------------------------------------------------------
# Console tables (used by the CLI)


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return _num(value, digits, sign=False)
    return str(value)


def comparison_table(doc: Mapping[str, Any]):
    """A short rich table of a :func:`run_compare` result: endpoint measures and verdicts."""
    from rich.table import Table

    measures = [e["definition"]["measure"] for e in doc["endpoints"]] or ["ggo_pct", "opacity_pct"]
    table = Table(title=f"{doc.get('subject_id') or 'subject'}: {doc['from_timepoint']} → {doc['to_timepoint']}")
    for col in ("measure", "lung", doc["from_timepoint"], doc["to_timepoint"], "change", "change %"):
        table.add_column(col, justify="left" if col in ("measure", "lung") else "right")
    for row in doc["measures"]:
        if row["measure"] in dict.fromkeys(measures):
            table.add_row(row["measure"], row["lung"], _cell(row["from_value"]), _cell(row["to_value"]),
                          _cell(row["abs_change"]), _cell(row["rel_change_pct"], 1))
    verdicts = Table(title="endpoints")
    verdicts.add_column("endpoint")
    verdicts.add_column("verdict")
    verdicts.add_column("reason")
    for e in doc["endpoints"]:
        verdicts.add_row(e["endpoint"], e["verdict"], e["reason"])
    return table, verdicts


def cohort_table(doc: Mapping[str, Any]):
    """A short rich table of a :func:`run_endpoints` result."""
    from rich.table import Table

    table = Table(title="endpoints (exact 95 % CI)")
    for col in ("endpoint", "evaluable", "reduction", "% (95 % CI)", "not evaluable"):
        table.add_column(col, justify="right" if col in ("evaluable", "reduction") else "left")
    by_endpoint: dict[str, list] = {}
    for g in doc.get("groups") or []:
        by_endpoint.setdefault(g["endpoint"], []).append(g)
    for s in (row for top in doc["endpoints"] for row in (top, *by_endpoint.get(top["endpoint"], []))):
        pct = ("–" if s["pct_reduction"] is None else
               f"{s['pct_reduction']:.1f} ({s['ci95_low_pct']:.1f}–{s['ci95_high_pct']:.1f})")
        ne = ", ".join(x["subject_id"] for x in s["not_evaluable"]) or "–"
        name = s["endpoint"] if s.get("group", OVERALL) == OVERALL else f"  {s['group']}"
        table.add_row(name, f"{s['n_evaluable']}/{s['n_subjects']}", str(s["n_reduction"]), pct, ne)
    return table


class _EndpointStep:
    """The endpoint stage as the batch runner calls it (:class:`ctquant.run.batch.EndpointStep`)."""

    def timepoints(self, endpoints_config: str | Path | None) -> list[str]:
        config = load_endpoints(endpoints_config)
        return list(dict.fromkeys(tp for ep in config.endpoints for tp in (ep.from_tp, ep.to_tp)))

    def report(self, manifest: Path, records: Mapping[tuple[str, str], ScanRecord], out_dir: Path,
               endpoints_config: str | Path | None, group_by: Optional[str]) -> dict[str, Any]:
        return run_endpoints(manifest, out_dir / REPORT_FOLDER, config_path=endpoints_config, scan_results=records,
                             group_by=group_by)


#: Passed to :func:`ctquant.run.batch.run_batch` for the endpoint report at the end of a batch.
ENDPOINT_STEP = _EndpointStep()


def run_cohort(manifest: str | Path, out_dir: str | Path, **options: Any) -> BatchSummary:
    """``ctquant batch``: every scan of ``manifest`` quantified into ``out_dir`` and, when a subject has a
    follow-up (or ``endpoints=True``), the endpoint report in ``out_dir/endpoints``.

    ``options`` are those of :func:`ctquant.run.batch.run_batch` (``method``, ``device``, ``workers``, …).
    """
    return run_batch(manifest, out_dir, endpoint_step=ENDPOINT_STEP, **options)
