"""Columns of the tables ctquant writes and its reports read back.

``subjects.csv`` of the endpoint report (:mod:`ctquant.trial.endpoints` writes it, the cohort HTML
report of :mod:`ctquant.outputs.reports` shows it): one row per participant and endpoint.
"""

from __future__ import annotations

#: The lungs every measure is given for.
LUNGS = ("right", "left", "both")

SUBJECT_COLUMNS = (
    ["subject_id", "endpoint", "measure", "from_timepoint", "to_timepoint", "evaluable", "reduction",
     "verdict", "reason", "bilateral_at_baseline"]
    + [f"{lung}_{k}" for lung in LUNGS for k in ("from", "to", "abs_change", "rel_change_pct")]
    + ["days_between", "mismatch", "acquisition_differs", "from_flags", "to_flags", "from_result", "to_result"]
)
