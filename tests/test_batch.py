"""``ctquant batch``: manifest checks, failure isolation, resuming after a kill, config changes, Dask.

Scans are tiny synthetic phantoms (``ctquant.synthetic.phantom``, 40x128x128 at 6x2.8x2.8 mm) quantified with
``--method hu``; the whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctquant.run import batch
from ctquant.run.batch import (BatchSettings, ScanTask, input_fingerprint, make_settings, plan, read_manifest,
                               run_batch, run_one)
from ctquant.cli import app
from ctquant.trial.endpoints import ENDPOINT_STEP, run_cohort
from ctquant.errors import InputError

SHAPE, SPACING = (40, 128, 128), (6.0, 2.8, 2.8)
SCANS = [("P1", "baseline", 1), ("P1", "day14", 1), ("P2", "baseline", 2), ("P2", "day14", 2)]
MEASURE_COLUMNS = [f"{side}_{m}" for side in ("right", "left", "both")
                   for m in ("lung_volume_ml", "ggo_volume_ml", "consolidation_volume_ml", "opacity_pct",
                             "mean_lung_hu")]


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cohort(path: Path):
    """``cohort.csv`` as a DataFrame (pandas imported here: pool workers import this module)."""
    import pandas as pd

    return pd.read_csv(path / "cohort.csv", dtype={"subject_id": str, "timepoint": str})


def assert_same(a, b) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Four DICOM series (two subjects x baseline/day14) and ``manifest.csv`` with relative inputs."""
    from ctquant.synthetic.phantom import make_phantom, uid_from, write_dicom_series

    root = tmp_path_factory.mktemp("cohort")
    rows = []
    for sid, tp, seed in SCANS:
        ph = make_phantom(SHAPE, SPACING, timepoint=tp, severity=1.0, seed=seed)
        write_dicom_series(ph, root / "dicom" / f"{sid}_{tp}", study_uid=uid_from(sid, tp, "study"),
                           series_uid=uid_from(sid, tp, "series"), frame_of_reference_uid=uid_from(sid, "for"),
                           study_date="20200401" if tp == "baseline" else "20200415", series_description="chest",
                           series_number=1, patient_id=sid, patient_name=f"Test^{sid}", seed=seed)
        rows.append({"subject_id": sid, "timepoint": tp, "input": f"dicom/{sid}_{tp}", "arm": "A" if seed == 1 else "B"})
    write_manifest(root / "manifest.csv", rows)
    return root


