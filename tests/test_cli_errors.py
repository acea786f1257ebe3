"""The CLI's error contract: documented exit codes, one line ``ctquant: error: <path>: <reason>``.

The bad-input corpus itself runs in ``test_robustness.py``; this module checks the contract's edges:
entry points, usage errors, internal errors, messages built from header text or odd file names,
output errors, and no traceback unless ``--debug``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import bad_inputs as bi  # noqa: E402
from ctquant import errors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    assert lines[0].startswith("ctquant: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_python_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ctquant.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("quantify", "series", "compare", "endpoints"):
        assert command in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ctquant.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ctquant ")


def test_exit_codes_are_documented():
    doc = errors.__doc__
    for cls in (errors.InputError, errors.GeometryError, errors.CalibrationError, errors.ModelError,
                errors.OutputError, errors.BatchFailures, errors.IncompatibleResults):
        assert f"\n{cls.exit_code}  " in doc, cls
    assert issubclass(errors.GeometryError, errors.InputError)
    assert issubclass(errors.CalibrationError, errors.InputError)


def test_usage_error_exits_2(tmp_path: Path):
    code, _, stderr = bi.run_in_process(["quantify", str(tmp_path)])  # no --out
    assert code == 2 and "--out" in stderr


def test_bad_device_is_refused_before_loading(tmp_path: Path):
    code, _, stderr = bi.run_in_process(["quantify", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                                         "--device", "tpu"])
    assert code == 3
    assert "unknown device 'tpu'" in one_line(stderr)


def test_header_text_with_newlines_stays_on_one_line(tmp_path: Path):
    paths = bi.write_series(tmp_path / "study", series_description="Thorax\nFAKE: second line\r\x1b[31m")
    for path in paths:
        bi.edit(path, lambda ds: (setattr(ds, "Modality", "MR"), setattr(ds, "SOPClassUID", bi.MR_IMAGE_STORAGE)))
    code, _, stderr = bi.run_in_process(["quantify", str(tmp_path / "study"), "--out", str(tmp_path / "out"),
                                         "--method", "hu", "--device", "cpu"])
    assert code == 3
    line = one_line(stderr)
    assert "Thorax\\nFAKE: second line\\r\\x1b[31m" in line and "modality MR is not CT" in line


def test_odd_file_names_stay_on_one_line(tmp_path: Path):
    missing = tmp_path / "stu\ndy"
    code, _, stderr = bi.run_in_process(["quantify", str(missing), "--out", str(tmp_path / "out"), "--method", "hu",
                                         "--device", "cpu"])
    assert code == 3
    assert one_line(stderr) == f"ctquant: error: {tmp_path}/stu\\ndy: no such file or folder"


def test_series_command_on_bad_input(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = bi.run_in_process(["series", str(tmp_path / "empty")])
    assert code == 3 and one_line(stderr) == f"ctquant: error: {tmp_path / 'empty'}: folder is empty"


def test_internal_error_is_one_line_unless_debug(tmp_path: Path, monkeypatch):
    import ctquant.run.scan

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(ctquant.run.scan, "load_scan", broken)
    args = ["quantify", str(tmp_path), "--out", str(tmp_path / "out"), "--method", "hu", "--device", "cpu"]
    code, _, stderr = bi.run_in_process(args)
    assert code == 1
    assert "internal error (RuntimeError: boom); rerun with --debug" in one_line(stderr)
    code, _, stderr = bi.run_in_process(["--debug", *args])
    assert code == 1 and "Traceback (most recent call last)" in stderr and "second line" in stderr


def test_output_error_when_out_is_a_file(tmp_path: Path):
    """A good scan, but --out names a file: exit 7, the file untouched, no temporary folder left."""
    bi.write_series(tmp_path / "study")
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    code, _, stderr = bi.run_in_process(["quantify", str(tmp_path / "study"), "--out", str(out), "--method", "hu",
                                         "--device", "cpu"])
    assert code == 7, stderr
    assert one_line(stderr) == f"ctquant: error: {out}: exists and is not a folder"
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "study"]
