"""Item 1 of issue 16: a wheel carries the shipped configs and model weights.

The test builds the wheel from a copy of the source, installs it (not editable) into a fresh virtual
environment that sees the already installed dependencies through a ``.pth`` path (no download), and
runs ``ctquant quantify`` on the sample from an unrelated working directory without ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd[:4]} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_quantifies_outside_the_source_tree(tmp_path: Path, sample_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("ctquant", "configs", "models"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
         src, env)
    (wheel,) = wheels.glob("ctquant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ctquant/configs/quantify.yaml", "ctquant/configs/endpoints.yaml", "ctquant/models/lesion_model.pt"):
        assert name in names, f"{name} missing from the wheel"
    assert not any(n.startswith(("configs/", "models/")) for n in names), "data outside the package"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    # The dependencies of this interpreter, without its (editable) ctquant: a path line in a .pth file
    # adds the folder to sys.path but runs none of the .pth hooks inside it.
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import ctquant.config as c; print(c.CONFIG_DIR); print(c.MODEL_DIR)"],
                 elsewhere, env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    out = tmp_path / "res"
    _run([str(venv / "bin" / "ctquant"), "quantify", str(sample_dir / "baseline"), "--out", str(out)], elsewhere, env)
    measures = json.loads((out / "measures.json").read_text())
    assert measures["method"] == "model"
    assert measures["provenance"]["model_file"] == "lesion_model.pt"
    assert measures["lungs"]["both"]["lung_volume_ml"] > 1000
