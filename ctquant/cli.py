"""The ``ctquant`` command line: thin glue over the library modules.

Each command catches :class:`ctquant.errors.CtquantError`, prints one line
``ctquant: error: <path>: <reason>`` on stderr and exits with the error's code (see
:mod:`ctquant.errors`). Unexpected exceptions exit with 1; ``--debug`` shows their traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
import typer.core

from .version import __version__
from .errors import CtquantError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chest CT quantification of COVID-19 pneumonia: lungs, GGO, consolidation, trial endpoints.",
    pretty_exceptions_enable=False,
)

_STATE = {"debug": False}
log = logging.getLogger("ctquant")

# Options that several commands share, defined once so their names, defaults and help stay alike.
METHOD = typer.Option("model", help="Lesion method: model (MONAI network) or hu (HU bands).")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
SCAN_DEVICE = typer.Option("auto", help="auto, cpu or cuda (when scans are quantified).")
QUANTIFY_CONFIG = typer.Option(None, "--config", help="YAML overriding configs/quantify.yaml.")
QUANTIFY_CONFIG_OVER = typer.Option(None, "--quantify-config", help="YAML over configs/quantify.yaml.")
ENDPOINTS_CONFIG = typer.Option(None, "--config", help="Endpoints YAML (default configs/endpoints.yaml).")
SEG_FORMAT = typer.Option("nifti", "--seg-format", help="nifti, dicom-seg or both.")
WORKERS = typer.Option(1, "--workers", min=1, help="Local worker processes (1: in this process).")
SCHEDULER = typer.Option(None, "--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (needs the dask extra).")
GROUP_BY = typer.Option(None, "--group-by", help="Manifest column (e.g. arm): endpoint table and plots per group too.")
ALLOW_DUPLICATES = typer.Option(False, "--allow-duplicate-scans",
                                help="Accept one scan under two subject/time points (warned, not refused).")


def _hide_flag_types() -> None:
    """Typer's help shows ``<bool>`` beside on/off flags (``--force``, ``--help``), as if they took a
    value; show no type for them, as click does."""
    original = getattr(typer.core.TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_ctquant", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._ctquant = True
    typer.core.TyperOption.display_type_rich = display_type_rich


_hide_flag_types()


class _Formatter(logging.Formatter):
    """``ctquant: warning: ...``, in the case of ``ctquant: error: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        return f"ctquant: {record.levelname.lower()}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(debug: bool) -> None:
    """Warnings (debug logs and tracebacks with ``--debug``) on stderr, one line each."""
    _STATE["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)  # the stream of this invocation (in-process runners swap it)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], force=True)
    # pydicom warns (and logs) about every odd header value; that chatter would break the one-line
    # error contract on stderr, so it goes to the log, shown with --debug only.
    logging.captureWarnings(True)
    for name in ("py.warnings", "pydicom"):
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.ERROR)


