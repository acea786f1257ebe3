"""Robustness of the ingest and of `ctquant quantify` against bad input (issue "Robustness").

Every case of the generated corpus (:mod:`bad_inputs`) must give its documented exit code and one
line ``ctquant: error: <path>: <reason>`` naming the offending file, without a traceback, partial
output or a change to the input. A seeded mutation fuzzer checks that DICOM ingest either loads or
raises a :class:`ctquant.errors.CtquantError`. Calibration (``check_hounsfield``) and the quality
flags that keep numbers from being silently wrong are tested on the phantom.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import bad_inputs as bi  # noqa: E402
from ctquant.io import scans as ctio  # noqa: E402
from ctquant.synthetic import phantom as ph  # noqa: E402
from ctquant.errors import CalibrationError, CtquantError, InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd values the cases write


def snapshot(path: Path) -> dict[str, tuple]:
    """Every file and folder under ``path`` with its size, mtime and content hash."""
    if not path.exists():
        return {}
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    out = {}
    for entry in entries:
        try:
            info = entry.lstat()
        except OSError:
            continue
        digest = ""
        if entry.is_file():
            try:
                digest = hashlib.sha256(entry.read_bytes()).hexdigest()
            except PermissionError:
                digest = "unreadable"
        out[str(entry.relative_to(path))] = (info.st_size if entry.is_file() else 0, info.st_mtime_ns, digest)
    return out


def assert_error_contract(code: int, stderr: str, case: bi.Case, culprit: Path, out: Path, workdir: Path) -> None:
    lines = stderr.splitlines()
    assert code == case.exit_code, f"{case.name}: exit {code}, stderr {stderr!r}"
    assert len(lines) == 1, f"{case.name}: expected one line on stderr, got {stderr!r}"
    assert lines[0].startswith(f"ctquant: error: {culprit}: "), f"{case.name}: {lines[0]!r} does not name {culprit}"
    assert case.reason in lines[0], f"{case.name}: {case.reason!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr
    assert not out.exists() or not any(out.iterdir()), f"{case.name}: partial output in {out}"
    leftovers = [p.name for p in workdir.iterdir() if p.name not in ("case", "out")]
    assert not leftovers, f"{case.name}: left beside --out: {leftovers}"


# --------------------------------------------------------------------------------------------------
# The corpus through the CLI
# --------------------------------------------------------------------------------------------------


def test_corpus_is_large_and_documented():
    assert len(bi.CASES) >= 30
    assert len({c.name for c in bi.CASES}) == len(bi.CASES)
    assert {c.exit_code for c in bi.CASES} == {3, 4, 5}


@pytest.mark.parametrize("case", bi.CASES, ids=lambda c: c.name)
def test_bad_input(case: bi.Case, tmp_path: Path):
    """In process (typer's CliRunner): exit code, one-line message naming the file, nothing written."""
    skipped = case.skip_reason()
    if skipped:
        pytest.skip(skipped)
    root = tmp_path / "case"
    root.mkdir()
    input_path, culprit = case.build(root)
    before = snapshot(root)
    out = tmp_path / "out"
    code, stdout, stderr = bi.run_in_process(bi.quantify_args(input_path, out, case))
    assert_error_contract(code, stderr, case, culprit, out, tmp_path)
    assert snapshot(root) == before, "the input was changed"
    assert not out.exists()


SUBPROCESS_CASES = ["path_missing", "nifti_broken_header", "garbage_pixel_spacing", "corrupt_rle"]


def _cli(*args: str, console_script: bool = False, cwd: Path | None = None) -> tuple[int, str, str]:
    import subprocess

    script = Path(sys.executable).with_name("ctquant")
    command = [str(script)] if console_script and script.exists() else [sys.executable, "-m", "ctquant.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # library warnings must not leak even when enabled
    proc = subprocess.run(command + list(args), capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(name: str, tmp_path: Path):
    """A real process: exit status and exactly one line on stderr (no warnings from pydicom or ITK)."""
    case = next(c for c in bi.CASES if c.name == name)
    root = tmp_path / "case"
    root.mkdir()
    input_path, culprit = case.build(root)
    before = snapshot(root)
    out = tmp_path / "out"
    code, _, stderr = _cli(*bi.quantify_args(input_path, out, case), console_script=name == "path_missing",
                           cwd=tmp_path)
    assert_error_contract(code, stderr, case, culprit, out, tmp_path)
    assert snapshot(root) == before


def test_debug_shows_the_traceback(tmp_path: Path):
    case = next(c for c in bi.CASES if c.name == "missing_slice")
    root = tmp_path / "case"
    root.mkdir()
    input_path, culprit = case.build(root)
    code, _, stderr = _cli("--debug", *bi.quantify_args(input_path, tmp_path / "out", case))
    assert code == 4
    assert "Traceback (most recent call last)" in stderr and "GeometryError" in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"ctquant: error: {culprit}: missing slice(s)")


def test_permission_denied_simulated(tmp_path: Path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop reading: simulate the PermissionError."""
    paths = bi.write_series(tmp_path / "study")
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if Path(file) == paths[3]:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(ctio, "open", guarded_open, raising=False)
    code, _, stderr = bi.run_in_process(["quantify", str(tmp_path / "study"), "--out", str(tmp_path / "out"),
                                         "--method", "hu", "--device", "cpu"])
    assert code == 3
    assert stderr.strip() == f"ctquant: error: {paths[3]}: permission denied"
    monkeypatch.undo()

    def walk_denied(top, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(Path(top) / "locked")))
        return iter(())

    monkeypatch.setattr(ctio.os, "walk", walk_denied)
    with pytest.raises(InputError, match="permission denied") as info:
        ctio.find_series(tmp_path / "study")
    assert info.value.path == str(tmp_path / "study" / "locked")


def test_huge_declared_sizes_are_refused_before_allocating(tmp_path: Path):
    """Headers declaring 10 GB (one file) or 4.8 GB (a series) fail with little memory used."""
    for name in ("huge_declared_file", "huge_declared_series", "matrix_too_large"):
        case = next(c for c in bi.CASES if c.name == name)
        root = tmp_path / name
        root.mkdir()
        input_path, culprit = case.build(root)
        tracemalloc.start()
        try:
            with pytest.raises(InputError) as info:
                ctio.load_scan(input_path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert case.reason in info.value.reason
        assert info.value.path == str(culprit)
        assert peak < 64 * 1024**2, f"{name}: peak {peak / 1e6:.0f} MB"


def test_total_declared_size_limit(tmp_path: Path, monkeypatch):
    paths = bi.write_series(tmp_path / "study")
    monkeypatch.setattr(ctio, "MAX_VOLUME_BYTES", 64 * 64 * 2 * 10)  # 10 slices' worth
    with pytest.raises(InputError, match="more than the") as info:
        ctio.load_scan(tmp_path / "study")
    assert info.value.path == str(tmp_path / "study")
    assert len(paths) == 12


# --------------------------------------------------------------------------------------------------
# Output paths never come from header text; nothing is written outside --out
# --------------------------------------------------------------------------------------------------


def test_outputs_stay_inside_out(tmp_path: Path):
    """`--subject ../../evil` and headers full of path characters cannot write outside --out."""
    work = tmp_path / "work"
    work.mkdir()
    study = work / "study"
    bi.write_series(study, series_description="../../../evil/desc", patient_id="../../evil-pid",
                    patient_name="../../evil^name")
    before = snapshot(tmp_path)
    out = work / "results" / "out"
    code, stdout, stderr = bi.run_in_process(["quantify", str(study), "--out", str(out), "--method", "hu",
                                              "--device", "cpu", "--subject", "../../evil",
                                              "--timepoint", "../day14/../x"])
    assert code == 0, stderr
    after = snapshot(tmp_path)
    created = sorted(set(after) - set(before))
    base = str(out.relative_to(tmp_path))
    outside = [p for p in created if not (p == base or p.startswith(base + "/") or base.startswith(p + "/"))]
    assert not outside, f"written outside --out: {outside}"
    assert {p.name for p in out.iterdir()} >= {"measures.json", "measures.csv", "lungs.nii.gz", "lesions.nii.gz"}
    assert not list(out.parent.glob(".*tmp*")), "temporary folder left"
    measures = json.loads((out / "measures.json").read_text())
    for key in ("subject_id", "timepoint"):
        value = measures[key]
        assert "/" not in value and "\\" not in value and not value.startswith(".")  # one safe path component
    assert not (tmp_path / "evil").exists() and not (work / "evil").exists()
    text = (out / "measures.json").read_text() + (out / "measures.csv").read_text() + stdout + stderr
    assert bi.PATIENT_ID not in text and "evil-pid" not in text and "evil^name" not in text


# --------------------------------------------------------------------------------------------------
# Fuzzing the DICOM ingest
# --------------------------------------------------------------------------------------------------

_FUZZ_TAGS = ["Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope",
              "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
              "SamplesPerPixel", "PhotometricInterpretation", "SeriesInstanceUID", "SOPClassUID", "Modality",
              "SliceThickness", "SeriesNumber", "ImageType", "PixelData", "StudyDate", "SeriesDescription",
              "InstanceNumber", "SpecificCharacterSet", "ConvolutionKernel"]
_FUZZ_NUMBERS = [b"0", b"-1", b"65535", b"1e308", b"-1e308", b"nan", b"inf", b"-0", b"1\\2\\3", b"", b"\\",
                 b"abc", b"\x00\x00", b"99999999999999999999", b"0.000001", b"1e-300"]


def _value_span(path: Path, keyword: str) -> tuple[int, int, int] | None:
    """(value offset, value length, header length) of an element as stored in a file."""
    ds = pydicom.dcmread(path, force=True)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    raw = ds.get_item(tag)
    offset = getattr(raw, "value_tell", None)
    if offset is None:
        return None
    vr = getattr(raw, "VR", None)
    header = 12 if vr in ("OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV") else 8
    return offset, raw.length, header


def _mutate(path: Path, rng: np.random.Generator) -> str:
    """Apply one random mutation to a DICOM file; returns a description.

    A mutation that pydicom cannot apply (the file was already mangled by an earlier one) is skipped.
    """
    try:
        return _mutate_once(path, rng)
    except Exception as exc:  # noqa: BLE001 - the harness, not ctquant, failed
        return f"mutation not applied ({type(exc).__name__})"


def _mutate_once(path: Path, rng: np.random.Generator) -> str:
    op = rng.choice(["delete", "value", "number", "length", "flip", "truncate"], p=[.2, .2, .2, .15, .15, .1])
    keyword = str(rng.choice(_FUZZ_TAGS))
    data = bytearray(path.read_bytes())
    if op == "delete":
        ds = pydicom.dcmread(path, force=True)
        if keyword in ds:
            delattr(ds, keyword)
        ds.save_as(path)
        return f"delete {keyword}"
    if op == "flip":
        limit = len(data) if rng.random() < 0.3 else min(len(data), 1200)
        for position in rng.integers(0, limit, int(rng.integers(1, 9))):
            data[position] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        return "flip bytes"
    if op == "truncate":
        cut = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncate at {cut}"
    span = _value_span(path, keyword)
    if span is None:
        return f"{op} {keyword} (absent)"
    offset, length, header = span
    if op == "value":  # random bytes in the value, same length
        data[offset:offset + length] = rng.bytes(length)
    elif op == "number":  # a numeric string of another length: the element length changes too
        ds = pydicom.dcmread(path, force=True)
        text = bytes(rng.choice(_FUZZ_NUMBERS))
        tag = pydicom.datadict.tag_for_keyword(keyword)
        vr = ds.get_item(tag).VR
        if vr in ("US", "SS", "UL", "SL"):
            size = {"US": 2, "SS": 2, "UL": 4, "SL": 4}[vr]
            value = int(rng.choice([0, 1, 2**(8 * size) - 1, 2**(8 * size - 1), 3, 7, 13, 4097]))
            data[offset:offset + length] = (value % 2**(8 * size)).to_bytes(size, "little") * max(1, length // size)
        else:
            text = text + b" " * (len(text) % 2)
            data[offset - 2:offset] = len(text).to_bytes(2, "little")
            data[offset:offset + length] = text
    else:  # corrupt the declared value length (a wrong VR length)
        field = offset - 2 if header == 8 else offset - 4
        width = 2 if header == 8 else 4
        new = int(rng.choice([0, 1, 3, 2**(8 * width) - 1, length + 2, max(0, length - 2), 2**(8 * width) - 2]))
        data[field:field + width] = new.to_bytes(width, "little")
    path.write_bytes(bytes(data))
    return f"{op} {keyword}"


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fuzz-base")
    bi.write_series(base / "study")
    return base / "study"


FUZZ_CASES = int(os.environ.get("CTQUANT_FUZZ_CASES", "200"))
FUZZ_SEED = int(os.environ.get("CTQUANT_FUZZ_SEED", "20240401"))


def test_fuzz_dicom_ingest(fuzz_base: Path, tmp_path: Path):
    """Seeded mutations of a small series: loading succeeds or raises a CtquantError, nothing else."""
    rng = np.random.default_rng(FUZZ_SEED)
    outcomes: dict[str, int] = {}
    crashes = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(FUZZ_CASES):
            folder = tmp_path / f"c{index}"
            shutil.copytree(fuzz_base, folder)
            files = sorted(folder.iterdir())
            done = []
            for _ in range(int(rng.integers(1, 4))):
                target = files[int(rng.integers(0, len(files)))]
                if target.exists():
                    done.append(f"{target.name}: {_mutate(target, rng)}")
            try:
                scan = ctio.load_scan(folder)
                assert scan.hu.dtype == np.int16 and scan.hu.ndim == 3
                assert all(np.isfinite(scan.spacing_mm)) and min(scan.spacing_mm) > 0
                outcomes["loaded"] = outcomes.get("loaded", 0) + 1
            except CtquantError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                assert exc.path and "\n" not in exc.reason
            except Exception as exc:  # noqa: BLE001 - what the fuzzer hunts
                crashes.append(f"case {index} ({'; '.join(done)}): {type(exc).__name__}: {exc}")
            shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.perf_counter() - start
    print(f"fuzz: {FUZZ_CASES} cases in {elapsed:.1f} s: {outcomes}")
    assert not crashes, "\n".join(crashes[:10])
    assert sum(outcomes.values()) == FUZZ_CASES
    assert len(outcomes) >= 3, outcomes  # the mutations do reach several kinds of error


def test_fuzz_nifti_header(tmp_path: Path):
    """Seeded corruption of a NIfTI header (dims, datatype, offsets, transforms): load or CtquantError."""
    good = bytearray(bi.phantom_volume(tmp_path / "good.nii").read_bytes())
    fields = [0, 1, 2, 3, *range(40, 80), *range(108, 112), *range(252, 256), *range(280, 348)]
    rng = np.random.default_rng(FUZZ_SEED)
    outcomes: dict[str, int] = {}
    crashes = []
    for index in range(FUZZ_CASES // 2):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 5))):
            position = int(rng.choice(fields)) if rng.random() < 0.8 else int(rng.integers(0, 352))
            data[position] = int(rng.integers(0, 256)) if rng.random() < 0.5 else data[position] ^ 1 << int(rng.integers(0, 8))
        path = tmp_path / f"case{index}.nii"
        path.write_bytes(bytes(data))
        try:
            scan = ctio.load_volume_file(path)
            assert scan.hu.ndim == 3 and min(scan.spacing_mm) > 0
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except CtquantError as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        except Exception as exc:  # noqa: BLE001 - what the fuzzer hunts
            crashes.append(f"case {index}: {type(exc).__name__}: {exc}")
        path.unlink()
    print(f"nifti fuzz: {FUZZ_CASES // 2} cases: {outcomes}")
    assert not crashes, "\n".join(crashes[:10])
    assert outcomes.get("InputError", 0) > 0


# --------------------------------------------------------------------------------------------------
# Calibration: the image itself must be in HU
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hu_volume() -> np.ndarray:
    return bi.tiny_phantom().hu


def _outside_circle(hu: np.ndarray, value: int) -> np.ndarray:
    out = hu.copy()
    n = out.shape[1]
    yy, xx = np.mgrid[:n, :out.shape[2]]
    out[:, (yy - n / 2 + 0.5) ** 2 + (xx - out.shape[2] / 2 + 0.5) ** 2 > (n / 2) ** 2] = value
    return out


@pytest.mark.parametrize("padding", [-2000, -2048, -3024, -32768])
def test_hounsfield_accepts_fov_padding(hu_volume, padding):
    padded = _outside_circle(hu_volume, padding)
    assert (padded == padding).mean() > 0.15
    ctio.check_hounsfield(padded)
    assert -1100 <= ctio.estimate_air_hu(padded) <= -950


def test_hounsfield_accepts_fov_without_outside_air():
    """A field of view inside the body: only trachea and lung air are left."""
    big = ph.make_phantom((40, 144, 144), (7.0, 2.4, 2.4), seed=3)
    inside = big.hu[:, 36:108, 16:128]  # y ±86 mm, x ±134 mm of a 230 × 320 mm body: no outside air
    body_air = (inside < -990).mean()
    assert body_air < 0.05
    ctio.check_hounsfield(inside)
    ctio.check_hounsfield(_outside_circle(big.hu[:, 20:124, 20:124], -2048))
    noisy = inside + np.random.default_rng(0).normal(0, 40, inside.shape).astype(np.int16)
    ctio.check_hounsfield(noisy)


@pytest.mark.parametrize("name,transform,hint", [
    ("raw stored values", lambda hu: hu + 1024, "RescaleIntercept missing"),
    ("8-bit window", lambda hu: np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.int16), "8-bit windowed"),
    ("air at -500", lambda hu: hu + 500, "not Hounsfield units"),
    ("rescaled twice", lambda hu: hu - 1024, "not Hounsfield units"),
    ("rescaled twice, padded", lambda hu: _outside_circle(hu - 1024, -3024), "not Hounsfield units"),
    ("all padding", lambda hu: np.full_like(hu, -3024), "padding"),
])
def test_hounsfield_refuses(hu_volume, name, transform, hint):
    with pytest.raises(CalibrationError, match=hint) as info:
        ctio.check_hounsfield(transform(hu_volume), "scan.nii.gz")
    assert info.value.exit_code == 5 and info.value.path == "scan.nii.gz"


def test_noisy_air_is_still_air(hu_volume):
    noisy = hu_volume + np.random.default_rng(1).normal(0, 60, hu_volume.shape).astype(np.int16)
    ctio.check_hounsfield(noisy)


# --------------------------------------------------------------------------------------------------
# Numbers never silently wrong: quality flags in measures.json
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_lung_phantom() -> ph.Phantom:
    """A phantom whose grid holds both lungs whole (32 slices of 10 mm)."""
    return ph.make_phantom((32, 80, 80), (10.0, 4.4, 4.4), seed=1)


def _quantify_flags(tmp_path: Path, phantom: ph.Phantom, drop_top: int = 0) -> list[str]:
    study = tmp_path / "study"
    paths = bi.write_series(study, phantom)
    for path in paths[len(paths) - drop_top:]:
        path.unlink()
    out = tmp_path / "out"
    code, _, stderr = bi.run_in_process(["quantify", str(study), "--out", str(out), "--method", "hu",
                                         "--device", "cpu"])
    assert code == 0, stderr
    return json.loads((out / "measures.json").read_text())["flags"]


def test_quality_flags(full_lung_phantom: ph.Phantom, tmp_path: Path):
    assert _quantify_flags(tmp_path / "full", full_lung_phantom) == []
    cut = _quantify_flags(tmp_path / "cut", full_lung_phantom, drop_top=14)  # stops at mid-lung
    assert any(f.startswith("right_lung_cut_by_field_of_view: z") for f in cut), cut
    assert any(f.startswith("left_lung_cut_by_field_of_view: z") for f in cut), cut
    child = dataclasses.replace(full_lung_phantom, spacing_mm=tuple(s / 2.2 for s in full_lung_phantom.spacing_mm))
    tiny = _quantify_flags(tmp_path / "tiny", child)  # a tenth of the lung volume
    assert any(f.startswith("implausible_lung_volume") for f in tiny), tiny
