#!/usr/bin/env python
"""Train the shipped MONAI lesion network (0 background, 1 GGO, 2 consolidation) on real CT slices.

Recipe (hyper-parameters in ``configs/lesion_model.yaml``):

1. pre-train lesion-vs-background on ``semiseg-pseudo`` (1,600 real slices, machine-made masks): the
   loss compares P(GGO) + P(consolidation) with the pseudo mask;
2. fine-tune 3-class on the ``medseg-2d`` training slices (radiologist labels), with a few pseudo
   slices mixed into each batch under the lesion-vs-background loss at a lower weight, all-background
   lung crops of real HU scans without pneumonia (``negatives``) and, when ``hybrids.batch_size`` > 0,
   painted positives: those scans with pneumonia painted in (:func:`load_hybrids`), under the medseg loss,
   and, when ``self_training.batch_size`` > 0, unlabelled real COVID-19 HU slices labelled by the starting
   network where it is confident (:func:`load_unlabelled`, :func:`teacher_labels`);
3. validate on the held-out slices of ``configs/lesion_split.json`` every epoch, exactly as the
   product predicts (ctquant.segment.lesion_model.predict_proba at full resolution), with monai.metrics.

Usage::

    python scripts/train_lesion_model.py [--config configs/lesion_model.yaml] \
        [--out models/lesion_model.pt] [--set finetune.steps=400 ...]

The data are read from ``<repo root>/../shared/data`` (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import monai  # noqa: E402
from monai.losses import DiceCELoss, DiceLoss  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from monai.optimizers import WarmupCosineSchedule  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    Lambdad,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism  # noqa: E402

from ctquant.segment import lesion_model as lm  # noqa: E402
from ctquant.config import config_hash, load_yaml  # noqa: E402

log = logging.getLogger("train_lesion_model")


# ----------------------------------------------------------------------------------------- config
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], yaml-parsed value)."""
    key, _, value = text.partition("=")
    if not key or not _:
        raise SystemExit(f"--set expects key=value, got {text!r}")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys of ``config`` from ``key=value`` strings (in place; returns it)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return config


def data_root(config: dict[str, Any]) -> Path:
    """The real-data folder: ``data.root`` or ``<repo root>/../shared/data``."""
    root = config["data"].get("root")
    return Path(root) if root else REPO_ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------------------------------- data
def read_grey(path: Path) -> np.ndarray:
    """An 8-bit grey image as uint8 (h, w)."""
    return np.array(Image.open(path).convert("L"))


def read_label(path: Path) -> np.ndarray:
    """A label PNG as uint8 (h, w)."""
    return np.array(Image.open(path))