@pytest.fixture(scope="module")
def reference(scans, tmp_path_factory) -> Path:
    """An uninterrupted batch over the four scans on two local worker processes (``--workers 2``)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = run_batch(scans / "manifest.csv", out, method="hu", device="cpu", workers=2, endpoints=False)
    assert summary.counts == {"ok": 4, "skipped": 0, "failed": 0}
    assert summary.executor == "2 local worker processes"
    return out


# --------------------------------------------------------------------------------------------------
# Manifest validation (no scans run)


@pytest.mark.parametrize("text, message", [
    ("", "manifest is empty"),
    ("subject_id,timepoint,input\n", "manifest has no rows"),
    ("subject_id,input\nP1,a\n", "lacks column(s) timepoint"),
    ("subject_id,timepoint,input\nP1,baseline,a\nP1,baseline,b\n", "line 3: duplicate subject/time point P1/baseline"),
    ("subject_id,timepoint,input\nP 1,baseline,a\nP_1,baseline,b\n", "same results folder P_1/baseline as line 2"),
    ("subject_id,timepoint,input\n,baseline,a\n", "line 2: empty subject_id"),
    ("subject_id,timepoint,input\n../..,baseline,a\n", "has no letters or digits"),
])
def test_manifest_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_manifest(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["batch", str(path), "--out", str(tmp_path / "out"), "--method", "hu"])
    assert result.exit_code == 3 and message in result.output
    assert not (tmp_path / "out").exists()


def test_manifest_resolves_relative_inputs_and_keeps_extras(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_manifest(tmp_path / "sub" / "m.csv", [
        {"subject_id": "P/1", "timepoint": "day 14", "input": "../scan1", "arm": "A", "series_uid": "1.2.3"},
        {"subject_id": "P2", "timepoint": "baseline", "input": str(tmp_path / "x"), "arm": "B", "series_uid": ""}])
    rows, extras = read_manifest(path)
    assert extras == ["arm"]
    assert rows[0].input == str(tmp_path / "scan1") and rows[1].input == str(tmp_path / "x")
    assert rows[0].key == ("P_1", "day_14") and rows[0].series_uid == "1.2.3" and rows[1].series_uid is None
    assert batch.scan_output_dir(tmp_path / "out", rows[0]) == tmp_path / "out" / "scans" / "P_1" / "day_14"


def test_output_inside_an_input_is_refused(scans, tmp_path):
    result = CliRunner().invoke(app, ["batch", str(scans / "manifest.csv"), "--out",
                                      str(scans / "dicom" / "P1_baseline" / "results"), "--method", "hu"])
    assert result.exit_code == 3 and "inputs are never written to" in result.output
    assert not (scans / "dicom" / "P1_baseline" / "results").exists()


# --------------------------------------------------------------------------------------------------
# Failure isolation


def test_broken_scans_are_recorded_and_the_batch_goes_on(scans, tmp_path):
    import SimpleITK as sitk

    bad = tmp_path / "bad"
    (bad / "garbage").mkdir(parents=True)
    (bad / "garbage" / "IM0001.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (bad / "garbage" / "IM0002").write_bytes(b"\x00" * 300)
    (bad / "notes.txt").write_text("not a scan\n")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 255, (12, 48, 48), np.uint8)),
                    str(bad / "photo.nii.gz"))
    manifest = write_manifest(tmp_path / "m.csv", [
        {"subject_id": "P1", "timepoint": "baseline", "input": str(scans / "dicom" / "P1_baseline"), "site": "Oslo"},
        {"subject_id": "G1", "timepoint": "baseline", "input": "bad/garbage", "site": "Rome"},
        {"subject_id": "M1", "timepoint": "baseline", "input": "bad/does-not-exist", "site": "Rome"},
        {"subject_id": "T1", "timepoint": "baseline", "input": "bad/notes.txt", "site": "Lyon"},
        {"subject_id": "W1", "timepoint": "baseline", "input": "bad/photo.nii.gz", "site": "Lyon"},
        {"subject_id": "E1", "timepoint": "baseline", "input": "", "site": "Lyon"}])
    before = sorted(p.name for p in bad.rglob("*"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), "--method", "hu", "--device", "cpu"])
    assert result.exit_code == 8, result.output
    assert "5 of 6 scan(s) failed" in result.output
    failures = {r["subject_id"]: r for r in read_csv(out / "failures.csv")}
    assert set(failures) == {"G1", "M1", "T1", "W1", "E1"}
    assert failures["G1"]["exit_code"] == "3" and "no DICOM files found" in failures["G1"]["reason"]
    assert failures["M1"]["category"] == "InputError" and "no such file or folder" in failures["M1"]["reason"]
    assert failures["M1"]["manifest_line"] == "4" and "input" not in failures["M1"]  # paths: inputs.csv only
    assert {r["subject_id"]: r["input"] for r in read_csv(out / "inputs.csv")}["M1"] == str(tmp_path / "bad" / "does-not-exist")
    assert "not a DICOM file" in failures["T1"]["reason"]
    assert failures["W1"]["exit_code"] == "5" and failures["W1"]["category"] == "CalibrationError"
    assert "no input given" in failures["E1"]["reason"]
    table = cohort(out)
    assert list(table["status"]) == ["ok", "failed", "failed", "failed", "failed", "failed"]
    assert list(table["site"]) == ["Oslo", "Rome", "Rome", "Lyon", "Lyon", "Lyon"]
    assert table.loc[0, "both_lung_volume_ml"] > 1000 and table.loc[1:, "both_lung_volume_ml"].isna().all()
    good = out / "scans" / "P1" / "baseline"
    assert json.loads((good / "measures.json").read_text())["provenance"]["input_fingerprint"]
    assert json.loads((good / "measures.json").read_text())["provenance"]["input"] == "P1_baseline"  # name, not path
    shown = [p.name for p in out.rglob("*") if p.is_file() and p.suffix in (".csv", ".json", ".html")
             and str(tmp_path / "bad") in p.read_text(errors="replace")]
    assert shown == ["inputs.csv"]  # input paths (identifying) in one documented place
    assert {p.name for p in (out / "scans").iterdir()} == {"P1"}  # failed scans leave no folders
    assert sorted(p.name for p in bad.rglob("*")) == before  # inputs untouched
    assert not (out / ".batch.lock").exists()
    assert json.loads((out / "batch.json").read_text())["counts"] == {"ok": 1, "skipped": 0, "failed": 5}


def test_an_unexpected_exception_is_an_internal_error_record(scans, tmp_path, monkeypatch):
    from ctquant.run import scan as pipeline

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(pipeline, "analyse_scan", boom)
    settings = BatchSettings(method="hu", device="cpu", config_sha256="x")
    task = ScanTask("P1", "baseline", str(scans / "dicom" / "P1_baseline"), str(tmp_path / "o"), settings)
    record = run_one(task)
    assert record.status == "failed" and record.exit_code == 1 and record.category == "InternalError"
    assert record.reason == "internal error (ZeroDivisionError: division by zero)"
    assert "Traceback" in record.traceback and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# Resuming


_STALLING_RUN = textwrap.dedent("""
    import sys, time
    import ctquant.run.scan as pipeline
    from ctquant.cli import main

    real, calls = pipeline.write_label_image, [0]

    def stalling(*args, **kwargs):  # hang while writing the 2nd scan, so the kill lands mid-write
        calls[0] += 1
        real(*args, **kwargs)
        if calls[0] == 3:
            print("STALLED", flush=True)
            time.sleep(300)

    pipeline.write_label_image = stalling
    sys.argv = ["ctquant", "batch", *sys.argv[1:]]
    main()
