"""The Python API: the README example runs, Result.save writes what the CLI writes, and every CLI
command goes through the API function of its name."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ctquant
from ctquant.cli import app
from ctquant.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_dicom"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its API example"
    return match.group(1)


def comparable(measures: dict) -> dict:
    doc = json.loads(json.dumps(measures))
    for key in ("created_utc",):
        doc["provenance"].pop(key)
    return doc


@pytest.mark.slow
def test_readme_example_runs_and_saves_what_the_cli_writes(tmp_path, monkeypatch):
    (tmp_path / "sample_dicom").symlink_to(SAMPLE)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), {})
    assert re.search(r"opacity \d+\.\d % of lung", printed.getvalue())
    ours = tmp_path / "results" / "S1" / "baseline"

    cli_out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["quantify", str(SAMPLE / "baseline"), "--out", str(cli_out), "--method", "hu",
                                      "--subject", "S1", "--seg-format", "both"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in cli_out.iterdir())
    api_doc = json.loads((ours / "measures.json").read_text())
    cli_doc = json.loads((cli_out / "measures.json").read_text())
    assert comparable(api_doc) == comparable(cli_doc)
    assert (ours / "measures.csv").read_text() == (cli_out / "measures.csv").read_text()
    assert api_doc["lungs"]["both"]["lung_volume_ml"] > 1000  # a chest, measured


def test_api_is_lazy_and_documented():
    assert {"load_scan", "segment_lungs", "segment_lesions", "measure", "quantify", "Result", "run_cohort",
            "run_endpoints", "run_compare", "run_mask_agreement", "run_table_agreement",
            "write_cohort_report"} <= set(ctquant.__all__)
    for name in ctquant.__all__[1:]:
        assert getattr(ctquant, name).__doc__, name
    with pytest.raises(AttributeError):
        ctquant.no_such_function  # noqa: B018


@pytest.mark.parametrize("command,api", [
    (["quantify", "x", "--out", "o"], "quantify"),
    (["batch", "m.csv", "--out", "o"], "run_cohort"),
    (["endpoints", "m.csv", "--out", "o"], "run_endpoints"),
    (["compare", "a", "b", "--out", "o"], "run_compare"),
    (["agree", "a", "b", "--out", "o"], "run_mask_agreement"),
    (["agree", "--table", "t.csv", "--out", "o"], "run_table_agreement"),
    (["report", "r"], "write_cohort_report"),
])
def test_every_command_calls_its_api_function(monkeypatch, tmp_path, command, api):
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise InputError("stopped by the test", "spy")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ctquant, api, spy)
    result = CliRunner().invoke(app, command)
    assert len(calls) == 1, result.output
    assert result.exit_code == InputError.exit_code and "spy: stopped by the test" in result.output
