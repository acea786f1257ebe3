#!/usr/bin/env python3
"""Benchmark the whole pipeline, stage by stage, against the straightforward pipeline.

For each case (the shipped sample; a generated 300-slice 512x512 phantom series; the real JPEG-lossless
COVID-19 series of ``../shared/data/real-ct`` (``ricord``); the real slices in
``../shared/data``) it times: find/parse the series, decode to HU, lungs, lesion inference,
quantification and writing, and reports the peak resident memory of a fresh process per case.
In the same run it times SimpleITK's series reader (the decoding reference) and the pipeline a user
would write with the same libraries: a pydicom loop over the files and MONAI sliding-window inference
at full resolution over every slice of the volume. Prints a table and writes JSON.

    python scripts/benchmark.py --json bench.json                 # CPU, all cases
    python scripts/benchmark.py --cases sample --device cuda      # GPU when available
    python scripts/benchmark.py --cases phantom300 ricord --repeat 3 --no-naive   # medians of 3 runs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BENCH_DIR = REPO / ".bench"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_large_phantom(shape: tuple[int, int, int] = (300, 512, 512),
                       spacing: tuple[float, float, float] = (1.0, 0.7, 0.7)) -> Path:
    """Write (once) a generated phantom DICOM series for the benchmark under ``.bench/``."""
    from ctquant.synthetic.phantom import make_phantom, uid_from, write_dicom_series

    folder = BENCH_DIR / f"phantom_{'x'.join(map(str, shape))}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(shape, spacing, severity=1.0, seed=7)
    write_dicom_series(phantom, folder, study_uid=uid_from("bench", "study"), series_uid=uid_from("bench", "series"),
                       frame_of_reference_uid=uid_from("bench", "for"), study_date="20200406",
                       series_description="benchmark phantom", series_number=2,
                       patient_id="BENCH", patient_name="Bench^Phantom")
    (folder / ".complete").write_text("ok\n")
    return folder


def _warm_up_decoders() -> None:
    """Import pydicom's pixel back-ends once, as a long-running process would have (not timed)."""
    import pydicom.pixels  # noqa: F401
    from pydicom.pixels import get_decoder
    from pydicom.uid import ExplicitVRLittleEndian

    get_decoder(ExplicitVRLittleEndian).is_available


