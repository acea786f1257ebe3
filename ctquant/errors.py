"""Errors with documented exit codes.

Every error a user can cause by bad input is a :class:`CtquantError`; the CLI prints its one-line
message (``ctquant: error: <path>: <reason>``) and exits with its ``exit_code``. Anything else is a bug
and exits with 1 (a traceback only with ``--debug``).

=====  ==========================================================================
code   meaning
=====  ==========================================================================
0      success, every output written
1      internal error (a bug): please report it with ``--debug`` output
2      usage error (bad option or argument; raised by the CLI parser)
3      input error: unreadable, not DICOM/NIfTI, no usable CT series, bad header
4      geometry error: missing or duplicate slices, gantry tilt, mixed sizes, ...
5      calibration error: the image is not in Hounsfield units
6      model error: weight file missing, corrupt or incompatible
7      output error: the output folder cannot be written
8      batch finished, but some scans failed (see failures.csv)
9      incompatible results: compared results were made with different models/configs
130    interrupted (Ctrl-C / SIGINT): finished scans are kept, a re-run resumes
=====  ==========================================================================
"""

from __future__ import annotations

from pathlib import Path


class CtquantError(Exception):
    """Base class of errors caused by input or environment; ``exit_code`` is the process exit status."""

    exit_code = 1

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class InputError(CtquantError):
    """Unreadable or unsuitable input (not DICOM, wrong modality, broken header, no CT series)."""

    exit_code = 3


class GeometryError(InputError):
    """Slices that do not form a regular volume (gaps, duplicates, tilt, mixed sizes/orientations)."""

    exit_code = 4


class CalibrationError(InputError):
    """Pixel values are not Hounsfield units (no rescale, windowed export, air far from -1000 HU)."""

    exit_code = 5


class ModelError(CtquantError):
    """Model weights missing, corrupt or incompatible with the code."""

    exit_code = 6


class OutputError(CtquantError):
    """Outputs cannot be written where asked."""

    exit_code = 7


class BatchFailures(CtquantError):
    """A batch completed but some scans failed."""

    exit_code = 8


class IncompatibleResults(CtquantError):
    """Results made with different methods, models or configs were asked to be compared."""

    exit_code = 9


class Interrupted(CtquantError):
    """Stopped by Ctrl-C (SIGINT): queued work cancelled, running work stopped, nothing half-written."""

    exit_code = 130