""")


def test_killed_run_resumes_with_identical_measures(scans, reference, tmp_path):
    out = tmp_path / "out"
    args = [str(scans / "manifest.csv"), "--out", str(out), "--method", "hu", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_RUN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "STALLED" in line or not line:
                break
        assert "STALLED" in seen[-1], "".join(seen)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first, second = out / "scans" / "P1" / "baseline", out / "scans" / "P1" / "day14"
    assert (first / "measures.json").is_file()
    assert not (second / "measures.json").exists()  # the half-written scan does not look complete
    leftovers = list((out / "scans" / "P1").glob(".day14.tmp-*"))
    assert leftovers and (leftovers[0] / "lungs.nii.gz").exists()
    (out / "scans" / "P2" / ".baseline.tmp-stale").mkdir(parents=True)  # another stale temp folder
    (out / "scans" / "P2" / "baseline").mkdir()
    shutil.copy(first / "lungs.nii.gz", out / "scans" / "P2" / "baseline")  # files but no measures.json
    assert (out / ".batch.lock").exists()  # the killed run's lock: its process is gone, so taken over
    mtime = (first / "measures.json").stat().st_mtime_ns

    summary = run_cohort(scans / "manifest.csv", out, method="hu", device="cpu")  # ctquant batch: + endpoints
    assert [r.status for r in summary.records] == ["skipped", "ok", "ok", "ok"]
    assert (first / "measures.json").stat().st_mtime_ns == mtime
    assert not list((out / "scans").glob("*/.*.tmp-*"))
    table, ref = cohort(out), cohort(reference)
    assert list(table["status"]) == ["skipped", "ok", "ok", "ok"]
    assert_same(table[MEASURE_COLUMNS], ref[MEASURE_COLUMNS])
    for sid, tp, _ in SCANS:
        got = json.loads((out / "scans" / sid / tp / "measures.json").read_text())
        want = json.loads((reference / "scans" / sid / tp / "measures.json").read_text())
        assert got["lungs"] == want["lungs"] and got["bilateral"] == want["bilateral"]
    # two time points per subject: the endpoint report is written from the batch's own records
    assert summary.endpoints is not None and (out / "endpoints" / "endpoints.csv").is_file()
    report = out / "endpoints"
    assert sorted(p.name for p in report.iterdir() if not p.name.endswith(".png")) == [
        "endpoints.csv", "endpoints.json", "subjects.csv"]  # nothing re-quantified, no derived manifest
    used = json.loads((report / "endpoints.json").read_text())["provenance"]["scans"]
    assert [(s["subject_id"], s["timepoint"], s["status"]) for s in used] == [
        (r.subject_id, r.timepoint, r.status) for r in summary.records]
    assert all(s["measures"] == str(out.resolve() / "scans" / s["subject_id"] / s["timepoint"] / "measures.json")
               for s in used)
    assert {r["arm"] for r in read_csv(report / "subjects.csv")} == {"A", "B"}  # manifest extras carried
    # a second re-run has nothing to do
    again = run_batch(scans / "manifest.csv", out, method="hu", device="cpu", endpoints=False)
    assert again.counts == {"ok": 0, "skipped": 4, "failed": 0}


def test_config_change_recomputes_and_input_change_is_detected(scans, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)  # results moved elsewhere stay current
    manifest = scans / "manifest.csv"
    assert run_batch(manifest, out, method="hu", device="cpu", endpoints=False).counts["skipped"] == 4

    override = tmp_path / "narrow_ggo.yaml"
    override.write_text("hu_bands:\n  ggo: [-600, -300]\n")
    result = CliRunner().invoke(app, ["batch", str(manifest), "--out", str(out), "--method", "hu",
                                      "--device", "cpu", "--config", str(override), "--no-endpoints"])
    assert result.exit_code == 0, result.output
    table, ref = cohort(out), cohort(reference)
    assert list(table["status"]) == ["ok"] * 4
    assert (table["config_sha256"] != ref["config_sha256"]).all()
    assert (table["both_ggo_volume_ml"] < ref["both_ggo_volume_ml"]).all()
    assert run_batch(manifest, out, method="hu", device="cpu", config_path=override,
                     endpoints=False).counts["skipped"] == 4
    out = tmp_path / "default"
    shutil.copytree(reference, out)  # the default config's results, for the input checks (plan() only)

    # an input whose files change (mtime) is planned again; a copy with the same files is not
    copy = tmp_path / "copy"
    shutil.copytree(scans / "dicom" / "P2_day14", copy)
    m2 = write_manifest(tmp_path / "m2.csv", [{"subject_id": "P2", "timepoint": "day14", "input": str(copy)}])
    rows, _ = read_manifest(m2)
    settings = make_settings("hu", "cpu")
    todo, skipped = plan(rows, out, settings)
    assert not todo and len(skipped) == 1
    before = input_fingerprint(copy)
    victim = sorted(copy.iterdir())[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 1_000_000_000))
    assert input_fingerprint(copy) != before
    todo, skipped = plan(rows, out, settings)
    assert len(todo) == 1 and not skipped
    assert not (out / "scans" / "P2" / "day14" / "measures.json").exists()  # outdated result invalidated
    # a manifest series_uid must match the series the result was made from
    uid = json.loads((out / "scans" / "P1" / "baseline" / "measures.json").read_text())["provenance"]["series_instance_uid"]
    for series, want in ((uid, True), ("1.2.3.4", False)):
        m4 = write_manifest(tmp_path / "m4.csv", [{"subject_id": "P1", "timepoint": "baseline", "series_uid": series,
                                                   "input": str(scans / "dicom" / "P1_baseline")}])
        current, why = batch.result_is_current(out / "scans" / "P1" / "baseline", settings,
                                               input_fingerprint(scans / "dicom" / "P1_baseline"), ("P1", "baseline"),
                                               read_manifest(m4)[0][0].series_uid)
        assert current is want and why == ("" if want else "series changed")
    # a missing input (an unmounted share?) fails that scan but does not throw its old result away
    gone = write_manifest(tmp_path / "m3.csv", [{"subject_id": "P1", "timepoint": "day14", "input": "nowhere"}])
    todo, skipped = plan(read_manifest(gone)[0], out, settings)
    assert len(todo) == 1 and todo[0].fingerprint is None
    assert (out / "scans" / "P1" / "day14" / "measures.json").is_file()
    # results made by other ctquant code (same version number, another checkout) are not current
    target = out / "scans" / "P1" / "baseline"
    assert batch.result_is_current(target, settings, input_fingerprint(scans / "dicom" / "P1_baseline"),
                                   ("P1", "baseline")) == (True, "")
    measures = json.loads((target / "measures.json").read_text())
    assert measures["provenance"]["code_sha256"] == settings.code_sha256 != ""
    measures["provenance"]["code_sha256"] = "0" * 16
    (target / "measures.json").write_text(json.dumps(measures))
    assert batch.result_is_current(target, settings, input_fingerprint(scans / "dicom" / "P1_baseline"),
                                   ("P1", "baseline")) == (False, "ctquant code changed")
    # asking for DICOM SEG too: results without segmentation.dcm are not current
    todo, skipped = plan(read_manifest(manifest)[0], out, make_settings("hu", "cpu", seg_format="both"))
    assert len(todo) == 4 and not skipped


def test_endpoint_report_uses_the_batch_records_and_reasons(scans, reference, tmp_path):
    rows, _ = read_manifest(scans / "manifest.csv")
    _, current = plan(rows, reference, make_settings("hu", "cpu"))
    records = {r.key: r for r in current}
    records[("P2", "day14")] = batch.ScanRecord("P2", "day14", rows[3].input, str(tmp_path / "nowhere"), "failed",
                                                exit_code=3, category="InputError", reason="no DICOM files found")
    doc = ENDPOINT_STEP.report(scans / "manifest.csv", records, tmp_path, None, None)
    assert (tmp_path / "endpoints" / "endpoints.csv").is_file() and not (tmp_path / "scans").exists()
    assert [(f["subject_id"], f["category"], f["reason"]) for f in doc["failures"]] == [
        ("P2", "InputError", "no DICOM files found")]
    for summary in doc["endpoints"]:
        assert summary["n_subjects"] == 2
        assert {"subject_id": "P2", "reason": "day14 scan failed: no DICOM files found"} in summary["not_evaluable"]


def test_one_batch_per_output_folder(scans, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".batch.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    result = CliRunner().invoke(app, ["batch", str(scans / "manifest.csv"), "--out", str(out), "--method", "hu"])
    assert result.exit_code == 7 and "another ctquant batch is writing to this folder" in result.output
    assert not (out / "scans").exists()


# --------------------------------------------------------------------------------------------------
# Parallel: local processes and Dask give the same table


def test_dask_cluster_gives_the_same_cohort_table_as_local_workers(scans, reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(processes=False, protocol="tcp", n_workers=2, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        on_dask = CliRunner().invoke(app, ["batch", str(scans / "manifest.csv"), "--out", str(tmp_path / "dask"),
                                           "--scheduler", cluster.scheduler_address, "--method", "hu",
                                           "--device", "cpu", "--no-endpoints"])
    assert on_dask.exit_code == 0, on_dask.output
    assert "Dask scheduler tcp://" in on_dask.output and "[4/4]" in on_dask.output
    local, dask = cohort(reference), cohort(tmp_path / "dask")  # reference: --workers 2
    assert json.loads((reference / "batch.json").read_text())["executor"] == "2 local worker processes"
    assert list(dask["status"]) == list(local["status"]) == ["ok"] * 4
    columns = [c for c in local.columns if c not in ("output_dir", "seconds")]
    assert set(MEASURE_COLUMNS) <= set(columns) and "arm" in columns
    assert_same(dask[columns], local[columns])


def _dies_for_kill(task: ScanTask) -> batch.ScanRecord:
    """A stand-in task function (runs in pool workers): the process dies on subject KILL."""
    time.sleep(0.2)
    if task.subject_id == "KILL":
        os._exit(9)
    return batch.ScanRecord(task.subject_id, task.timepoint, task.input, task.output_dir, "ok", seconds=0.0)


def test_a_dying_worker_process_fails_only_its_scan(tmp_path):
    settings = BatchSettings(method="hu", device="cpu", config_sha256="x")
    names = ("A", "B", "KILL", "C", "D", "E")
    tasks = [ScanTask(sid, "baseline", "in", str(tmp_path / sid), settings) for sid in names]
    records = {r.subject_id: r for r in batch.ProcessExecutor(2, task_fn=_dies_for_kill).run(tasks)}
    assert sorted(records) == sorted(names)  # each scan reported once
    assert [records[s].status for s in names if s != "KILL"] == ["ok"] * 5  # innocent neighbours survive
    assert records["KILL"].status == "failed" and records["KILL"].category == "WorkerLost"
    assert "worker process died" in records["KILL"].reason


def test_dask_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(InputError, match=r"pip install 'ctquant\[dask\]'"):
        batch.DaskExecutor("tcp://127.0.0.1:1")


def test_progress_plain_lines(capsys):
    progress = batch.make_progress(sys.stderr)  # not a terminal under pytest
    assert isinstance(progress, batch.PlainProgress)
    progress.start(2, 1, "in-process")
    progress.advance(batch.ScanRecord("P1", "baseline", "x", "o", "ok", seconds=1.5))
    progress.advance(batch.ScanRecord("P2", "baseline", "y", "o", "failed", exit_code=3, category="InputError",
                                      reason="no such file or folder"))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ctquant batch: 2 scan(s) to quantify, 1 current")
    assert "[1/2] P1/baseline ok 1.5 s" in err[1] and "eta" in err[1]
    assert "[2/2] P2/baseline FAILED (exit 3, InputError): no such file or folder" in err[2]


def test_code_hash_follows_the_package_files(tmp_path, monkeypatch):
    """Results name the code that made them: the hash changes with any package file's content."""
    import shutil

    from ctquant import config

    package = tmp_path / "ctquant"
    shutil.copytree(config.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(config, "PACKAGE_DIR", package)
    config.code_sha256.cache_clear()
    try:
        first = config.code_sha256()
        config.code_sha256.cache_clear()
        assert config.code_sha256() == first  # stable
        lungs = package / "segment" / "lungs.py"
        lungs.write_text(lungs.read_text() + "\n# edited\n")
        config.code_sha256.cache_clear()
        assert config.code_sha256() != first
    finally:
        config.code_sha256.cache_clear()


# --------------------------------------------------------------------------------------------------
# Real-world process handling: a cwd holding a "ctquant" folder, Ctrl-C


_SITECUSTOMIZE = textwrap.dedent('''
    """Test harness, imported by every Python process started with this folder on PYTHONPATH.

    1. ctquant is found as an editable install finds it (setuptools' finder, consulted after the
       path finder), not from PYTHONPATH, so a folder named "ctquant" in the cwd can shadow it.
    2. With CTQUANT_TEST_STALL_DIR set, writing the labels of subject P2 stalls (each stalled
       process leaves a file named after its pid there), so an interrupt lands mid-scan.
    """
    import importlib.machinery, importlib.util, os, sys, time

    PKG = os.environ["CTQUANT_TEST_PACKAGE"]

    class EditableFinder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "ctquant":
                return importlib.util.spec_from_file_location(name, os.path.join(PKG, "__init__.py"),
                                                              submodule_search_locations=[PKG])
            return None

    at = next(i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder)
    sys.meta_path.insert(at + 1, EditableFinder)

    def install_stall(pipeline, where):
        real = pipeline.write_label_image

        def stalling(scan, labels, path):
            real(scan, labels, path)
            if os.sep + "P2" + os.sep in str(path):
                open(os.path.join(where, str(os.getpid())), "w").close()
                time.sleep(300)

        pipeline.write_label_image = stalling

    class PatchPipeline:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            where = os.environ.get("CTQUANT_TEST_STALL_DIR")
            if name != "ctquant.run.scan" or not where:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path, target)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                install_stall(module, where)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, PatchPipeline)
''')


def _harness(tmp_path: Path, stall: Path | None = None) -> tuple[Path, dict[str, str], Path]:
    """A folder with the harness and a CLI runner script, the environment to use it, and a work
    folder (the cwd) that holds an empty folder named ``ctquant``, as the parent of a clone does."""
    import ctquant

    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    (harness / "run_ctquant.py").write_text(  # as the console script: workers import it, hence the guard
        "from ctquant.cli import main\nif __name__ == \"__main__\":\n    main()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CTQUANT_TEST_STALL_DIR")}
    env.update(PYTHONPATH=str(harness), CTQUANT_TEST_PACKAGE=str(Path(ctquant.__file__).resolve().parent))
    if stall is not None:
        env["CTQUANT_TEST_STALL_DIR"] = str(stall)
    work = tmp_path / "work"
    (work / "ctquant").mkdir(parents=True)
    return harness / "run_ctquant.py", env, work


