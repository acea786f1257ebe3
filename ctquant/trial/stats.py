"""Agreement statistics on plain arrays: ICC, Bland–Altman, correlation, Cohen's and Fleiss' kappa.

Pure functions with no file I/O (except :func:`bland_altman_plot`, which writes one PNG). Every
function returns a plain ``dict`` of Python floats/ints (``nan`` where a statistic is undefined, with a
``note`` saying why), ready for :func:`jsonable`.

References:
    Shrout PE, Fleiss JL (1979). Intraclass correlations: uses in assessing rater reliability.
    Psychol Bull 86:420–428.  McGraw KO, Wong SP (1996). Forming inferences about some intraclass
    correlation coefficients. Psychol Methods 1:30–46.  Bland JM, Altman DG (1986). Statistical
    methods for assessing agreement between two methods of clinical measurement. Lancet i:307–310.
    Cohen J (1960, 1968); Fleiss JL (1971). Measuring nominal scale agreement among many raters.
    Psychol Bull 76:378–382.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

NAN = float("nan")


def _f(value: Any) -> float:
    """A plain float (``nan`` for None/invalid)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def describe(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Summary of a sample that skips NaN: ``n`` (finite values used), ``n_nan``, mean, sd, median,
    quartiles, min, max (all ``nan`` when ``n`` is 0)."""
    arr = np.asarray(values, dtype=float).ravel()
    finite = arr[np.isfinite(arr)]
    out: dict[str, Any] = {"n": int(finite.size), "n_nan": int(arr.size - finite.size)}
    if finite.size == 0:
        out.update(mean=NAN, sd=NAN, median=NAN, q1=NAN, q3=NAN, min=NAN, max=NAN)
        return out
    out.update(
        mean=float(finite.mean()),
        sd=float(finite.std(ddof=1)) if finite.size > 1 else NAN,
        median=float(np.median(finite)),
        q1=float(np.percentile(finite, 25)),
        q3=float(np.percentile(finite, 75)),
        min=float(finite.min()),
        max=float(finite.max()),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Continuous measures
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pingouin_full_precision() -> Iterator[None]:
    """Pingouin rounds its CI95 column to 2 decimals by default; keep full precision meanwhile."""
    import pingouin

    saved = dict(pingouin.options)
    try:
        for key in [k for k in pingouin.options if k.startswith("round")]:
            pingouin.options[key] = None
        yield
    finally:
        pingouin.options.clear()
        pingouin.options.update(saved)


def icc(ratings: pd.DataFrame | np.ndarray) -> dict[str, Any]:
    """Intraclass correlations of a targets × raters table (rows: cases, columns: readers).

    Uses :func:`pingouin.intraclass_corr` (Shrout & Fleiss 1979 / McGraw & Wong 1996) on the cases
    rated by every reader (incomplete rows are dropped and counted). Returns ``icc1_1`` (one-way
    random), ``icc2_1`` (two-way random, absolute agreement, single rater; McGraw & Wong ICC(A,1))
    and ``icc3_1`` (two-way mixed, consistency, single rater; ICC(C,1)), each as
    ``{"value", "ci95": [low, high]}``, plus ``n_cases``, ``n_readers``, ``n_dropped_incomplete``.
    """
    table = pd.DataFrame(ratings).apply(pd.to_numeric, errors="coerce")
    complete = table.dropna(axis=0, how="any")
    out: dict[str, Any] = {
        "n_cases": int(len(complete)),
        "n_readers": int(table.shape[1]),
        "n_dropped_incomplete": int(len(table) - len(complete)),
    }
    empty = {"value": NAN, "ci95": [NAN, NAN]}
    keys = {"ICC(1,1)": "icc1_1", "ICC(A,1)": "icc2_1", "ICC(C,1)": "icc3_1",
            "ICC1": "icc1_1", "ICC2": "icc2_1", "ICC3": "icc3_1"}  # pingouin >= 0.7 / older names
    for key in ("icc1_1", "icc2_1", "icc3_1"):
        out[key] = dict(empty)
    if table.shape[1] < 2 or len(complete) < 2:
        out["note"] = "needs at least 2 cases rated by every reader"
        return out
    values = complete.to_numpy(dtype=float)
    if np.ptp(values) == 0:
        out["note"] = "all values identical: ICC undefined"
        return out
    import pingouin

    long = pd.DataFrame(
        [(i, j, values[i, j]) for i in range(values.shape[0]) for j in range(values.shape[1])],
        columns=["target", "rater", "rating"],
    )
    try:
        with _pingouin_full_precision(), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = pingouin.intraclass_corr(data=long, targets="target", raters="rater", ratings="rating")
    except (AssertionError, ValueError) as exc:  # pingouin refuses tiny tables (< 5 ratings)
        out["note"] = f"not computed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        return out
    for _, row in res.iterrows():
        key = keys.get(str(row["Type"]))
        if key:
            ci = list(np.asarray(row["CI95"], dtype=float).ravel())
            out[key] = {"value": _f(row["ICC"]), "ci95": [_f(ci[0]), _f(ci[1])]}
    return out


def bland_altman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Bland–Altman agreement of paired measurements: difference = ``x - y``.

    Returns ``n`` (pairs with both values finite), ``bias`` (mean difference), ``sd_diff``,
    ``loa_lower``/``loa_upper`` (bias ∓ 1.96 SD, the 95 % limits of agreement), ``bias_ci95``
    (t-based), ``mean_x``, ``mean_y``.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    d = x - y
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "n_dropped": int(ok.size - n)}
    if n == 0:
        out.update(bias=NAN, sd_diff=NAN, loa_lower=NAN, loa_upper=NAN, bias_ci95=[NAN, NAN],
                   mean_x=NAN, mean_y=NAN, note="no complete pairs")
        return out
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else NAN
    if n > 1:
        from scipy import stats

        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        ci = [bias - half, bias + half]
    else:
        ci = [NAN, NAN]
    out.update(
        bias=bias,
        sd_diff=sd,
        loa_lower=bias - 1.96 * sd,
        loa_upper=bias + 1.96 * sd,
        bias_ci95=ci,
        mean_x=float(x.mean()),
        mean_y=float(y.mean()),
    )
    return out


def correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Pearson r and Spearman rho (with two-sided p-values) over pairs with both values finite."""
    from scipy import stats

    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {"n": int(x.size), "pearson_r": NAN, "pearson_p": NAN,
                           "spearman_rho": NAN, "spearman_p": NAN}
    if x.size < 3:
        out["note"] = "needs at least 3 pairs"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "a constant series: correlation undefined"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    out.update(pearson_r=_f(pr[0]), pearson_p=_f(pr[1]), spearman_rho=_f(sr[0]), spearman_p=_f(sr[1]))
    return out


def bland_altman_plot(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    units: str = "",
    label_x: str = "x",
    label_y: str = "y",
) -> Path:
    """Write a Bland–Altman PNG (mean vs difference ``x - y``, bias and 95 % limits) to ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    stats = bland_altman(x, y)
    unit = f" ({units})" if units else ""
    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter((x + y) / 2.0, x - y, s=18, alpha=0.8, color="tab:blue")
    if stats["n"] > 0:
        ax.axhline(stats["bias"], color="tab:red", lw=1.2, label=f"bias {stats['bias']:.3g}")
    if np.isfinite(stats["sd_diff"]):
        for key in ("loa_lower", "loa_upper"):
            ax.axhline(stats[key], color="tab:gray", ls="--", lw=1.0)
        ax.plot([], [], color="tab:gray", ls="--",
                label=f"95% LoA [{stats['loa_lower']:.3g}, {stats['loa_upper']:.3g}]")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel(f"mean of {label_x} and {label_y}{unit}")
    ax.set_ylabel(f"{label_x} − {label_y}{unit}")
    ax.set_title(f"{title} (n={stats['n']})" if title else f"n={stats['n']}")
    ax.legend(loc="best", fontsize="small")
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)  # tight_layout is slow
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# Categorical measures
# --------------------------------------------------------------------------------------------------


def percent_agreement(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Percentage of items with the same rating from both raters (items missing in either skipped)."""
    pairs = [(u, v) for u, v in zip(a, b) if not _missing(u) and not _missing(v)]
    if not pairs:
        return NAN
    return 100.0 * float(sum(bool(u == v) for u, v in pairs)) / len(pairs)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _kappa_result(res: Any) -> dict[str, Any]:
    return {"value": _f(res.kappa), "ci95": [_f(res.kappa_low), _f(res.kappa_upp)], "se": _f(res.std_kappa)}


def cohen_kappa(
    a: Sequence[Any],
    b: Sequence[Any],
    categories: Sequence[Any] | None = None,
    *,
    ordinal: bool = False,
) -> dict[str, Any]:
    """Cohen's kappa of two raters' labels (statsmodels ``cohens_kappa``), with percentage agreement.

    ``categories`` fixes the category set and, for ordinal scales, their order; by default the
    sorted set of observed labels. With ``ordinal=True`` also the linearly and quadratically weighted
    kappa (Cohen 1968), with weights from the category *ranks* (as R ``irr::kappa2`` and
    ``sklearn.metrics.cohen_kappa_score`` do; give the full scale in ``categories`` to include
    unobserved levels). Items missing in either rater are skipped and counted.
    """
    from statsmodels.stats.inter_rater import cohens_kappa

    pairs = [(u, v) for u, v in zip(a, b) if not _missing(u) and not _missing(v)]
    cats = list(categories) if categories is not None else sorted({u for p in pairs for u in p}, key=_sort_key)
    unknown = {u for p in pairs for u in p} - set(cats)
    if unknown:
        raise ValueError(f"ratings {sorted(map(str, unknown))} are not among the categories {cats}")
    out: dict[str, Any] = {
        "n": len(pairs),
        "n_dropped": len(list(zip(a, b))) - len(pairs),
        "categories": [_plain(c) for c in cats],
        "pct_agreement": percent_agreement([p[0] for p in pairs], [p[1] for p in pairs]),
        "kappa": {"value": NAN, "ci95": [NAN, NAN], "se": NAN},
    }
    if ordinal:
        out["kappa_linear"] = dict(out["kappa"])
        out["kappa_quadratic"] = dict(out["kappa"])
    if not pairs:
        out["note"] = "no items rated by both"
        return out
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)))
    for u, v in pairs:
        table[index[u], index[v]] += 1
    p_row, p_col = table.sum(1) / len(pairs), table.sum(0) / len(pairs)
    if np.isclose((p_row * p_col).sum(), 1.0):
        out["note"] = "both raters used a single, identical category: kappa undefined"
        return out
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        out["kappa"] = _kappa_result(cohens_kappa(table))
        if ordinal:
            out["kappa_linear"] = _kappa_result(cohens_kappa(table, wt="linear"))
            out["kappa_quadratic"] = _kappa_result(cohens_kappa(table, wt="quadratic"))
    return out


