#!/usr/bin/env python
"""Train the dense-lung network of :mod:`ctquant.segment.lung_model` on real CT with pneumonia painted in.

Data: every scan of ``configs/real_ct_references.json`` (``../shared/data/real-ct``), as it is and with
pneumonia painted in (:func:`ctquant.synthetic.hybrid.paint_pneumonia`: moderate and severe, seeds
``TRAIN_SEEDS``, dependent side behind and, for two cases, in front), each run through the classical
lung step exactly as the product runs it; the input is what :func:`ctquant.segment.lung_model.network_input`
gives, the target the scan's reference lungs on the same grid. The seeds differ from the one
``scripts/evaluate_lungs.py --real`` paints with (1).

    python scripts/train_lung_model.py                      # models/lung_model.pt (all scans) and one
                                                            # model per held-out scan (models/lung_model_folds/)
    python scripts/train_lung_model.py --holdout lung-pet-ct-dx-A0001 --out /tmp/m.pt --steps 300

Each model records the scans it was trained on; ``evaluate_lungs.py --real`` scores every scan with the
fold model that never saw it. About 5 minutes per model (1500 steps) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from real_ct import case_name, load_reference_scan, lung_fold_model_path, reference_entries  # noqa: E402

SHARED_REAL_CT = REPO_ROOT.parent / "shared" / "data" / "real-ct"
TRAIN_SEEDS = (11, 12, 13)
ARCHITECTURE = {"name": "UNet", "kwargs": {"spatial_dims": 2, "in_channels": 4, "out_channels": 1,
                                           "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                                           "num_res_units": 1}}
#: Extra weight of the pixels where the classical mask and the reference disagree (what there is to learn).
DISAGREEMENT_WEIGHT = 4.0


def scan_examples(scan: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (n, 4, px, px) float16 and targets (n, px, px) uint8 of one registry scan and its hybrids."""
    from ctquant.segment.lung_model import lung_grid, network_input
    from ctquant.segment.lungs import segment_lungs
    from ctquant.synthetic.hybrid import paint_pneumonia

    hu, spacing_mm, ref = load_reference_scan(root, scan)
    variants = [(None, "posterior", 0)] + [(severity, "posterior", seed) for seed in TRAIN_SEEDS
                                           for severity in ("moderate", "severe")]
    variants += [("moderate", "anterior", TRAIN_SEEDS[0]), ("severe", "anterior", TRAIN_SEEDS[1])]
    inputs, targets = [], []
    for severity, dependent, seed in variants:
        case_hu = (paint_pneumonia(hu, ref, spacing_mm, severity=severity, seed=seed, dependent=dependent).hu
                   if severity else hu)
        classical = segment_lungs(case_hu, spacing_mm, dependent=dependent)
        grid = lung_grid(classical, spacing_mm)
        if grid is None:
            continue
        x, _, _ = network_input(case_hu, classical, grid)
        inputs.append(x.numpy().astype(np.float16))
        targets.append((grid.sample((ref > 0).view(np.uint8), grid.z, "nearest").numpy() > 0.5).astype(np.uint8))
        print(f"  {case_name(scan)} {severity or 'clean'} {dependent} seed {seed}: {len(x)} slices", flush=True)
    return np.concatenate(inputs), np.concatenate(targets)


def augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (±11°), scale (±15 %), left-right flip, shift and CT level offset of a batch."""
    n = x.shape[0]
    angle = torch.tensor(rng.uniform(-0.2, 0.2, n), dtype=torch.float32)
    scale = torch.tensor(rng.uniform(0.85, 1.15, n), dtype=torch.float32)
    flip = torch.tensor(rng.choice([-1.0, 1.0], n), dtype=torch.float32)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) * scale * flip
    theta[:, 0, 1] = -torch.sin(angle) * scale
    theta[:, 1, 0] = torch.sin(angle) * scale * flip
    theta[:, 1, 1] = torch.cos(angle) * scale
    theta[:, :, 2] = torch.tensor(rng.uniform(-0.08, 0.08, (n, 2)), dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x[:, 3:] = (x[:, 3:] > 0.5).float()
    x[:, :3] += torch.tensor(rng.normal(0.0, 0.015, (n, 1, 1, 1)), dtype=torch.float32)
    return x, y


def train(inputs: np.ndarray, targets: np.ndarray, steps: int, seed: int, batch_size: int = 16) -> torch.nn.Module:
    """A fresh network trained on (inputs, targets) for ``steps`` (AdamW, one-cycle; weighted BCE + soft Dice)."""
    from ctquant.segment.lesion_model import build_network

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    useful = np.flatnonzero(targets.reshape(len(targets), -1).any(axis=1) | (inputs[:, 3] > 0.5).reshape(len(inputs), -1).any(axis=1))
    network = build_network(ARCHITECTURE)
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    network.train()
    start = time.time()
    for step in range(steps):
        index = rng.choice(useful, batch_size)
        x = torch.from_numpy(inputs[index].astype(np.float32))
        y = torch.from_numpy(targets[index][:, None].astype(np.float32))
        x, y = augment(x, y, rng)
        logits = network(x)
        weight = 1.0 + DISAGREEMENT_WEIGHT * (y != x[:, 3:]).float()
        bce = F.binary_cross_entropy_with_logits(logits, y, weight=weight)
        p = torch.sigmoid(logits)
        dice = 1.0 - (2.0 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
        loss = bce + dice
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    return network.eval()


def main(argv: list[str] | None = None) -> int:
    from ctquant import __version__
    from ctquant.segment.lung_model import DEFAULT_MODEL_PATH, save_lung_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holdout", help="train one model without this registry scan (default: all + every fold)")
    parser.add_argument("--out", type=Path, help="with --holdout: where to write it")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scans = [e["scan"] for e in reference_entries()]
    missing = [s for s in scans if not (SHARED_REAL_CT / s).exists()]
    if missing:
        print(f"error: {', '.join(missing)} not under {SHARED_REAL_CT}", file=sys.stderr)
        return 3
    if args.holdout and args.holdout not in scans:
        print(f"error: {args.holdout} is not in configs/real_ct_references.json", file=sys.stderr)
        return 3
    data = {}
    for scan in scans:
        if scan != args.holdout:
            print(f"examples of {scan}", flush=True)
            data[scan] = scan_examples(scan, SHARED_REAL_CT)
    jobs = ([(args.holdout, args.out or lung_fold_model_path(args.holdout))] if args.holdout
            else [(None, DEFAULT_MODEL_PATH)] + [(s, lung_fold_model_path(s)) for s in scans])
    for holdout, out in jobs:
        used = [s for s in scans if s != holdout]
        print(f"training on {', '.join(used)} -> {out}", flush=True)
        inputs = np.concatenate([data[s][0] for s in used])
        targets = np.concatenate([data[s][1] for s in used])
        network = train(inputs, targets, args.steps, args.seed)
        save_lung_model(network, out, {
            "architecture": ARCHITECTURE,
            "training": {"scans": [case_name(s) for s in used], "held_out": case_name(holdout) if holdout else None,
                         "slices": int(len(inputs)), "steps": args.steps, "seed": args.seed,
                         "hybrid_seeds": list(TRAIN_SEEDS), "ctquant_version": __version__,
                         "torch": torch.__version__, "machine": platform.machine(),
                         "trained_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "command": "python scripts/train_lung_model.py"
                                    + (f" --holdout {holdout}" if args.holdout else "")},
        })
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