def run_ctquant(path: str, method: str, device: str) -> dict[str, Any]:
    """ctquant's own pipeline, stage by stage (run in a fresh process)."""
    from ctquant.io.scans import find_series, load_dicom_series
    from ctquant.config import resolve_device
    from ctquant.run.batch import reuse_freed_memory
    from ctquant.run.scan import analyse_scan, write_results

    reuse_freed_memory()  # as `ctquant quantify` and batch workers do
    device = resolve_device(device)
    _warm_up_decoders()
    from ctquant.segment.lung_model import load_lung_model

    lung_model = load_lung_model(device=device)  # loaded once per process, as batch workers do (not timed)
    model = None
    if method == "model":
        from ctquant.segment.lesion_model import load_lesion_model

        model = load_lesion_model(device=device)
    t = {}
    t0 = time.perf_counter()
    find_series(path)
    t["find_series"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan = load_dicom_series(path)
    t["decode_hu"] = time.perf_counter() - t0 - t["find_series"]  # load repeats the folder walk
    seg = analyse_scan(scan, method=method, device=device, model=model, lung_model=lung_model)
    t.update(seg.timings_s)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_results(seg, Path(tmp) / "out", report=False)
        t["write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_results(seg, Path(tmp) / "out", report=True)
        t["qc_report"] = time.perf_counter() - t0 - t["write"]  # qc.png + report.html on top of the files
    t["total"] = sum(t.values())
    return {"stages_s": {k: round(v, 3) for k, v in t.items()}, "shape": list(scan.hu.shape),
            "opacity_pct": seg.measures["lungs"]["both"]["opacity_pct"], "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_sitk_reader(path: str) -> dict[str, Any]:
    """SimpleITK's series reader: the reference for decoding speed."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(path)
    reader.SetFileNames(files)
    image = reader.Execute()
    seconds = time.perf_counter() - t0
    return {"stages_s": {"sitk_read": round(seconds, 3)}, "shape": list(image.GetSize())[::-1],
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_naive(path: str, device: str) -> dict[str, Any]:
    """The straightforward pipeline: pydicom loop, full-resolution sliding window on every slice."""
    import pydicom
    import torch
    from monai.inferers import sliding_window_inference

    from ctquant.segment.lesion_model import hu_to_unit, load_lesion_model
    from ctquant.segment.lungs import segment_lungs
    from ctquant.config import resolve_device
    from ctquant.measures.volumes import lung_measures

    device = resolve_device(device)
    model = load_lesion_model(device=device)
    t = {}
    t0 = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in sorted(Path(path).rglob("*"))
                if p.is_file() and not p.name.startswith(".")]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    spacing = (float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2]),
               *[float(v) for v in datasets[0].PixelSpacing])
    t["read_decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lungs = segment_lungs(hu, spacing)
    t["lungs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = np.zeros(hu.shape, dtype=np.uint8)
    with torch.inference_mode():
        for z in range(hu.shape[0]):
            x = torch.from_numpy(hu_to_unit(hu[z]))[None, None].to(model.device)
            logits = sliding_window_inference(x, model.input_size, 4, model.network, overlap=0.25)
            labels[z] = logits.argmax(1)[0].cpu().numpy()
    labels[lungs == 0] = 0
    t["lesions"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    measures = lung_measures(hu, lungs, labels, spacing)
    t["quantify"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return {"stages_s": {k: round(v, 3) for k, v in t.items()}, "shape": list(hu.shape),
            "opacity_pct": measures["both"]["opacity_pct"], "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_real_slices(device: str) -> dict[str, Any]:
    """Lesion inference on the real 8-bit slices of ../shared/data/medseg-2d (ms per slice)."""
    from PIL import Image

    from ctquant.segment.lesion_model import image8_to_unit, load_lesion_model, predict_slices
    from ctquant.config import resolve_device

    model = load_lesion_model(device=resolve_device(device))
    images = sorted((SHARED_DATA / "medseg-2d" / "images").glob("*.jpg"))
    slices = [image8_to_unit(np.asarray(Image.open(p).convert("L"))) for p in images]
    t0 = time.perf_counter()
    for unit in slices:
        predict_slices(model, unit[None])
    seconds = time.perf_counter() - t0
    return {"stages_s": {"lesions": round(seconds, 3), "ms_per_slice": round(1000 * seconds / len(slices), 1)},
            "shape": [len(slices)], "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _child(queue: mp.Queue, func: str, args: tuple) -> None:
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        queue.put(globals()[func](*args))
    except Exception as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def in_fresh_process(func: str, *args: Any) -> dict[str, Any]:
    """Run ``func(*args)`` in a new process so that its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, func, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def repeated(runs: int, func: str, *args: Any) -> dict[str, Any]:
    """``func(*args)`` in ``runs`` fresh processes: each stage's median (``stages_s``; ``total`` is the median
    of the totals), every run's figures (``runs_s``) and the largest peak memory. On a shared 2-core
    machine one run can be 20 % off."""
    results = [in_fresh_process(func, *args) for _ in range(max(1, runs))]
    ok = [r for r in results if "stages_s" in r]
    if len(ok) < 2:
        return (ok or results)[0]
    out = dict(ok[0])
    out["stages_s"] = {k: round(float(np.median([r["stages_s"][k] for r in ok])), 3) for k in ok[0]["stages_s"]}
    out["runs_s"] = [r["stages_s"] for r in ok]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["statistic"] = f"median of {len(ok)} runs"
    return out


def machine() -> dict[str, Any]:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["sample", "phantom300", "real"],
                        choices=["sample", "phantom300", "ricord", "real"],
                        help="ricord: the real JPEG-lossless COVID-19 chest CT of ../shared/data/real-ct (255 slices)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh-process runs per case; stages are medians")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--method", default="model", choices=["model", "hu"])
    parser.add_argument("--no-naive", action="store_true", help="skip the straightforward-pipeline comparison")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"machine": machine(), "device": args.device, "method": args.method, "cases": {}}
    for case in args.cases:
        if case == "real":
            if not SHARED_DATA.is_dir():
                print("real: ../shared/data absent, skipped")
                continue
            results["cases"]["real medseg-2d slices"] = {"ctquant": in_fresh_process("run_real_slices", args.device)}
            continue
        if case == "ricord":
            path = str(SHARED_DATA / "real-ct" / "ricord-1a-000082")
            if not Path(path).is_dir():
                print("ricord: ../shared/data/real-ct/ricord-1a-000082 absent, skipped")
                continue
        else:
            path = str(REPO / "sample_dicom" / "baseline") if case == "sample" else str(make_large_phantom())
        entry = {"ctquant": repeated(args.repeat, "run_ctquant", path, args.method, args.device),
                 "simpleitk_reader": repeated(args.repeat, "run_sitk_reader", path)}
        if not args.no_naive and args.method == "model":
            entry["naive"] = in_fresh_process("run_naive", path, args.device)
        ours = entry["ctquant"].get("stages_s", {})
        if "naive" in entry and "total" in entry["naive"].get("stages_s", {}) and "total" in ours:
            entry["speedup_vs_naive"] = round(entry["naive"]["stages_s"]["total"] / ours["total"], 2)
        if "sitk_read" in entry["simpleitk_reader"].get("stages_s", {}) and "decode_hu" in ours:
            entry["decode_vs_simpleitk"] = round(
                (ours["decode_hu"] + ours["find_series"]) / entry["simpleitk_reader"]["stages_s"]["sitk_read"], 2)
        results["cases"][case] = entry

    print(f"machine: {results['machine']}")
    for case, entry in results["cases"].items():
        print(f"\n== {case}")
        for name, run in entry.items():
            if isinstance(run, dict):
                stages = ", ".join(f"{k} {v}" for k, v in run.get("stages_s", {}).items())
                print(f"  {name:17s} {stages or run.get('error')}  | peak RSS {run.get('peak_rss_mb', '-')} MB")
            else:
                print(f"  {name:17s} {run}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
