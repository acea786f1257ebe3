"""ctquant: chest CT quantification of COVID-19 pneumonia for trial endpoints.

The package is laid out in the order data flows; a module imports only from its own stage and the
stages before it (``tests/test_layout.py`` enforces it)::

    errors, version     the error types and exit codes; the version
    config              settings files, hashes for provenance, the device resolver
    io/                 DICOM series and volume files in, label images out        -> Scan
    segment/            lungs, HU-band lesions, the lesion network, grid helpers  -> label images
    measures/           volumes and fractions per lung, Dice                      -> measures dict
    outputs/            the atomic writer, QC picture, HTML, DICOM SEG and SR     -> files
    run/                one scan end to end, a batch of scans (processes, Dask)   -> results folders
    trial/              endpoints, reader agreement and their statistics          -> cohort tables
    synthetic/          the phantom and pneumonia painted into real CT (tests, benchmarks)
    ctquant (this file) the Python API below
    cli                 the ``ctquant`` command: a thin layer over the API

The Python API (for notebooks; imported on first use, so ``import ctquant`` stays fast)::

    import ctquant
    scan = ctquant.load_scan("sample_dicom/baseline")
    lungs = ctquant.segment_lungs(scan)
    lesions = ctquant.segment_lesions(scan, lungs, method="hu")
    numbers = ctquant.measure(scan, lungs, lesions)
    result = ctquant.quantify("sample_dicom/baseline", method="hu")   # all of the above + provenance
    result.save("out/baseline")                                        # what `ctquant quantify` writes

Cohorts: :func:`run_cohort` (``ctquant batch``), :func:`run_endpoints` (``ctquant endpoints``),
:func:`run_compare` (``ctquant compare``), :func:`run_mask_agreement` / :func:`run_table_agreement`
(``ctquant agree``), :func:`write_cohort_report` (``ctquant report``). A script that quantifies many
scans in one process can call :func:`reuse_freed_memory` once first, as the commands do (faster lesion
network; README "Performance").
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

#: API name -> the module that defines it (imported on first use).
_API = {
    "load_scan": "ctquant.io.scans",
    "Scan": "ctquant.io.scans",
    "segment_lungs": "ctquant.run.scan",
    "segment_lesions": "ctquant.run.scan",
    "measure": "ctquant.run.scan",
    "quantify": "ctquant.run.scan",
    "Result": "ctquant.run.scan",
    "run_cohort": "ctquant.trial.endpoints",
    "run_endpoints": "ctquant.trial.endpoints",
    "cohort_table": "ctquant.trial.endpoints",
    "run_compare": "ctquant.trial.endpoints",
    "comparison_table": "ctquant.trial.endpoints",
    "run_mask_agreement": "ctquant.trial.agreement",
    "run_table_agreement": "ctquant.trial.agreement",
    "write_cohort_report": "ctquant.outputs.reports",
    "reuse_freed_memory": "ctquant.run.batch",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ctquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
