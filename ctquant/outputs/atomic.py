"""The one way ctquant writes outputs: nothing half-written is ever left under its final name.

:func:`atomic_output_dir` stages a whole folder of outputs (a scan's results, an agreement or endpoint
report) in a temporary folder beside it and moves the files in only on success;
:func:`atomic_write_text` is the same for one text file (cohort tables, ``batch.json``, HTML reports).
Temporary names start with a dot and hold ``.tmp`` (``.NAME.tmp-XXXXXXXX``, ``.NAME.XXXXXXXX.tmp``), so
readers and the batch runner's clean-up can tell them apart.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import OutputError


@contextmanager
def atomic_output_dir(out_dir: str | Path, *, last: str | None = None,
                      stale: Callable[[Path], Iterable[str]] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; on success move its files into ``out_dir``.

    A new ``out_dir`` appears by one rename; in an existing one each file is replaced by a rename,
    ``last`` (e.g. ``measures.json``, whose presence marks a complete result) removed first and moved
    last. ``stale(out_dir)``: names of files of an older run, removed once the new files are in unless
    this run wrote them again. On any error the temporary folder is removed and ``out_dir`` is left
    as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", out_dir) from None
    try:
        yield tmp
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return
        old = set(stale(out_dir)) if stale else set()
        names = sorted(p.name for p in tmp.iterdir())
        if last:
            names.sort(key=lambda n: n == last)
            (out_dir / last).unlink(missing_ok=True)  # an older result must not look complete midway
        for name in sorted(old - set(names)):
            (out_dir / name).unlink(missing_ok=True)
        for name in names:
            os.replace(tmp / name, out_dir / name)
    except OSError as exc:
        raise OutputError(f"cannot write results: {exc.strerror or exc}", out_dir) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str, *, what: str = "cannot write") -> Path:
    """Write ``text`` (UTF-8) through a temporary file beside ``path``, then rename it into place.

    ``what`` starts the error message (``cannot write the report``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{what}: {exc.strerror or exc}", path) from None
    return path