def fleiss_kappa(ratings: np.ndarray | pd.DataFrame, categories: Sequence[Any] | None = None) -> dict[str, Any]:
    """Fleiss' kappa (1971) of a subjects × raters table of labels (statsmodels ``fleiss_kappa``).

    Subjects not rated by every rater are dropped and counted. Also returns ``pct_all_agree``
    (subjects on which every rater gave the same label) and ``pct_pairwise_agreement`` (Fleiss'
    mean observed agreement P̄ over rater pairs, in %).
    """
    from statsmodels.stats.inter_rater import fleiss_kappa as _fleiss

    frame = pd.DataFrame(ratings)
    rows = [list(r) for r in frame.itertuples(index=False) if not any(_missing(v) for v in r)]
    cats = list(categories) if categories is not None else sorted({v for r in rows for v in r}, key=_sort_key)
    out: dict[str, Any] = {
        "n": len(rows),
        "n_raters": int(frame.shape[1]),
        "n_dropped_incomplete": int(len(frame) - len(rows)),
        "categories": [_plain(c) for c in cats],
        "kappa": NAN,
        "pct_all_agree": NAN,
        "pct_pairwise_agreement": NAN,
    }
    if not rows or frame.shape[1] < 2:
        out["note"] = "needs subjects rated by every rater (and at least 2 raters)"
        return out
    index = {c: i for i, c in enumerate(cats)}
    counts = np.zeros((len(rows), len(cats)))
    for i, row in enumerate(rows):
        for v in row:
            counts[i, index[v]] += 1
    k = frame.shape[1]
    p_i = ((counts * (counts - 1)).sum(1)) / (k * (k - 1))
    out["pct_all_agree"] = 100.0 * float(np.mean(counts.max(1) == k))
    out["pct_pairwise_agreement"] = 100.0 * float(p_i.mean())
    p_j = counts.sum(0) / counts.sum()
    if np.isclose((p_j**2).sum(), 1.0):
        out["note"] = "all ratings in a single category: kappa undefined"
        return out
    out["kappa"] = _f(_fleiss(counts, method="fleiss"))
    return out


def _sort_key(value: Any) -> tuple:
    """Numbers first, in numeric order, then strings."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def pairs_of(names: Sequence[str]) -> list[tuple[str, str]]:
    """All unordered reader pairs in the given order: (A,B), (A,C), (B,C)."""
    return list(combinations(list(names), 2))


def jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays to Python and non-finite floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
