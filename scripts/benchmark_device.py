#!/usr/bin/env python3
"""Lesion-model stage and whole analysis on the CPU and on a CUDA GPU, on in-memory phantoms.

No DICOM reading or writing: this isolates what the device changes. For each phantom shape it
reports, per device, the seconds of the lesion stage (the network on every lung slice, median of
``--repeats`` runs after one warm-up), the stage timings of ``analyse_scan`` end to end, the peak
GPU memory, and how far the GPU's labels (float16 autocast) differ from the CPU's (share of lung
voxels labelled alike, GGO and consolidation volume differences in %).

Examples::

    python scripts/benchmark_device.py --json device_bench.json
    python scripts/benchmark_device.py --shapes 54x192x192 300x512x512 --devices cpu cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctquant.segment.lesion_model import CONSOLIDATION, GGO, load_lesion_model, segment_lesions
from ctquant.segment.lungs import segment_lungs
from ctquant.synthetic.phantom import SAMPLE_SPACING_MM, make_phantom
from ctquant.config import resolve_device
from ctquant.run.scan import analyse_scan

#: Spacing (z, y, x) mm per phantom shape: the sample's, else a thin-slice 512² scan's.
LARGE_SPACING_MM = (1.0, 0.7, 0.7)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lesion_stage(hu: np.ndarray, lungs: np.ndarray, device: str, repeats: int) -> tuple[np.ndarray, dict]:
    """Labels and timings of the lesion network on one volume on ``device``."""
    model = load_lesion_model(device=device)
    labels = segment_lesions(hu, lungs, model)  # warm-up (cuDNN autotuning, allocator)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        labels = segment_lesions(hu, lungs, model)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    n_slices = int(np.count_nonzero(lungs.any(axis=(1, 2))))
    info = {"lesion_stage_s": round(statistics.median(seconds), 4), "lung_slices": n_slices,
            "ms_per_slice": round(1000 * statistics.median(seconds) / max(1, n_slices), 3)}
    if device == "cuda":
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return labels, info


def compare_labels(reference: np.ndarray, other: np.ndarray, lungs: np.ndarray) -> dict:
    """How far ``other`` lies from ``reference`` inside the lungs."""
    inside = lungs > 0
    out = {"same_label_pct": round(100.0 * float(np.mean(reference[inside] == other[inside])), 4)}
    for name, value in (("ggo", GGO), ("consolidation", CONSOLIDATION)):
        ref_n, oth_n = int(np.count_nonzero(reference == value)), int(np.count_nonzero(other == value))
        out[f"{name}_volume_diff_pct"] = round(100.0 * (oth_n - ref_n) / max(1, ref_n), 3)
    return out


def run_shape(shape: tuple[int, int, int], devices: list[str], repeats: int) -> dict:
    spacing = SAMPLE_SPACING_MM if shape[1] <= 256 else LARGE_SPACING_MM
    t0 = time.perf_counter()
    phantom = make_phantom(shape, spacing, severity=1.0, seed=7)
    row: dict = {"shape_zyx": list(shape), "spacing_mm": list(spacing),
                 "phantom_s": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    lungs = segment_lungs(phantom.hu, phantom.spacing_mm)
    row["lungs_s"] = round(time.perf_counter() - t0, 3)
    labels_by_device = {}
    for device in devices:
        labels, info = lesion_stage(phantom.hu, lungs, device, repeats)
        labels_by_device[device] = labels
        segmentation = analyse_scan(phantom.to_scan(), method="model", device=device,
                                    model=load_lesion_model(device=device))
        info["analyse_scan_s"] = {k: round(v, 3) for k, v in segmentation.timings_s.items()}
        info["analyse_scan_total_s"] = round(sum(segmentation.timings_s.values()), 3)
        row[device] = info
    if "cpu" in labels_by_device:
        for device, labels in labels_by_device.items():
            if device != "cpu":
                row[f"{device}_vs_cpu"] = compare_labels(labels_by_device["cpu"], labels, lungs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["54x192x192", "300x512x512"],
                        help="phantom shapes ZxYxX (192² and smaller use the sample's spacing)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "auto"], help="cpu, cuda or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    devices = list(dict.fromkeys(resolve_device(d) for d in args.devices))
    result = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "machine": platform.node(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": []}
    for text in args.shapes:
        shape = tuple(int(n) for n in text.lower().split("x"))
        if len(shape) != 3:
            parser.error(f"shape {text!r} is not ZxYxX")
        row = run_shape(shape, devices, args.repeats)  # type: ignore[arg-type]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