def _one_line(text: str) -> str:
    """Text that stays on one terminal line: control characters (newlines from headers or file names) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _fail(message: str, code: int) -> None:
    typer.echo(f"ctquant: error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into one-line messages and documented exit codes.

    The command also takes ``--debug`` (as ``ctquant --debug COMMAND`` does).
    """

    @functools.wraps(func)
    def wrapper(*args, debug: bool = False, **kwargs):
        if debug and not _STATE["debug"]:
            configure_logging(True)
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CtquantError as exc:
            if exc.exit_code == 130:  # Interrupted: further Ctrl-C must not break the one-line exit
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            if _STATE["debug"]:
                traceback.print_exc()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _fail("interrupted", 130)
        except Exception as exc:  # a bug: keep the message on one line unless --debug
            if _STATE["debug"]:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug and report it", 1)

    signature = inspect.signature(func, eval_str=True)
    debug_param = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--debug", help="Show tracebacks and debug logs."))
    params = list(signature.parameters.values())
    wrapper.__signature__ = signature.replace(parameters=[*params, debug_param])
    wrapper.__annotations__ = {**func.__annotations__, "debug": bool}
    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ctquant {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    configure_logging(debug)


@app.command()
@handle_errors
def series(folder: Path = typer.Argument(..., help="A DICOM study folder (nested, any file names)."),
           config: Optional[Path] = typer.Option(None, "--config", help="YAML overriding configs/quantify.yaml "
                                                                         "(its series_selection rule).")) -> None:
    """List the DICOM series of a study folder and mark the one `quantify` would pick, and why."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .config import load_quantify_config
    from .io.scans import choose_series, find_series, kernel_class

    selection = load_quantify_config(config)["series_selection"]
    found = find_series(folder)
    try:
        choice = choose_series(found, root=folder, selection=selection)
        chosen, why = choice.info.series_uid, choice.reason
    except CtquantError as exc:
        chosen, why = None, exc.reason
    table = Table(title=escape(f"{len(found)} series in {folder}"))
    for column in ("", "modality", "description", "images", "thickness mm", "pixel mm", "kernel",
                   "study date", "series UID / note"):
        table.add_column(column)
    for info in found:
        note = info.unsuitable_reason()
        spacing = "x".join(f"{v:.2f}" for v in info.pixel_spacing_mm) if info.pixel_spacing_mm else "-"
        kernel = f"{info.kernel} ({kernel_class(info.kernel, selection)})" if info.kernel else "-"
        uid = info.series_uid + (" (no SeriesInstanceUID: grouped by study, frame of reference and grid)"
                                 if info.uid_missing else "")
        cells = ("*" if info.series_uid == chosen else "", info.modality, info.description,
                 str(info.n_images), f"{info.slice_thickness_mm:g}" if info.slice_thickness_mm else "-",
                 spacing, kernel, info.study_date or "-", uid)
        # Header text is data, not rich markup; control characters would break the table.
        cells = [escape(_one_line(c)) for c in cells]
        table.add_row(*cells[:-1], cells[-1] + (f"\n(skipped: {escape(_one_line(note))})" if note else ""))
    console = Console(width=200)
    console.print(table)
    console.print(f"rule: series_selection.kernel = {selection['kernel']}: most images, then thinnest slices, "
                  f"then the {'kernel ignored' if selection['kernel'] == 'any' else selection['kernel'] + 'est kernel'}",
                  markup=False, highlight=False)
    if chosen is None:
        typer.echo(f"no series chosen: {_one_line(why)}", err=True)
    else:
        console.print(f"* chosen: {_one_line(why)}", markup=False, highlight=False)


@app.command()
@handle_errors
def quantify(
    input: Path = typer.Argument(..., help="A DICOM folder (or file) or a NIfTI/NRRD/MHA volume in HU."),
    out: Path = typer.Option(..., "--out", help="Results folder (created; files replaced atomically; "
                                                "files of an older run there are removed)."),
    method: str = METHOD,
    device: str = DEVICE,
    subject: Optional[str] = typer.Option(None, "--subject", help="Subject ID (default: a hash of the patient ID)."),
    timepoint: Optional[str] = typer.Option(None, "--timepoint", help="Time point label, e.g. baseline, day14."),
    series_uid: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID to use (as ctquant series lists it)."),
    config: Optional[Path] = QUANTIFY_CONFIG,
    seg_format: str = SEG_FORMAT,
    force: bool = typer.Option(False, "--force", help="Replace a result of another subject or series in --out."),
) -> None:
    """Segment lungs, GGO and consolidation in one scan and write measures and masks to --out."""
    from rich.console import Console
    from rich.markup import escape

    import ctquant

    ctquant.reuse_freed_memory()
    with Console(stderr=True).status("starting") as status:
        result = ctquant.quantify(input, out_dir=out, method=method, device=device, subject_id=subject,
                                  timepoint=timepoint, config_path=config, series_uid=series_uid,
                                  seg_format=seg_format, refuse_other_run=not force,
                                  progress=lambda stage: status.update(escape(f"{input}: {stage}")))
    _print_measures(result.measures, out)


def _print_measures(measures: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{measures['subject_id'] or ''} {measures['timepoint'] or ''} ({measures['method']})")
    table.add_column("")
    for side in ("right", "left", "both"):
        table.add_column(side, justify="right")
    rows = [("lung volume (mL)", "lung_volume_ml", ".0f"), ("GGO (mL)", "ggo_volume_ml", ".1f"),
            ("GGO (% of lung)", "ggo_pct", ".2f"), ("consolidation (mL)", "consolidation_volume_ml", ".1f"),
            ("consolidation (% of lung)", "consolidation_pct", ".2f"), ("opacity (% of lung)", "opacity_pct", ".2f"),
            ("mean lung HU", "mean_lung_hu", ".0f")]
    for name, key, fmt in rows:  # None: no value (the mean HU of a lung not found)
        table.add_row(name, *("–" if measures["lungs"][side][key] is None else format(measures["lungs"][side][key], fmt)
                              for side in ("right", "left", "both")))
    console = Console()
    console.print(table)
    bilateral = ", ".join(k for k, v in measures["bilateral"].items() if v) or "none"
    console.print(f"bilateral: {bilateral}")
    # quality flags were logged once as warnings while measuring (ctquant: warning: ...)
    console.print(f"results in {out}", markup=False, highlight=False)


@app.command()
@handle_errors
def compare(
    baseline: Path = typer.Argument(..., help="First time point: a quantify results folder, measures.json, or a scan."),
    day14: Path = typer.Argument(..., help="Second time point: a quantify results folder, measures.json, or a scan."),
    out: Path = typer.Option(..., "--out", help="Output folder: comparison.csv, verdicts.csv, comparison.json."),
    config: Optional[Path] = ENDPOINTS_CONFIG,
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch",
                                        help="Compare results of different method/model/config (recorded)."),
    from_tp: Optional[str] = typer.Option(None, "--from", help="Time point of the first (default: its own, else baseline)."),
    to_tp: Optional[str] = typer.Option(None, "--to", help="Time point of the second (default: its own, else day14)."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Subject ID when scans are quantified."),
    method: str = typer.Option("model", help="Lesion method when scans are quantified: model or hu."),
    device: str = SCAN_DEVICE,
    quantify_config: Optional[Path] = QUANTIFY_CONFIG_OVER,
) -> None:
    """Compare one patient's two time points: changes per lung and each endpoint's reduction verdict."""
    from rich.console import Console

    import ctquant

    doc = ctquant.run_compare(baseline, day14, out, config_path=config, allow_mismatch=allow_mismatch,
                              from_tp=from_tp, to_tp=to_tp, method=method, device=device, subject_id=subject,
                              quantify_config=quantify_config)
    console = Console(width=160)
    for table in ctquant.comparison_table(doc):
        console.print(table)
    for note in doc["notes"]:
        log.warning("%s", note)
    console.print(f"results in {out}", markup=False, highlight=False)


@app.command()
@handle_errors
def endpoints(
    manifest: Path = typer.Argument(..., help="CSV: subject_id, timepoint, input (relative to the CSV's folder); extra columns are kept."),
    out: Path = typer.Option(..., "--out", help="Output folder: the batch's scans/, cohort.csv, failures.csv (current "
                                                "results are reused); endpoints/ with endpoints.csv/.json, subjects.csv, plots."),
    config: Optional[Path] = ENDPOINTS_CONFIG,
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch",
                                        help="Evaluate results of different method/model/config (recorded)."),
    method: str = METHOD,
    device: str = SCAN_DEVICE,
    quantify_config: Optional[Path] = QUANTIFY_CONFIG_OVER,
    workers: int = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
    group_by: Optional[str] = GROUP_BY,
    allow_duplicates: bool = ALLOW_DUPLICATES,
) -> None:
    """Cohort endpoints: % of participants with reduction, exact 95 % CI, per-subject table and plots."""
    from rich.console import Console

    import ctquant

    from .errors import BatchFailures

    doc = ctquant.run_endpoints(manifest, out, config_path=config, allow_mismatch=allow_mismatch, method=method,
                                device=device, quantify_config=quantify_config, workers=workers, scheduler=scheduler,
                                group_by=group_by, allow_duplicates=allow_duplicates)
    console = Console(width=160)
    console.print(ctquant.cohort_table(doc))
    console.print(f"results in {out} (endpoint report in {out / 'endpoints'})", markup=False, highlight=False)
    if doc["failures"]:
        raise BatchFailures(f"{len(doc['failures'])} scan(s) failed; endpoints written without them "
                            "(see failures.csv)", out / "failures.csv")


@app.command()
@handle_errors
def agree(
    inputs: Optional[list[Path]] = typer.Argument(
        None, help="Two or more reader folders of masks with matching relative file names (or ctquant quantify "
                   "output folders), or ONE CSV with columns case_id, reader, path[, labels][, lungs]."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    labels: str = typer.Option("1=ggo,2=consolidation", "--labels",
                               help="Label map VALUE=class,...: the classes compared and the default mapping."),
    reader_labels: Optional[list[str]] = typer.Option(
        None, "--reader-labels", help="Per-reader remapping READER:VALUE=class,... (READER: name or 1-based "
                                      "position; repeatable), e.g. 'B:3=ggo,4=consolidation'."),
    names: Optional[str] = typer.Option(None, "--names", help="Reader names, comma-separated (default: folder names)."),
    lungs: Optional[Path] = typer.Option(None, "--lungs",
                                         help="Folder of lung masks with matching names (for % of lung)."),
    union: Optional[str] = typer.Option(None, "--union", help="Also compare the union of all classes under this name."),
    tolerance_mm: float = typer.Option(0.01, "--tolerance-mm", help="Grid tolerance (spacing/origin, mm)."),
    table: Optional[Path] = typer.Option(None, "--table", help="Table mode: CSV case_id,reader,measure,value (long) "
                                                               "or case_id,reader,<measure>... (wide)."),
    categorical: Optional[list[str]] = typer.Option(None, "--categorical",
                                                    help="Table mode: nominal measures (comma-separated; repeatable)."),
    ordinal: Optional[list[str]] = typer.Option(
        None, "--ordinal", help="Table mode: ordinal measures, numeric ('severity') or with an order "
                                "('severity=none<mild<moderate<severe'); repeatable."),
) -> None:
    """Reader agreement of masks (Dice, Jaccard, HD95, ASSD, volume ICC and Bland-Altman) or of per-case measures.

    Masks: ctquant agree A/ B/ [C/ ...] --out DIR, or ctquant agree masks.csv --out DIR.

    Cases match by relative file name without suffix (.nii.gz .nii .nrrd .mha .mhd; .dcm = DICOM SEG).

    A ctquant quantify output folder (<case>/lesions.nii.gz + lungs.nii.gz) is a reader too.

    Other label values: per reader --reader-labels 'B:3=ggo,4=consolidation', or a 'labels' column in the CSV.

    Masks on another, overlapping grid are resampled (nearest neighbour) onto the first reader's, with a warning.

    Writes cases.csv, volumes.csv, summary.json and Bland-Altman PNGs.

    Table: ctquant agree --table scores.csv --out DIR [--categorical verdict] [--ordinal severity].

    Table statistics: ICC, Bland-Altman, Pearson/Spearman; Cohen's, weighted and Fleiss' kappa with % agreement.

    Writes measures.csv, summary.json and Bland-Altman PNGs.
    """
    import ctquant

    from .errors import InputError
    from .trial.agreement import print_summary

    if table is not None:
        if inputs:
            raise InputError("give reader folders/CSV or --table, not both", table)
        report = ctquant.run_table_agreement(table, out, categorical=categorical or [], ordinal=ordinal or [])
    else:
        if not inputs:
            raise InputError("need masks from at least two readers (folders or one CSV), or --table")
        report = ctquant.run_mask_agreement(inputs, out, labels=labels, reader_labels=reader_labels or [],
                                            names=[n.strip() for n in names.split(",")] if names else None,
                                            lungs=lungs, union=union, tolerance_mm=tolerance_mm)
    for message in report.warnings:
        typer.echo(f"ctquant: warning: {message}", err=True)
    print_summary(report)


@app.command()
@handle_errors
def batch(
    manifest: Path = typer.Argument(..., help="CSV with subject_id, timepoint, input (+ series_uid, extra columns)."),
    out: Path = typer.Option(..., "--out", help="Output folder: scans/<subject>/<timepoint>/, cohort.csv, failures.csv."),
    workers: int = WORKERS,
    scheduler: Optional[str] = SCHEDULER,
    method: str = METHOD,
    device: str = DEVICE,
    config: Optional[Path] = QUANTIFY_CONFIG,
    seg_format: str = SEG_FORMAT,
    force: bool = typer.Option(False, "--force", help="Recompute every scan, even with a current result."),
    endpoints_config: Optional[Path] = typer.Option(None, "--endpoints-config",
                                                    help="Endpoints YAML for the report (default configs/endpoints.yaml)."),
    report: Optional[bool] = typer.Option(None, "--endpoints/--no-endpoints",
                                          help="Endpoint report in OUT/endpoints (default: when a subject has 2+ time points)."),
    group_by: Optional[str] = GROUP_BY,
    allow_duplicates: bool = ALLOW_DUPLICATES,
) -> None:
    """Quantify every scan of a manifest: resumable, parallel (--workers / Dask), failures isolated."""
    import ctquant

    from .errors import BatchFailures
    from .run.batch import make_progress

    summary = ctquant.run_cohort(manifest, out, method=method, device=device, config_path=config,
                                 seg_format=seg_format, workers=workers, scheduler=scheduler, force=force,
                                 endpoints_config=endpoints_config, endpoints=report, progress=make_progress(),
                                 group_by=group_by, allow_duplicates=allow_duplicates)
    counts = summary.counts
    typer.echo(f"ctquant batch: {counts['ok']} quantified, {counts['skipped']} skipped (current), "
               f"{counts['failed']} failed; cohort table {summary.cohort_csv}", err=True)
    if summary.endpoints is not None:
        typer.echo(f"ctquant batch: endpoint report in {summary.out_dir / 'endpoints'}", err=True)
    if summary.duplicates_error is not None:
        raise summary.duplicates_error
    if counts["failed"]:
        raise BatchFailures(f"{counts['failed']} of {len(summary.records)} scan(s) failed (see failures.csv)",
                            summary.failures_csv)
    if summary.endpoints_error is not None:
        raise summary.endpoints_error


@app.command()
@handle_errors
def report(
    results_dir: Path = typer.Argument(..., help="A results folder: quantify/batch/endpoints output (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RESULTS_DIR/cohort_report.html)."),
    qc_images: bool = typer.Option(True, "--qc-images/--no-qc-images", help="Embed each scan's QC montage."),
) -> None:
    """Self-contained HTML report of every measures.json under RESULTS_DIR, with endpoint tables and plots."""
    import ctquant

    path = ctquant.write_cohort_report(results_dir, out, embed_qc=qc_images)
    typer.echo(f"report in {path}")

def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