def resize_label(label: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image."""
    t = torch.as_tensor(label[None, None].astype(np.float32))
    return F.interpolate(t, size=size_px, mode="nearest")[0, 0].numpy().astype(np.uint8)


def tissue_peak_grey(image: np.ndarray) -> float:
    """Grey level of the soft-tissue peak: the histogram mode above Otsu's threshold (below 250)."""
    from skimage.filters import threshold_otsu

    threshold = int(threshold_otsu(image))
    hist = np.bincount(image.ravel(), minlength=256).astype(float)
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")
    upper = min(250, 255)
    if threshold >= upper - 5:
        return float("nan")
    return float(threshold + np.argmax(hist[threshold:upper]))


def load_medseg(root: Path, names: list[str], size_px: tuple[int, int] | None):
    """medseg-2d slices: unit images and labels, resized to ``size_px`` (None: native size)."""
    images, labels = [], []
    for name in names:
        stem = Path(name).stem
        unit = lm.image8_to_unit(read_grey(root / "medseg-2d" / "images" / name))
        label = read_label(root / "medseg-2d" / "labels" / f"{stem}.png")
        if size_px is not None:
            unit = lm.resize_unit_slices(unit[None], size_px)[0, 0].numpy()
            label = resize_label(label, size_px)
        images.append(unit)
        labels.append(label)
    return images, labels


def load_pseudo(root: Path, size_px: tuple[int, int], tissue_grey: float, max_slices: int | None):
    """semiseg-pseudo slices (window-harmonised, see the config) as uint8 tensors (n, h, w) and masks."""
    files = sorted((root / "semiseg-pseudo" / "images").glob("*.jpg"))
    if max_slices:
        files = files[: int(max_slices)]
    images = torch.empty((len(files), *size_px), dtype=torch.uint8)
    masks = torch.empty((len(files), *size_px), dtype=torch.uint8)
    n_rescaled = 0
    for i, path in enumerate(files):
        grey = read_grey(path)
        peak = tissue_peak_grey(grey)
        unit = lm.image8_to_unit(grey)
        if np.isfinite(peak) and 60 <= peak <= 250:
            unit = np.clip(unit * (tissue_grey / peak), 0.0, 1.0)
            n_rescaled += 1
        unit = lm.resize_unit_slices(unit[None], size_px)[0, 0]
        images[i] = (unit * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
        label = read_label(root / "semiseg-pseudo" / "labels" / f"{path.stem}.png")
        masks[i] = torch.as_tensor(resize_label((label > 0).astype(np.uint8), size_px))
    log.info("pseudo slices: %d loaded, %d window-harmonised", len(files), n_rescaled)
    return images, masks


def load_negatives(root: Path, entries: list[dict], size_px: tuple[int, int], window_hu: tuple[float, float]
                   ) -> tuple[torch.Tensor, list[str]]:
    """All-background training slices from real HU scans without pneumonia, as uint8 (n, h, w).

    Every slice holding reference lung (less ``exclude_z``) is cropped exactly as the product crops
    (:func:`ctquant.segment.lesion_model.lung_slice_crops`) and resized to the model input.
    """
    from real_ct import load_reference_scan

    crops, names = [], []
    for entry in entries:
        hu, _, lungs = load_reference_scan(root / "real-ct", entry["scan"])
        zs, _, unit = lm.lung_slice_crops(hu, lungs, window_hu)
        keep = ~excluded_slices(zs, entry.get("exclude_z", []))
        resized = lm.resize_unit_slices(unit[keep], size_px)[:, 0]
        crops.append((resized * 255.0 + 0.5).clamp(0, 255).to(torch.uint8))
        names += [f"{entry['scan']}#{int(z)}" for z in zs[keep]]
        log.info("negatives: %s, %d slices (%d excluded)", entry["scan"], int(keep.sum()), int((~keep).sum()))
    if not crops:
        return torch.zeros((0, *size_px), dtype=torch.uint8), []
    return torch.cat(crops), names


def excluded_slices(zs: np.ndarray, exclude_z: list) -> np.ndarray:
    """True for each slice index of ``zs`` inside one of the ``[low, high)`` ranges of ``exclude_z``."""
    out = np.zeros(len(zs), bool)
    for low, high in exclude_z or []:
        out |= (zs >= int(low)) & (zs < int(high))
    return out


def painted_crops(hu: np.ndarray, lungs: np.ndarray, lesion: np.ndarray, size_px: tuple[int, int],
                  window_hu: tuple[float, float], exclude_z: list | None = None, min_lesion_px: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Model inputs and labels of a painted scan: (uint8 crops (n, h, w), uint8 labels (n, h, w), z indices).

    The slices are cut exactly as the product cuts them (:func:`ctquant.segment.lesion_model.lung_slice_crops`
    with the reference ``lungs``: one lung box per volume, ``hu_to_unit``), resized bilinearly to ``size_px``;
    ``lesion`` (0 / 1 GGO / 2 consolidation, on the scan's grid) is cut with the same box and resized
    nearest. Only slices with at least ``min_lesion_px`` painted lesion pixels (in the crop) and outside
    ``exclude_z`` are kept; slices without lesion are the negatives' job.
    """
    zs, box, unit = lm.lung_slice_crops(hu, lungs, window_hu)
    if box is None:
        return (torch.zeros((0, *size_px), dtype=torch.uint8), torch.zeros((0, *size_px), dtype=torch.uint8),
                np.zeros(0, dtype=np.int64))
    labels = np.asarray(lesion)[zs][:, box[1], box[2]]
    keep = ~excluded_slices(zs, exclude_z or []) & ((labels > 0).sum(axis=(1, 2)) >= int(min_lesion_px))
    x = lm.resize_unit_slices(unit[keep], size_px)[:, 0]
    y = F.interpolate(torch.as_tensor(labels[keep][:, None].astype(np.float32)), size=size_px, mode="nearest")[:, 0]
    return (x * 255.0 + 0.5).clamp(0, 255).to(torch.uint8), y.to(torch.uint8), zs[keep]


def load_hybrids(root: Path, entries: list[dict], cfg: dict[str, Any], size_px: tuple[int, int],
                 window_hu: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Painted positives: pneumonia painted (``ctquant.synthetic.hybrid.paint_pneumonia``) into each training
    negative's scan for every severity and seed of ``cfg``, cropped by :func:`painted_crops`; painted once,
    kept in memory as uint8 (crops, labels) and names ``scan|severity|seed#z``."""
    from real_ct import load_reference_scan
    from ctquant.synthetic.hybrid import paint_pneumonia

    xs, ys, names = [], [], []
    for entry in entries:
        hu, spacing, lungs = load_reference_scan(root / "real-ct", entry["scan"])
        for severity in cfg.get("severities", ["moderate", "severe"]):
            for seed in cfg.get("seeds", [10]):
                t0 = time.monotonic()
                case = paint_pneumonia(hu, lungs, spacing, severity=severity, seed=int(seed),
                                      paint_ggo=bool(cfg.get("paint_ggo", True)))
                x, y, zs = painted_crops(case.hu, lungs, case.lesion_labels, size_px, window_hu,
                                         entry.get("exclude_z", []), int(cfg.get("min_lesion_px", 1)))
                xs.append(x)
                ys.append(y)
                names += [f"{entry['scan']}|{severity}|{seed}#{int(z)}" for z in zs]
                log.info("hybrids: %s %s seed %s, %d slices (%.0f s)", entry["scan"], severity, seed, len(zs),
                         time.monotonic() - t0)
    if not xs:
        empty = torch.zeros((0, *size_px), dtype=torch.uint8)
        return empty, empty.clone(), []
    return torch.cat(xs), torch.cat(ys), names


def average_weights(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float
                    ) -> dict[str, torch.Tensor]:
    """``alpha`` x ``trained`` + (1 - ``alpha``) x ``start`` for every floating-point tensor of two state dicts of
    one network (weight-space ensembling of a fine-tuning with its starting point; Wortsman et al., WiSE-FT,
    CVPR 2022); other tensors are taken from ``trained``."""
    if start.keys() != trained.keys():
        raise ValueError("state dicts of different networks")
    return {k: (1.0 - alpha) * start[k] + alpha * v if v.is_floating_point() else v.clone() for k, v in trained.items()}


IGNORE_LABEL = 255  # pixels a pseudo-labelled slice leaves out of the loss


def load_unlabelled(root: Path, scans: list[str], size_px: tuple[int, int], window_hu: tuple[float, float]
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Unlabelled real HU scans as the product sees them: (uint8 crops (n, h, w), uint8 lung (n, h, w), names).

    Each scan (a DICOM folder or volume under ``real-ct``) is read with :func:`ctquant.io.scans.load_scan`,
    its lungs come from the product's lung step (classical step + shipped lung network), and every slice
    holding lung is cut and resized by :func:`painted_crops` with the lung mask as its label volume.
    """
    from ctquant.io.scans import load_scan
    from ctquant.segment.lung_model import load_lung_model, segment_lungs_with_model

    xs, lungs_out, names = [], [], []
    lung_model = load_lung_model() if scans else None
    for name in scans:
        t0 = time.monotonic()
        scan = load_scan(root / "real-ct" / name)
        lungs = (segment_lungs_with_model(scan.hu, scan.spacing_mm, lung_model) > 0).astype(np.uint8)
        x, lung, zs = painted_crops(scan.hu, lungs, lungs, size_px, window_hu, min_lesion_px=0)
        if not len(zs):
            continue
        xs.append(x)
        lungs_out.append(lung)
        names += [f"{name}#{int(z)}" for z in zs]
        log.info("unlabelled: %s, %d slices (%.0f s)", name, len(zs), time.monotonic() - t0)
    if not xs:
        empty = torch.zeros((0, *size_px), dtype=torch.uint8)
        return empty, empty.clone(), []
    return torch.cat(xs), torch.cat(lungs_out), names


@torch.no_grad()
def teacher_labels(network: torch.nn.Module, x_uint8: torch.Tensor, lung_uint8: torch.Tensor,
                   min_confidence: float, batch_size: int = 32) -> torch.Tensor:
    """Pseudo labels (n, h, w) uint8 of model-size crops: the network's argmax where its softmax is at least
    ``min_confidence`` inside the lung, :data:`IGNORE_LABEL` elsewhere (outside the lung the product
    discards the output, so nothing is taught there)."""
    was_training = network.training
    network.eval()
    out = []
    for start in range(0, len(x_uint8), batch_size):
        x = x_uint8[start:start + batch_size].float()[:, None] / 255.0
        prob, label = torch.softmax(network(x), dim=1).max(dim=1)
        keep = (prob >= float(min_confidence)) & (lung_uint8[start:start + batch_size] > 0)
        out.append(torch.where(keep, label, torch.full_like(label, IGNORE_LABEL)).to(torch.uint8))
    network.train(was_training)
    return torch.cat(out) if out else torch.zeros_like(x_uint8)


def cv_split(root: Path, names: list[str], fold: int, n_folds: int, seed: int) -> dict[str, list[str]]:
    """Fold ``fold`` of ``n_folds``, stratified by lesion share (sorted, then dealt out in shuffled rounds)."""
    share = {n: float((read_label(root / "medseg-2d" / "labels" / f"{Path(n).stem}.png") > 0).mean()) for n in names}
    ordered = sorted(names, key=lambda n: (share[n], n))
    rng = np.random.default_rng(seed)
    assignment = {}
    for start in range(0, len(ordered), n_folds):
        group = ordered[start:start + n_folds]
        for name, k in zip(group, rng.permutation(n_folds)[: len(group)]):
            assignment[name] = int(k)
    if "17.jpg" in assignment and "16.jpg" in assignment:  # probably one scan: keep them together
        assignment["17.jpg"] = assignment["16.jpg"]
    val = sorted((n for n in names if assignment[n] == fold), key=lambda n: int(Path(n).stem))
    train = sorted((n for n in names if assignment[n] != fold), key=lambda n: int(Path(n).stem))
    return {"train": train, "val": val}


def make_augment(cfg: dict[str, Any], size_px: tuple[int, int], seed: int) -> Compose:
    """MONAI dictionary transforms on {"image": (1,h,w) float, "label": (1,h,w)}."""
    keys = ["image", "label"]
    translate = [cfg["translate_fraction"] * s for s in size_px]
    scale = float(cfg["scale"])
    transforms = Compose([
        RandRotate90d(keys, prob=cfg["rotate90_prob"], max_k=3),
        RandFlipd(keys, prob=cfg["flip_prob"], spatial_axis=0),
        RandFlipd(keys, prob=cfg["flip_prob"], spatial_axis=1),
        RandAffined(keys, prob=cfg["affine_prob"], rotate_range=math.radians(cfg["rotate_deg"]),
                    scale_range=(scale, scale), translate_range=translate, spatial_size=size_px,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandShiftIntensityd("image", offsets=cfg["intensity_shift"], prob=cfg["window_prob"]),
        RandScaleIntensityd("image", factors=tuple(cfg["intensity_scale"]), prob=cfg["window_prob"]),
        Lambdad("image", func=lambda x: x.clamp(0.0, 1.0)),
        RandAdjustContrastd("image", gamma=tuple(cfg["gamma"]), prob=cfg["gamma_prob"]),
        RandGaussianSmoothd("image", sigma_x=tuple(cfg["smooth_sigma"]), sigma_y=tuple(cfg["smooth_sigma"]),
                            prob=cfg["smooth_prob"]),
        RandGaussianNoised("image", std=cfg["noise_std"], prob=cfg["noise_prob"]),
        Lambdad("image", func=lambda x: x.clamp(0.0, 1.0)),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


def augment_batch(transforms: Compose, images: list[torch.Tensor], labels: list[torch.Tensor]):
    """Apply ``transforms`` to each (h, w) image/label pair; returns (n,1,h,w) float and (n,1,h,w) long."""
    xs, ys = [], []
    for image, label in zip(images, labels):
        out = transforms({"image": image[None].float(), "label": label[None].float()})
        xs.append(torch.as_tensor(out["image"]))
        ys.append(torch.as_tensor(out["label"]).round().long())
    return torch.stack(xs).float(), torch.stack(ys)


# ------------------------------------------------------------------------------------------- loss
class LesionVsBackgroundLoss(torch.nn.Module):
    """Cross-entropy + Dice of P(lesion) = P(GGO) + P(consolidation) against a binary mask."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=False, batch=False)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1)
        log_two = torch.stack([log_p[:, 0], torch.logsumexp(log_p[:, 1:], dim=1)], dim=1)
        ce = F.nll_loss(log_two, mask[:, 0].long())
        return ce + self.dice(log_two.exp(), mask)


# ------------------------------------------------------------------------------------- validation
def validate(network: torch.nn.Module, metadata: dict[str, Any], images: list[np.ndarray],
             labels: list[np.ndarray]) -> dict[str, float]:
    """Mean per-image Dice (GGO, consolidation, lesion) at full resolution, as the product predicts."""
    network.eval()
    model = lm.LesionModel(network=network, path=Path("<training>"), sha256="", metadata=metadata)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    lesion_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for image, label in zip(images, labels):
        pred = torch.as_tensor(lm.predict_slices(model, image[None])[0]).long()
        ref = torch.as_tensor(label).long()
        metric(F.one_hot(pred, 3).permute(2, 0, 1)[None], F.one_hot(ref, 3).permute(2, 0, 1)[None])
        lesion_metric(F.one_hot((pred > 0).long(), 2).permute(2, 0, 1)[None],
                      F.one_hot((ref > 0).long(), 2).permute(2, 0, 1)[None])
    per_class = metric.aggregate().mean(dim=0)
    lesion = lesion_metric.aggregate().mean()
    network.train()
    return {"dice_ggo": float(per_class[0]), "dice_consolidation": float(per_class[1]), "dice_lesion": float(lesion)}


def negatives_opacity_pct(network: torch.nn.Module, metadata: dict[str, Any], neg_x: torch.Tensor) -> float:
    """% of the negative crops' pixels the network calls GGO or consolidation (monitoring only)."""
    network.eval()
    model = lm.LesionModel(network=network, path=Path("<training>"), sha256="", metadata=metadata)
    labels = lm.predict_slices(model, neg_x.float().numpy() / 255.0, batch_size=32)
    network.train()
    return round(100.0 * float((labels > 0).mean()), 4)


def painted_called_pct(network: torch.nn.Module, metadata: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> float:
    """% of painted consolidation pixels of the crops ``x`` (labels ``y``) the network calls consolidation."""
    network.eval()
    model = lm.LesionModel(network=network, path=Path("<training>"), sha256="", metadata=metadata)
    labels = lm.predict_slices(model, x.float().numpy() / 255.0, batch_size=32)
    network.train()
    truth = y.numpy() == lm.CONSOLIDATION
    return round(100.0 * float((truth & (labels == lm.CONSOLIDATION)).sum()) / max(1, int(truth.sum())), 2)


# ---------------------------------------------------------------------------------------- bundle
def write_bundle_configs(config: dict[str, Any], checkpoint_name: str) -> None:
    """Write ``configs/inference.json`` and ``configs/metadata.json`` (MONAI bundle layout)."""
    arch = config["model"]["architecture"]
    inference = {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "checkpoint_path": f"$@bundle_root + '/models/{checkpoint_name}'",
        "network_def": {"_target_": f"monai.networks.nets.{arch['name']}", **arch["kwargs"]},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$torch.load(@checkpoint_path, map_location=@device, weights_only=True)",
        "load_weights": "$@network.load_state_dict(@checkpoint['state_dict'])",
        "note": ("Builds the network and loads the shipped weights. The product's pre/post-processing "
                 "(HU window, lung crop, resize, argmax; on volumes, ground glass thinner than configs/quantify.yaml "
                 "model_min_ggo_thickness_mm and lesion components under model_min_component_mm3 dropped) lives in "
                 "ctquant.segment.lesion_model.segment_lesions."),
    }
    (REPO_ROOT / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    size = list(config["model"]["input_size"])
    window = list(config["model"]["hu_window"])
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.3.0",
        "changelog": {"0.3.0": "0.2.0 fine-tuned with pneumonia painted into the training negatives' scans "
                               "(configs/lesion_model.yaml hybrids), weights averaged half and half with 0.2.0",
                      "0.2.0": "fine-tuned with all-background lung crops of real HU scans without pneumonia "
                               "(configs/lesion_split.json real_ct_negatives)",
                      "0.1.0": f"first model: {arch['name']} trained on medseg-2d (35 slices) after pseudo-label pre-training"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {},
        "name": "ctquant COVID-19 lesion segmentation (2D)",
        "task": "Ground-glass opacity and consolidation segmentation on axial chest CT slices",
        "description": "2D MONAI network applied slice by slice inside the lung bounding box; see models/README.md.",
        "authors": "ctquant project",
        "copyright": "Apache-2.0 (code); training data MedSeg (CC0) and Inf-Net redistributions (MIT)",
        "data_source": ("medseg-2d (MedSeg via DengPingFan/Inf-Net), semiseg-pseudo (Inf-Net pseudo labels) and "
                        "all-background lung crops of real HU scans without pneumonia (TCIA Lung-PET-CT-Dx A0001, "
                        "COPDGene 10002K via the Chest Imaging Platform), the same two scans with pneumonia painted "
                        "in (ctquant.synthetic.hybrid)"),
        "data_type": "8-bit display-window exports for training; HU volumes in the product",
        "intended_use": "Research and trial endpoint quantification; not for clinical diagnosis",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CT", "num_channels": 1,
                "spatial_shape": size, "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": f"CT, HU window {window[0]:g}..{window[1]:g} mapped linearly to 0..1 "
                                     "(8-bit exports: grey/255), lung crop resized to the input size"},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 3, "spatial_shape": size,
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {str(i): name for i, name in enumerate(lm.CLASS_NAMES)},
            }},
        },
    }
    path = REPO_ROOT / "configs" / "metadata.json"
    if path.is_file():  # the measured figures stay; the reports show them only for the weights they name
        kept = json.loads(path.read_text()).get("ctquant_accuracy")
        if kept:
            metadata["ctquant_accuracy"] = kept
    path.write_text(json.dumps(metadata, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "lesion_model.yaml"))
    parser.add_argument("--out", default=str(REPO_ROOT / "models" / "lesion_model.pt"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-bundle", action="store_true", help="do not rewrite configs/inference.json, metadata.json")
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights (e.g. a saved pre-training)")
    parser.add_argument("--average-with-init", type=float, default=None, metavar="ALPHA",
                        help="after training, ship ALPHA x the trained weights + (1 - ALPHA) x the --init weights "
                             "(weight-space ensembling of a fine-tuning, WiSE-FT) and validate that")
    parser.add_argument("--save-pretrained", default=None, help="also save the weights after pre-training here")
    parser.add_argument("--cv-fold", default=None, metavar="K/N",
                        help="cross-validation: hold out fold K of N (0-based) of all medseg-2d slices instead of "
                             "the split file's validation slices")
    parser.add_argument("--result-json", default=None, help="write the final validation figures here")
    args = parser.parse_args(argv)
    if args.average_with_init is not None and (args.init is None or not 0.0 <= args.average_with_init <= 1.0):
        parser.error("--average-with-init needs --init and an ALPHA in [0, 1]")  # before any data is loaded
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)

    config = apply_overrides(load_yaml(args.config), args.overrides)
    started = time.monotonic()
    budget_s = float(config.get("time_budget_minutes", 1e9)) * 60.0
    seed = int(config["seed"])
    torch.set_num_threads(int(config.get("threads", 2)))
    set_determinism(seed=seed)
    log.info("config hash %s; overrides %s", config_hash(config), args.overrides)

    root = data_root(config)
    if not (root / "medseg-2d").is_dir():
        log.error("real data not found at %s", root)
        return 2
    split = json.loads((REPO_ROOT / config["data"]["split"]).read_text())
    if args.cv_fold:
        fold, n_folds = (int(v) for v in args.cv_fold.split("/"))
        split = cv_split(root, split["train"] + split["val"], fold, n_folds, seed)
        args.no_bundle = True
        log.info("cross-validation fold %d/%d: %d train, %d held out: %s", fold, n_folds, len(split["train"]),
                 len(split["val"]), " ".join(split["val"]))
    size_px = tuple(int(v) for v in config["model"]["input_size"])
    train_x, train_y = load_medseg(root, split["train"], size_px)
    val_x, val_y = load_medseg(root, split["val"], None)
    train_x = [torch.as_tensor(x) for x in train_x]
    train_y = [torch.as_tensor(y) for y in train_y]
    pre, fin = config["pretrain"], config["finetune"]
    need_pseudo = pre["steps"] > 0 or (fin["batch_size_pseudo"] > 0 and fin["steps"] > 0)
    if need_pseudo:
        pseudo_x, pseudo_y = load_pseudo(root, size_px, config["data"]["pseudo_tissue_grey"],
                                         config["data"].get("pseudo_max_slices"))
    neg_cfg = config.get("negatives", {})
    n_negative = int(neg_cfg.get("batch_size", 0)) if fin["steps"] > 0 else 0
    if n_negative:
        split_file = json.loads((REPO_ROOT / config["data"]["split"]).read_text())
        neg_x, neg_names = load_negatives(root, split_file["real_ct_negatives"]["train"], size_px,
                                          tuple(config["model"]["hu_window"]))
        if not len(neg_x):
            n_negative = 0
    hyb_cfg = config.get("hybrids", {}) or {}
    n_hybrid = int(hyb_cfg.get("batch_size", 0)) if fin["steps"] > 0 else 0
    hyb_names: list[str] = []
    if n_hybrid:
        split_file = json.loads((REPO_ROOT / config["data"]["split"]).read_text())
        hyb_x, hyb_y, hyb_names = load_hybrids(root, split_file["real_ct_negatives"]["train"], hyb_cfg, size_px,
                                               tuple(config["model"]["hu_window"]))
        if not len(hyb_x):
            n_hybrid = 0
        else:  # a fixed subset to monitor painted consolidation called consolidation
            monitor_idx = np.random.default_rng(seed).choice(len(hyb_x), size=min(64, len(hyb_x)), replace=False)
    st_cfg = config.get("self_training", {}) or {}
    n_self = int(st_cfg.get("batch_size", 0)) if fin["steps"] > 0 else 0
    st_names: list[str] = []
    if n_self:
        st_x, st_lung, st_names = load_unlabelled(root, list(st_cfg.get("scans", [])), size_px,
                                                  tuple(config["model"]["hu_window"]))
        if not len(st_x):
            n_self = 0
    log.info("medseg: %d train / %d val slices; data loaded in %.0f s", len(train_x), len(val_x),
             time.monotonic() - started)

    metadata = {
        "architecture": config["model"]["architecture"],
        "input_size": list(size_px),
        "hu_window": [float(v) for v in config["model"]["hu_window"]],
        "classes": list(lm.CLASS_NAMES),
    }
    if tuple(metadata["hu_window"]) != lm.DEFAULT_HU_WINDOW:
        log.warning("config HU window %s differs from lesion_model.DEFAULT_HU_WINDOW %s",
                    metadata["hu_window"], lm.DEFAULT_HU_WINDOW)
    network = lm.build_network(config["model"]["architecture"])
    init_state = None
    if args.init:
        network.load_state_dict(lm.load_lesion_model(args.init).network.state_dict())
        init_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        log.info("initialised from %s", args.init)
    n_params = sum(p.numel() for p in network.parameters())
    log.info("network %s, %.2f M parameters, input %s", config["model"]["architecture"]["name"], n_params / 1e6, size_px)
    if n_self:  # the starting network is the teacher: its confident labels are fixed before fine-tuning
        st_y = teacher_labels(network, st_x, st_lung, float(st_cfg.get("min_confidence", 0.9)))
        taught = st_y != IGNORE_LABEL
        log.info("self-training: %d slices, %.1f %% of their pixels labelled (%.2f %% GGO, %.2f %% consolidation)",
                 len(st_y), 100.0 * float(taught.float().mean()), 100.0 * float((st_y == lm.GGO).float().mean()),
                 100.0 * float((st_y == lm.CONSOLIDATION).float().mean()))
    augment = make_augment(config["augment"], size_px, seed)
    rng = np.random.default_rng(seed)
    lesion_loss = LesionVsBackgroundLoss()
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False,
                         lambda_dice=config["loss"]["lambda_dice"], lambda_ce=config["loss"]["lambda_ce"])
    history: list[dict[str, Any]] = []
    out_of_time = False

    def over_budget() -> bool:
        return time.monotonic() - started > budget_s

    def pseudo_batch(n: int):
        idx = rng.integers(0, len(pseudo_x), n)
        return augment_batch(augment, [pseudo_x[i].float() / 255.0 for i in idx], [pseudo_y[i] for i in idx])

    # -- phase 1: lesion-vs-background pre-training on pseudo labels
    if pre["steps"] > 0:
        opt = torch.optim.AdamW(network.parameters(), lr=pre["lr"], weight_decay=pre["weight_decay"])
        sched = WarmupCosineSchedule(opt, warmup_steps=pre["warmup_steps"], t_total=pre["steps"])
        network.train()
        t0, losses = time.monotonic(), []
        for step in range(1, pre["steps"] + 1):
            x, y = pseudo_batch(pre["batch_size"])
            opt.zero_grad(set_to_none=True)
            loss = lesion_loss(network(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
            if step % 50 == 0 or step == pre["steps"]:
                log.info("pretrain step %4d/%d  loss %.4f  (%.2f s/step)", step, pre["steps"],
                         float(np.mean(losses[-50:])), (time.monotonic() - t0) / step)
            if over_budget():
                log.warning("time budget reached during pre-training at step %d", step)
                out_of_time = True
                break
        history.append({"phase": "pretrain", "steps": step, "loss": float(np.mean(losses[-50:])),
                        "seconds": round(time.monotonic() - t0, 1)})
        if args.save_pretrained:
            lm.save_lesion_model(network, args.save_pretrained, {**metadata, "training": {"phase": "pretrain"}})
            log.info("saved pre-trained weights to %s", args.save_pretrained)

    # -- phase 2: 3-class fine-tuning on medseg-2d (+ pseudo slices under the lesion loss)
    best = {"score": -1.0, "step": 0, "state": None, "val": None}
    val = None
    step = 0
    if fin["steps"] > 0 and not out_of_time:
        opt = torch.optim.AdamW(network.parameters(), lr=fin["lr"], weight_decay=fin["weight_decay"])
        sched = WarmupCosineSchedule(opt, warmup_steps=fin["warmup_steps"], t_total=fin["steps"])
        network.train()
        t0, losses = time.monotonic(), []
        n_pseudo = int(fin["batch_size_pseudo"]) if need_pseudo else 0
        for step in range(1, fin["steps"] + 1):
            idx = rng.integers(0, len(train_x), int(fin["batch_size_medseg"]))
            x, y = augment_batch(augment, [train_x[i] for i in idx], [train_y[i] for i in idx])
            opt.zero_grad(set_to_none=True)
            parts = [x]
            if n_pseudo:
                px, py = pseudo_batch(n_pseudo)
                parts.append(px)
            if n_negative:
                nidx = rng.integers(0, len(neg_x), n_negative)
                nx, _ = augment_batch(augment, [neg_x[i].float() / 255.0 for i in nidx],
                                      [torch.zeros_like(neg_x[i]) for i in nidx])
                parts.append(nx)
            if n_self:
                sidx = rng.integers(0, len(st_x), n_self)
                sx, sy = augment_batch(augment, [st_x[i].float() / 255.0 for i in sidx], [st_y[i] for i in sidx])
                parts.append(sx)
            if n_hybrid:
                hidx = rng.integers(0, len(hyb_x), n_hybrid)
                hx, hy = augment_batch(augment, [hyb_x[i].float() / 255.0 for i in hidx], [hyb_y[i] for i in hidx])
                parts.append(hx)
            logits = network(torch.cat(parts)) if len(parts) > 1 else network(x)
            loss = dice_ce(logits[: len(x)], y)
            if n_pseudo:
                loss = loss + fin["pseudo_loss_weight"] * lesion_loss(logits[len(x):len(x) + n_pseudo], py)
            if n_negative:
                neg_logits = logits[len(x) + n_pseudo:len(x) + n_pseudo + n_negative]
                target = torch.zeros((len(neg_logits), *neg_logits.shape[2:]), dtype=torch.long)
                loss = loss + float(neg_cfg["loss_weight"]) * F.cross_entropy(neg_logits, target)
            if n_self and bool((sy != IGNORE_LABEL).any()):  # cross-entropy on the teacher's confident pixels
                start = len(x) + n_pseudo + n_negative
                loss = loss + float(st_cfg.get("loss_weight", 0.5)) * F.cross_entropy(
                    logits[start:start + n_self], sy[:, 0], ignore_index=IGNORE_LABEL)
            if n_hybrid:  # the same loss as the medseg slices
                loss = loss + float(hyb_cfg.get("loss_weight", 1.0)) * dice_ce(logits[-n_hybrid:], hy)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
            last = step == fin["steps"] or over_budget()
            if step % fin["steps_per_epoch"] == 0 or last:
                val = validate(network, metadata, val_x, val_y)
                if n_negative:
                    val["train_negatives_opacity_pct"] = negatives_opacity_pct(network, metadata, neg_x)
                if n_hybrid:
                    val["train_hybrids_consolidation_called_pct"] = painted_called_pct(
                        network, metadata, hyb_x[monitor_idx], hyb_y[monitor_idx])
                score = (val["dice_ggo"] + val["dice_consolidation"] + val["dice_lesion"]) / 3.0
                epoch = math.ceil(step / fin["steps_per_epoch"])
                log.info("epoch %2d (step %4d/%d)  loss %.4f  val Dice GGO %.3f  consolidation %.3f  lesion %.3f"
                         "  negatives opacity %s %%  painted consolidation called %s %%  (%.2f s/step, %.1f min total)",
                         epoch, step, fin["steps"],
                         float(np.mean(losses[-fin["steps_per_epoch"]:])), val["dice_ggo"],
                         val["dice_consolidation"], val["dice_lesion"], val.get("train_negatives_opacity_pct"),
                         val.get("train_hybrids_consolidation_called_pct"), (time.monotonic() - t0) / step,
                         (time.monotonic() - started) / 60)
                history.append({"phase": "finetune", "epoch": epoch, "step": step,
                                "loss": round(float(np.mean(losses[-fin["steps_per_epoch"]:])), 4),
                                **{k: round(v, 4) for k, v in val.items()}})
                if score > best["score"]:
                    best = {"score": score, "step": step, "val": val,
                            "state": {k: v.detach().clone() for k, v in network.state_dict().items()}}
            if over_budget():
                log.warning("time budget reached during fine-tuning at step %d: saving what there is", step)
                out_of_time = True
                break

    if fin.get("select_checkpoint", "last") == "best" and best["state"] is not None:
        network.load_state_dict(best["state"])
        chosen, chosen_val = f"best (step {best['step']})", best["val"]
    else:
        chosen, chosen_val = f"last (step {step})", val
    if args.average_with_init is not None:
        network.load_state_dict(average_weights(init_state, network.state_dict(), args.average_with_init))
        chosen_val = validate(network, metadata, val_x, val_y)
        chosen = f"{chosen} averaged with --init: {args.average_with_init:g} x trained + {1 - args.average_with_init:g} x init"
        log.info("weight-averaged with the starting weights (alpha %g): val %s", args.average_with_init, chosen_val)
    wall_min = (time.monotonic() - started) / 60.0
    metadata["training"] = {
        "script": "scripts/train_lesion_model.py",
        "config": str(Path(args.config).resolve().relative_to(REPO_ROOT)) if Path(args.config).resolve().is_relative_to(REPO_ROOT) else args.config,
        "config_hash": config_hash(config),
        "overrides": list(args.overrides),
        "seed": seed,
        "split": config["data"]["split"],
        "negatives": ({"scans": sorted({n.split("#")[0] for n in neg_names}), "n_slices": len(neg_names),
                       "batch_size": n_negative, "loss_weight": float(neg_cfg.get("loss_weight", 0.0))}
                      if n_negative else None),
        "hybrids": ({"what": "pneumonia painted into the training negatives' scans (ctquant.synthetic.hybrid."
                             "paint_pneumonia), slices with painted lesion, labels 1 GGO / 2 consolidation",
                     "scans": sorted({n.split("|")[0] for n in hyb_names}), "n_slices": len(hyb_names),
                     "severities": list(hyb_cfg.get("severities", [])), "seeds": list(hyb_cfg.get("seeds", [])),
                     "batch_size": n_hybrid, "loss_weight": float(hyb_cfg.get("loss_weight", 1.0))}
                    if n_hybrid else None),
        "self_training": ({"what": "unlabelled real HU scans, lungs from the product's lung step, labelled by the "
                                   "starting network where its softmax >= min_confidence inside the lung",
                           "scans": sorted({n.split("#")[0] for n in st_names}), "n_slices": len(st_names),
                           "min_confidence": float(st_cfg.get("min_confidence", 0.9)), "batch_size": n_self,
                           "loss_weight": float(st_cfg.get("loss_weight", 0.5))} if n_self else None),
        "init": str(args.init) if args.init else None,
        "average_with_init": args.average_with_init,
        "checkpoint": chosen,
        "validation_at_checkpoint": chosen_val,
        "best_validation": {"step": best["step"], **(best["val"] or {})},
        "stopped_by_time_budget": out_of_time,
        "wall_minutes": round(wall_min, 1),
        "history": history,
        "trained_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__), "monai": str(monai.__version__), "machine": platform.machine(),
    }
    path = lm.save_lesion_model(network, args.out, metadata)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps({"cv_fold": args.cv_fold, "val_names": split["val"],
                                                      "validation": chosen_val, "wall_minutes": round(wall_min, 1)},
                                                     indent=2) + "\n")
    if not args.no_bundle:
        write_bundle_configs(config, Path(args.out).name)
    log.info("saved %s (%s); val at checkpoint %s; best val step %d %s; wall %.1f min",
             path, chosen, chosen_val, best["step"], best["val"], wall_min)
    return 0


if __name__ == "__main__":
    sys.exit(main())
