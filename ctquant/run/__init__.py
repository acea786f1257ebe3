"""Running the pipeline.

In: a scan path (:mod:`.scan`: load, segment, measure, write one results folder; the functions
behind ``ctquant quantify`` and the Python API) or a manifest CSV of subjects, time points and scans
(:mod:`.batch`: resumable, parallel in processes or on Dask, failures isolated). Out: one results
folder per scan, plus ``cohort.csv``, ``failures.csv``, ``inputs.csv`` and ``batch.json`` for a batch.
"""
