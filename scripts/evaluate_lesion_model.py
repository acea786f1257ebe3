#!/usr/bin/env python
"""Evaluate the shipped lesion model on labelled 2D slices (0 background, 1 GGO, 2 consolidation).

Usage::

    python scripts/evaluate_lesion_model.py --images DIR --labels DIR --json OUT.json \
        [--device cpu|cuda|auto] [--model PATH] [--only-split val|train --split configs/lesion_split.json]

Every ``DIR/N.jpg`` or ``DIR/N.png`` is read with its label ``LABELS/N.png``, normalised and segmented
exactly as the product does (``ctquant.lesion_model.image8_to_unit`` then ``predict_slices``: resize to
the model's input size, softmax, bilinear resize back, argmax). The whole image is the crop (these
exports are already framed around the lungs; no lung mask is applied).

Scores are per-image Dice for GGO, consolidation and lesion (GGO ∪ consolidation), with the
convention: class absent from both prediction and label → 1, absent from one only → 0; a set's figure
is the mean over images. Lesion-area error is predicted minus labelled lesion area, in % of image pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ctquant import lesion_model as lm  # noqa: E402
from ctquant.errors import CtquantError  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_pairs(images_dir: Path, labels_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(name, image path, label path) for every image with a label ``<stem>.png``; and unlabelled names."""
    pairs, unlabelled = [], []
    files = [p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    for path in files:
        label = labels_dir / f"{path.stem}.png"
        if label.is_file():
            pairs.append((path.name, path, label))
        else:
            unlabelled.append(path.name)
    return pairs, unlabelled


def read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The grey image (uint8) and its label image (uint8, values 0/1/2), checked to match."""
    image = np.array(Image.open(image_path).convert("L"))
    label = np.array(Image.open(label_path))
    if label.ndim == 3:
        label = label[..., 0]
    if label.shape != image.shape:
        raise ValueError(f"{label_path}: label shape {label.shape} differs from image {image.shape}")
    if label.max(initial=0) > 2:
        raise ValueError(f"{label_path}: label values {np.unique(label).tolist()} outside 0/1/2")
    return image, label.astype(np.uint8)


def evaluate(model: lm.LesionModel, pairs: list[tuple[str, Path, Path]]) -> list[dict]:
    """Per-image scores of ``model`` on ``pairs``."""
    rows = []
    for name, image_path, label_path in pairs:
        image, label = read_pair(image_path, label_path)
        t0 = time.perf_counter()
        pred = lm.predict_slices(model, lm.image8_to_unit(image)[None])[0]
        ms = (time.perf_counter() - t0) * 1000.0
        area_pred = 100.0 * float((pred > 0).mean())
        area_label = 100.0 * float((label > 0).mean())
        rows.append({
            "name": name,
            "height": int(image.shape[0]), "width": int(image.shape[1]),
            **{k: round(v, 4) for k, v in lm.class_dice(pred, label).items()},
            "ggo_area_pct_pred": round(100.0 * float((pred == lm.GGO).mean()), 3),
            "ggo_area_pct_label": round(100.0 * float((label == lm.GGO).mean()), 3),
            "consolidation_area_pct_pred": round(100.0 * float((pred == lm.CONSOLIDATION).mean()), 3),
            "consolidation_area_pct_label": round(100.0 * float((label == lm.CONSOLIDATION).mean()), 3),
            "lesion_area_pct_pred": round(area_pred, 3),
            "lesion_area_pct_label": round(area_label, 3),
            "lesion_area_error_pct": round(area_pred - area_label, 3),
            "ms": round(ms, 1),
        })
    return rows


def summarise(rows: list[dict]) -> dict:
    """Means over images of the per-image figures."""
    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 4)

    errors = np.array([r["lesion_area_error_pct"] for r in rows])
    return {
        "n_images": len(rows),
        "dice_ggo": mean("dice_ggo"),
        "dice_consolidation": mean("dice_consolidation"),
        "dice_lesion": mean("dice_lesion"),
        "lesion_area_error_pct_mean": round(float(errors.mean()), 3),
        "lesion_area_abs_error_pct_mean": round(float(np.abs(errors).mean()), 3),
        "lesion_area_pct_label_mean": mean("lesion_area_pct_label"),
        "lesion_area_pct_pred_mean": mean("lesion_area_pct_pred"),
    }


def print_table(rows: list[dict], summary: dict) -> None:
    """A plain-text table of per-image and mean figures."""
    header = f"{'image':<14}{'GGO':>7}{'cons':>7}{'lesion':>8}{'area% lab':>11}{'area% pred':>11}{'err':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<14}{r['dice_ggo']:>7.3f}{r['dice_consolidation']:>7.3f}{r['dice_lesion']:>8.3f}"
              f"{r['lesion_area_pct_label']:>11.2f}{r['lesion_area_pct_pred']:>11.2f}{r['lesion_area_error_pct']:>+8.2f}")
    print("-" * len(header))
    print(f"{'mean (n=%d)' % summary['n_images']:<14}{summary['dice_ggo']:>7.3f}{summary['dice_consolidation']:>7.3f}"
          f"{summary['dice_lesion']:>8.3f}{summary['lesion_area_pct_label_mean']:>11.2f}"
          f"{summary['lesion_area_pct_pred_mean']:>11.2f}{summary['lesion_area_error_pct_mean']:>+8.2f}")
    print(f"mean |lesion-area error|: {summary['lesion_area_abs_error_pct_mean']:.2f} % of image pixels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path, help="folder of N.jpg|png slices")
    parser.add_argument("--labels", required=True, type=Path, help="folder of N.png labels (0/1/2)")
    parser.add_argument("--json", required=True, type=Path, help="output JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--model", default=None, type=Path, help="weights (default: models/lesion_model.pt)")
    parser.add_argument("--only-split", choices=["train", "val"], default=None,
                        help="evaluate only the slices of this part of --split")
    parser.add_argument("--split", default=REPO_ROOT / "configs" / "lesion_split.json", type=Path)
    args = parser.parse_args(argv)

    for folder in (args.images, args.labels):
        if not folder.is_dir():
            print(f"evaluate_lesion_model: error: {folder}: not a folder", file=sys.stderr)
            return 3
    pairs, unlabelled = find_pairs(args.images, args.labels)
    if args.only_split:
        wanted = {Path(n).stem for n in json.loads(args.split.read_text())[args.only_split]}
        pairs = [p for p in pairs if Path(p[0]).stem in wanted]
    if not pairs:
        print(f"evaluate_lesion_model: error: {args.images}: no image with a label in {args.labels}", file=sys.stderr)
        return 3
    try:
        model = lm.load_lesion_model(args.model, device=args.device)
    except CtquantError as exc:
        print(f"evaluate_lesion_model: error: {exc}", file=sys.stderr)
        return exc.exit_code
    started = time.perf_counter()
    rows = evaluate(model, pairs)
    summary = summarise(rows)
    result = {
        **summary,
        "dice_convention": "per-image Dice; class absent from both prediction and label = 1, absent from one only = 0; "
                           "set figure = mean over images",
        "images": str(args.images), "labels": str(args.labels),
        "split": {"file": str(args.split), "part": args.only_split} if args.only_split else None,
        "unlabelled_images_skipped": unlabelled,
        "model": model.provenance(),
        "device": str(model.device),
        "seconds": round(time.perf_counter() - started, 2),
        "per_image": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, summary)
    if unlabelled:
        print(f"skipped {len(unlabelled)} image(s) without a label: {', '.join(unlabelled[:10])}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