def test_two_workers_run_from_a_folder_that_holds_a_ctquant_folder(scans, reference, tmp_path):
    runner, env, work = _harness(tmp_path)
    manifest = write_manifest(work / "m.csv", [
        {"subject_id": "P1", "timepoint": tp, "input": str(scans / "dicom" / f"P1_{tp}")} for tp in ("baseline", "day14")])
    proc = subprocess.run([sys.executable, str(runner), "batch", "m.csv", "--out", "out", "--workers", "2",
                           "--method", "hu", "--device", "cpu", "--no-endpoints"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cannot import name" not in proc.stderr and "2 quantified, 0 skipped (current), 0 failed" in proc.stderr
    table, ref = cohort(work / "out"), cohort(reference)
    assert list(table["status"]) == ["ok", "ok"]
    assert_same(table[MEASURE_COLUMNS], ref[MEASURE_COLUMNS].iloc[:2])


def _session_processes(sid: int) -> list[int]:
    import psutil

    alive = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except (OSError, psutil.Error):
            pass
    return alive


def test_ctrl_c_stops_a_parallel_batch_at_once_and_cleanly(scans, reference, tmp_path):
    """Three real SIGINTs to the process group (what Ctrl-C does in a terminal) while two workers are
    mid-scan: one line, exit 130, no process left, nothing half-written, and a re-run resumes."""
    stall = tmp_path / "stalled"
    stall.mkdir()
    runner, env, work = _harness(tmp_path, stall)
    out = work / "out"
    proc = subprocess.Popen([sys.executable, str(runner), "batch", str(scans / "manifest.csv"), "--out", str(out),
                             "--workers", "2", "--method", "hu", "--device", "cpu", "--no-endpoints"],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(stall.iterdir())) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(list(stall.iterdir())) == 2, "two P2 scans should be stalled in two workers"
        before = _session_processes(proc.pid)
        assert len(before) >= 4  # ctquant, forkserver, two workers (and the resource tracker)
        t0 = time.monotonic()
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.3)
        rc = proc.wait(timeout=60)
        seconds = time.monotonic() - t0
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130, output
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    lines = output.strip().splitlines()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert [line for line in lines if not line.startswith("ctquant batch: ")] == [lines[-1]], output
    assert lines[-1] == (f"ctquant: error: {out}: interrupted: 2 of 4 scan(s) finished, the others cancelled; "
                         "run the same command again to resume")
    deadline = time.monotonic() + 10
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == [], "processes left behind"
    for tp in ("baseline", "day14"):
        assert (out / "scans" / "P1" / tp / "measures.json").is_file()
    assert not (out / "scans" / "P2").exists() or not any((out / "scans" / "P2").iterdir())
    assert not (out / ".batch.lock").exists() and not list(out.rglob(".*tmp*"))
    again = run_batch(scans / "manifest.csv", out, method="hu", device="cpu", endpoints=False)
    assert [r.status for r in again.records] == ["skipped", "skipped", "ok", "ok"]
    assert_same(cohort(out)[MEASURE_COLUMNS], cohort(reference)[MEASURE_COLUMNS])


_MMAPPED_BLOCKS_AFTER_FREE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        from ctquant.run.batch import reuse_freed_memory
        assert reuse_freed_memory()
    mapped = []
    for _ in range(3):  # 48 MB buffers, allocated and freed as the pipeline's temporaries are
        buffer = np.ones(48 << 20, dtype=np.uint8)
        mapped.append(libc.mallinfo2().hblks)
        del buffer
    print(libc.mallinfo2().hblks, max(mapped), libc.mallinfo2().fordblks >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_reuse_freed_memory_keeps_large_buffers_in_the_heap():
    """glibc maps every 48 MB buffer (above its 32 MB dynamic limit) and unmaps it on free; after
    reuse_freed_memory the buffers come from the heap and the freed memory stays there for the next."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no glibc >= 2.33 mallinfo2 to observe the heap")
    runs = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", _MMAPPED_BLOCKS_AFTER_FREE, mode], capture_output=True,
                             text=True, check=True)
        runs[mode] = [int(v) for v in out.stdout.split()]
    default_mapped_now, default_mapped_peak, default_free_mb = runs["default"]
    tuned_mapped_now, tuned_mapped_peak, tuned_free_mb = runs["tuned"]
    assert default_mapped_peak == default_mapped_now + 1  # each buffer its own mapping, gone on free
    assert default_free_mb < 48
    assert tuned_mapped_peak == tuned_mapped_now  # no new mapping: from the heap
    assert tuned_free_mb >= 48  # and kept there, free, for the next buffer


def test_each_model_is_loaded_once_per_process_and_kept_apart(monkeypatch):
    from ctquant.segment import lesion_model, lung_model

    loads = []
    monkeypatch.setattr(batch, "_MODELS", {})
    for module, name in ((lung_model, "load_lung_model"), (lesion_model, "load_lesion_model")):
        monkeypatch.setattr(module, name, lambda path=None, device="cpu", _n=name: loads.append(_n) or object())
    lung = batch.cached_model(None, "cpu", "lung")
    lesion = batch.cached_model("models/lesion_model.pt", "cpu")
    assert batch.cached_model(None, "cpu", "lung") is lung
    assert batch.cached_model("models/lesion_model.pt", "cpu") is lesion is not lung
    assert loads == ["load_lung_model", "load_lesion_model"]
