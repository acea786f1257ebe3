#!/usr/bin/env python
"""Throughput of ``ctquant batch``: scans per minute for 1 and 2 local workers (and CUDA if present).

Writes a cohort of synthetic phantoms (``ctquant.synthetic.phantom``) as DICOM series, then times
``run_batch`` (``force=True``, no endpoint report) for each worker count and device, from the start
of the batch to the last result: worker start-up and model loading are included, as a user sees them.
Prints a table and writes JSON.

    python scripts/benchmark_batch.py --n-scans 6 --workers 1 2 --method hu
    python scripts/benchmark_batch.py --method model --devices cpu cuda     # needs models/lesion_model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_cohort(root: Path, n_scans: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """``n_scans`` phantom DICOM series (subjects with baseline/day14) and their manifest."""
    from ctquant.synthetic.phantom import make_phantom, uid_from, write_dicom_series

    lines = ["subject_id,timepoint,input"]
    for i in range(n_scans):
        sid, tp = f"B{i // 2 + 1:03d}", ("baseline", "day14")[i % 2]
        folder = root / "dicom" / f"{sid}_{tp}"
        if not folder.is_dir():
            ph = make_phantom(shape, spacing, timepoint=tp, severity=1.0 + (i // 2) % 3 * 0.5, seed=i // 2)
            write_dicom_series(ph, folder, study_uid=uid_from(sid, tp), series_uid=uid_from(sid, tp, "s"),
                               frame_of_reference_uid=uid_from(sid, "f"), study_date="20200401",
                               series_description="benchmark", series_number=1, patient_id=sid,
                               patient_name=f"Bench^{sid}", seed=i)
        lines.append(f"{sid},{tp},dicom/{sid}_{tp}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def machine() -> dict:
    import psutil
    import torch

    from ctquant.run.batch import available_cpus

    info = {"python": platform.python_version(), "cpus_available": available_cpus(),
            "cpu_model": platform.processor() or platform.machine(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def run_once(manifest: Path, out: Path, *, workers: int, device: str, method: str) -> dict:
    from ctquant.run.batch import run_batch

    t0 = time.perf_counter()
    summary = run_batch(manifest, out, method=method, device=device, workers=workers, force=True, endpoints=False)
    wall = time.perf_counter() - t0
    per_scan = [r.seconds for r in summary.records if r.status == "ok" and r.seconds is not None]
    n = len(summary.records)
    return {"device": device, "workers": workers, "method": method, "scans": n, "failed": len(summary.failed),
            "wall_s": round(wall, 2), "scans_per_min": round(60 * n / wall, 2),
            "median_scan_s": round(statistics.median(per_scan), 2) if per_scan else None,
            "executor": summary.executor}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-scans", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(54, 192, 192), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(5.0, 1.8, 1.8), metavar=("DZ", "DY", "DX"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="hu", choices=("hu", "model"))
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, plus cuda when a GPU is usable and --method model")
    parser.add_argument("--workdir", type=Path, default=None, help="cohort and results (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="default: WORKDIR/benchmark_batch.json")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() and args.method == "model" else []))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ctquant-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    t0 = time.perf_counter()
    manifest = write_cohort(workdir, args.n_scans, tuple(args.shape), tuple(args.spacing))
    gen_s = time.perf_counter() - t0
    runs = []
    for device in devices:
        for workers in args.workers:
            result = run_once(manifest, workdir / f"out_{device}_{workers}w", workers=workers, device=device,
                              method=args.method)
            runs.append(result)
            print(f"{device} {workers} worker(s): {result['scans_per_min']} scans/min", file=sys.stderr)
    table = Table(title=f"ctquant batch: {args.n_scans} scans of {tuple(args.shape)} voxels, --method {args.method}")
    for col in ("device", "workers", "scans", "failed", "wall s", "scans/min", "median s/scan"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["device"], str(r["workers"]), str(r["scans"]), str(r["failed"]), f"{r['wall_s']:.1f}",
                      f"{r['scans_per_min']:.2f}", f"{r['median_scan_s']}")
    Console().print(table)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "shape_zyx": list(args.shape), "spacing_mm": list(args.spacing), "n_scans": args.n_scans,
           "phantom_generation_s": round(gen_s, 1), "machine": info, "runs": runs}
    out_json = args.json or workdir / "benchmark_batch.json"
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"JSON: {out_json}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
