"""The shipped MONAI lesion network: ground-glass opacity (1) and consolidation (2) on axial CT slices.

One input normalisation is used everywhere (training, evaluation, product):

- CT in Hounsfield units goes through :func:`hu_to_unit`, a fixed window ``DEFAULT_HU_WINDOW``
  (-1050 to +250 HU) chosen so that HU slices look like the 8-bit display-window exports the
  model was trained on (lung parenchyma at about -850 HU lands at 0.15, soft tissue at +40 HU at
  0.84, the medians measured on the 50 labelled training slices; air is about 0.04);
- 8-bit exports go through :func:`image8_to_unit` (grey level / 255).

There is no per-image standardisation: display windows vary between exports, and the network is
made robust to that by random window/contrast/gamma augmentation at training time (see
``configs/lesion_model.yaml`` and ``models/README.md``). A content-dependent normalisation
(percentiles, z-score, landmark peaks) would rescale a slice differently depending on how much of it
is diseased, which blurs exactly the density difference between GGO and consolidation.

Each slice (or lung crop) is resized to the model's square input, the class probabilities are
resized back bilinearly and the label is their argmax (smoother, less blocky borders than
nearest-neighbour upsampling of labels).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MODEL_DIR, file_sha256, resolve_device
from ..errors import ModelError
from .grid import bounding_box

#: Class index → name of the network's outputs.
CLASS_NAMES: tuple[str, ...] = ("background", "ggo", "consolidation")
BACKGROUND, GGO, CONSOLIDATION = 0, 1, 2
#: HU window mapped onto [0, 1] by :func:`hu_to_unit` (lower, upper), in HU.
DEFAULT_HU_WINDOW: tuple[float, float] = (-1050.0, 250.0)
#: Default location of the shipped weights.
DEFAULT_MODEL_PATH: Path = MODEL_DIR / "lesion_model.pt"
#: Tag stored in every checkpoint written by :func:`save_lesion_model`.
CHECKPOINT_FORMAT = "ctquant-lesion-model"
CHECKPOINT_VERSION = 1
#: Extra in-plane margin around the lung bounding box, as a share of the box size on each side.
#: The labelled training slices are cropped so tightly that the lungs span a median 99 % of the
#: image width and height (margins 0-2 % per side), so the product crop keeps a 1 % margin.
DEFAULT_CROP_MARGIN_FRACTION = 0.01
#: Slices per forward pass of :func:`segment_lesions` by device type (16 elsewhere): small batches keep
#: a channels-last SegResNet-8 pass in the 2-core CPU's caches.
DEFAULT_BATCH_SIZE: dict[str, int] = {"cpu": 8}

#: MONAI network classes the checkpoint's ``architecture["name"]`` may name.
_NETWORKS = ("UNet", "BasicUNet", "SegResNet", "AttentionUnet")


def hu_to_unit(hu: np.ndarray, window_hu: tuple[float, float] = DEFAULT_HU_WINDOW) -> np.ndarray:
    """Map Hounsfield units linearly onto [0, 1] through ``window_hu`` (clipped), as float32."""
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"HU window upper bound must exceed the lower one, got {window_hu}")
    unit = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(unit, 0.0, 1.0, out=unit)


def image8_to_unit(image_uint8: np.ndarray) -> np.ndarray:
    """Map an 8-bit grey image (0-255) onto [0, 1] as float32."""
    image = np.asarray(image_uint8)
    if image.ndim == 3:  # RGB(A) export of a grey image: keep the first channel
        image = image[..., 0]
    return image.astype(np.float32) / np.float32(255.0)


def build_network(architecture: dict[str, Any]) -> torch.nn.Module:
    """A ``monai.networks.nets`` 2D network from ``{"name": "UNet", "kwargs": {...}}``."""
    import monai.networks.nets as nets

    name = architecture.get("name")
    if name not in _NETWORKS:
        raise ValueError(f"unsupported network {name!r}; expected one of {_NETWORKS}")
    kwargs = dict(architecture.get("kwargs", {}))
    return getattr(nets, name)(**kwargs)


@dataclass
class LesionModel:
    """A loaded lesion network with its provenance.

    Attributes:
        network: the MONAI network in eval mode, on ``device``.
        path: the weight file it was loaded from.
        sha256: SHA-256 of that file's bytes.
        metadata: what the checkpoint records (classes, input size, HU window, architecture,
            training summary).
        device: where it runs.
    """

    network: torch.nn.Module
    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def input_size(self) -> tuple[int, int]:
        """Square input (height, width) in pixels the network was trained at."""
        return tuple(int(v) for v in self.metadata["input_size"])  # type: ignore[return-value]

    @property
    def hu_window(self) -> tuple[float, float]:
        """The HU window of :func:`hu_to_unit` this network expects."""
        return tuple(float(v) for v in self.metadata.get("hu_window", DEFAULT_HU_WINDOW))  # type: ignore[return-value]

    @property
    def classes(self) -> tuple[str, ...]:
        """Output class names, index order."""
        return tuple(self.metadata.get("classes", CLASS_NAMES))

    def provenance(self) -> dict[str, Any]:
        """A small JSON-ready summary for result files."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "architecture": self.metadata.get("architecture", {}).get("name"),
            "input_size": list(self.input_size),
            "hu_window": list(self.hu_window),
            "classes": list(self.classes),
        }


def save_lesion_model(network: torch.nn.Module, path: str | Path, metadata: dict[str, Any],
                      checkpoint_format: str = CHECKPOINT_FORMAT) -> Path:
    """Write ``{"format", "version", "metadata", "state_dict"}`` (plain tensors and builtins) to ``path``
    (``checkpoint_format``: the lesion model's, or the lung model's of :mod:`ctquant.segment.lung_model`)."""
    for key in ("architecture", "input_size", "hu_window", "classes"):
        if key not in metadata:
            raise ValueError(f"metadata lacks {key!r}")
    metadata = json.loads(json.dumps(metadata))  # builtins only, so that weights_only loading accepts it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    blob = {"format": checkpoint_format, "version": CHECKPOINT_VERSION, "metadata": metadata, "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: Path, checkpoint_format: str, what: str, required: set[str]
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network (eval mode, CPU) and metadata of a ctquant checkpoint of ``checkpoint_format`` written by
    :func:`save_lesion_model` or its like; any missing, corrupt or incompatible file is a :class:`ModelError`
    naming ``what`` the file should hold; ``required``: metadata keys that must be there."""
    if not path.is_file():
        raise ModelError(f"{what} weight file not found", path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickled code: all unusable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {what} weights (truncated or corrupt file?): {first}", path) from None
    if not isinstance(blob, dict) or blob.get("format") != checkpoint_format:
        raise ModelError(f"not a ctquant {what} checkpoint (expected format {checkpoint_format!r})", path)
    if blob.get("version") != CHECKPOINT_VERSION:
        raise ModelError(f"unsupported checkpoint version {blob.get('version')!r} "
                         f"(this ctquant reads version {CHECKPOINT_VERSION})", path)
    metadata = blob.get("metadata")
    if not isinstance(metadata, dict) or not required <= set(metadata):
        raise ModelError(f"checkpoint metadata lacks {'/'.join(sorted(required))}", path)
    try:
        network = build_network(metadata["architecture"])
        network.load_state_dict(blob["state_dict"], strict=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"weights incompatible with the network code: {first}", path) from None
    return network.eval(), metadata


def to_device(network: torch.nn.Module, device: str) -> torch.device:
    """Move ``network`` to ``device`` (``auto``, ``cpu``, ``cuda``), channels-last on the CPU; returns the device."""
    torch_device = torch.device(resolve_device(device))
    network.to(torch_device).eval()
    if torch_device.type == "cpu":  # oneDNN's NHWC convolutions: about 20 % faster, same logits to 1e-5
        network.to(memory_format=torch.channels_last)
    return torch_device


def load_lesion_model(path: str | Path | None = None, device: str = "cpu") -> LesionModel:
    """Load the shipped (or given) lesion network; any missing/corrupt/incompatible file is a :class:`ModelError`."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    network, metadata = read_checkpoint(path, CHECKPOINT_FORMAT, "lesion model", {"architecture", "input_size", "classes"})
    if tuple(metadata["classes"]) != CLASS_NAMES:
        raise ModelError(f"checkpoint classes {metadata['classes']} differ from {list(CLASS_NAMES)}", path)
    torch_device = to_device(network, device)
    return LesionModel(network=network, path=path, sha256=file_sha256(path), metadata=metadata, device=torch_device)


def _resize(batch: torch.Tensor, size_px: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (n, c, h, w) to ``size_px``; antialiased when shrinking."""
    if tuple(batch.shape[-2:]) == tuple(size_px):
        return batch
    shrink = batch.shape[-2] > size_px[0] or batch.shape[-1] > size_px[1]
    return F.interpolate(batch, size=size_px, mode="bilinear", align_corners=False, antialias=shrink)


def resize_unit_slices(slices_unit: np.ndarray | torch.Tensor, size_px: tuple[int, int]) -> torch.Tensor:
    """Resize (n, h, w) unit-range slices to (n, 1, *size_px) float32, as the network sees them."""
    batch = torch.as_tensor(np.asarray(slices_unit, dtype=np.float32))[:, None]
    return _resize(batch, size_px)


def _input_size_proba(model: LesionModel, slices_unit: np.ndarray) -> torch.Tensor:
    """Softmax (n, 3, *input_size) float32 on the model's device of (n, h, w) unit-range slices resized to
    the model's input size (channels-last on the CPU, float16 autocast on CUDA)."""
    x = resize_unit_slices(slices_unit, model.input_size).to(model.device)
    if model.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    use_amp = model.device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device_type=model.device.type, dtype=torch.float16, enabled=use_amp):
        logits = model.network(x)
    return torch.softmax(logits.float(), dim=1).contiguous()


def predict_proba(model: LesionModel, slices_unit: np.ndarray) -> torch.Tensor:
    """Class probabilities (n, 3, h, w) float32 on the CPU for one batch of (n, h, w) unit-range slices.

    Each slice is resized to the model's input size, run, and its softmax resized back to (h, w).
    """
    slices_unit = np.asarray(slices_unit, dtype=np.float32)
    if slices_unit.ndim != 3:
        raise ValueError(f"expected slices of shape (n, h, w), got {slices_unit.shape}")
    return _resize(_input_size_proba(model, slices_unit), slices_unit.shape[1:]).cpu()


def probabilities_to_labels(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the class axis of (n, c, h, w) → (n, h, w) uint8; ties go to the lower class.

    Element-wise running maximum: several times faster on the CPU than ``argmax(dim=1)``.
    """
    best = probs[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=probs.device)
    for cls in range(1, probs.shape[1]):
        labels.masked_fill_(probs[:, cls] > best, cls)
        best = torch.maximum(best, probs[:, cls])
    return labels


def predict_slices(model: LesionModel, slices_unit: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Labels (n, h, w) uint8 (0 background, 1 GGO, 2 consolidation) for (n, h, w) unit-range slices.

    The argmax of :func:`predict_proba`, with its resize skipped on slices that are all background at
    the model's input size: bilinear weights are non-negative, so where background is the largest
    probability at every input pixel it stays the largest (or tied: background) at every output pixel.
    """
    slices_unit = np.asarray(slices_unit, dtype=np.float32)
    if slices_unit.ndim != 3:
        raise ValueError(f"expected slices of shape (n, h, w), got {slices_unit.shape}")
    out = np.zeros(slices_unit.shape, dtype=np.uint8)
    for start in range(0, len(slices_unit), max(1, int(batch_size))):
        probs = _input_size_proba(model, slices_unit[start:start + batch_size])
        hit = (probabilities_to_labels(probs) > 0).flatten(1).any(dim=1)
        if hit.any():
            full = _resize(probs[hit], slices_unit.shape[1:])
            out[start + np.flatnonzero(hit.cpu().numpy())] = probabilities_to_labels(full).cpu().numpy()
    return out


def _lung_values(values: np.ndarray) -> np.ndarray:
    """A lung mask or label image whose non-zero voxels are the lung: bool and unsigned ones as they
    are (no full-volume copy), others as ``values > 0``."""
    values = np.asarray(values)
    return values if values.dtype == bool or values.dtype.kind == "u" else values > 0


def lung_crop_box(lung_mask: np.ndarray, margin_fraction: float = DEFAULT_CROP_MARGIN_FRACTION
                  ) -> tuple[slice, slice, slice] | None:
    """(z, y, x) slices of the lung bounding box, in-plane box widened by ``margin_fraction`` per side.

    One in-plane box for the whole volume keeps the pixel scale the same on every slice (as in the
    training exports, where a mid-thorax pair of lungs fills the image). ``None`` if there is no lung.
    """
    mask = _lung_values(lung_mask)
    box = bounding_box(mask)
    if box is None:
        return None
    widened = []
    for extent, n in zip(box[1:], mask.shape[1:]):
        pad = int(math.ceil(margin_fraction * (extent.stop - extent.start)))
        widened.append(slice(max(0, extent.start - pad), min(n, extent.stop + pad)))
    return (box[0], *widened)


def lung_slice_crops(hu: np.ndarray, lung_mask: np.ndarray, window_hu: tuple[float, float] = DEFAULT_HU_WINDOW,
                     margin_fraction: float = DEFAULT_CROP_MARGIN_FRACTION
                     ) -> tuple[np.ndarray, tuple[slice, slice, slice] | None, np.ndarray]:
    """The product's model inputs of an HU volume: (z indices, crop box, unit crops (n, h, w) float32).

    The slices holding lung, each cut to the volume's lung bounding box (:func:`lung_crop_box`) and
    mapped through :func:`hu_to_unit`; used by :func:`segment_lesions` and to build training
    negatives from real scans exactly as the product sees them.
    """
    lung = np.asarray(lung_mask) > 0
    box = lung_crop_box(lung, margin_fraction)
    if box is None:
        return np.zeros(0, dtype=np.int64), None, np.zeros((0, 0, 0), dtype=np.float32)
    z_box, y_box, x_box = box
    zs = np.flatnonzero(lung[z_box].any(axis=(1, 2))) + z_box.start
    return zs, box, hu_to_unit(np.asarray(hu)[zs, y_box, x_box], window_hu)


def remove_small_lesions(labels: np.ndarray, spacing_mm: tuple[float, float, float], min_component_mm3: float
                         ) -> np.ndarray:
    """``labels`` without the 3D connected lesion components (GGO and consolidation together, 26-connected)
    smaller than ``min_component_mm3`` (:func:`ctquant.segment.lesions.remove_small`)."""
    from .lesions import remove_small

    if min_component_mm3 <= 0 or not labels.any():
        return labels
    keep = remove_small(labels > 0, min_component_mm3 / float(np.prod(spacing_mm)), connectivity=3)
    return labels * keep


def remove_thin_ggo(labels: np.ndarray, spacing_mm: tuple[float, float, float], min_thickness_mm: float
                    ) -> np.ndarray:
    """``labels`` with the ground glass thinner than ``min_thickness_mm`` set to background: a 3D opening with
    a ball of that diameter (:func:`ctquant.segment.lesions.opening_mm`, the HU method's rule), against the
    voxel-thick partial-volume and dependent-density rims along the pleura of normal lungs."""
    from .lesions import opening_mm

    ggo = labels == GGO
    if min_thickness_mm <= 0 or not ggo.any():
        return labels
    out = labels.copy()
    out[ggo & ~opening_mm(ggo, spacing_mm, min_thickness_mm)] = 0
    return out


def postprocess_settings(config: dict[str, Any]) -> dict[str, float]:
    """The keyword arguments of :func:`segment_lesions` that a quantify config sets on volumes:
    ``model_min_component_mm3`` and ``model_min_ggo_thickness_mm`` (0 when absent) and
    ``max_lesion_share_on_tissue_below`` (1, keep all, when absent)."""
    from .lesions import max_share_on_tissue_below

    return {"min_component_mm3": float(config.get("model_min_component_mm3", 0.0)),
            "min_ggo_thickness_mm": float(config.get("model_min_ggo_thickness_mm", 0.0)),
            "max_share_on_tissue_below": max_share_on_tissue_below(config)}


def segment_lesions(hu: np.ndarray, lung_mask: np.ndarray, model: LesionModel, batch_size: int | None = None,
                    margin_fraction: float = DEFAULT_CROP_MARGIN_FRACTION,
                    spacing_mm: tuple[float, float, float] | None = None,
                    min_component_mm3: float = 0.0, min_ggo_thickness_mm: float = 0.0,
                    max_share_on_tissue_below: float = 1.0) -> np.ndarray:
    """GGO (1) and consolidation (2) labels (z, y, x) uint8 of an HU volume, zero outside ``lung_mask``.

    Only slices containing lung are run; each is cropped to the lung bounding box (see
    :func:`lung_crop_box`), normalised with :func:`hu_to_unit` at the model's HU window and passed
    through :func:`predict_slices`, ``batch_size`` slices at a time (default :data:`DEFAULT_BATCH_SIZE`).
    With ``spacing_mm``, ground glass thinner than ``min_ggo_thickness_mm`` (:func:`remove_thin_ggo`), then
    lesion components smaller than ``min_component_mm3`` (:func:`remove_small_lesions`) are dropped, and
    so are those with more than ``max_share_on_tissue_below`` of their voxels directly above tissue that is not
    lesion (:func:`ctquant.segment.lesions.remove_lesions_on_tissue_below`; ``configs/quantify.yaml``
    ``model_min_ggo_thickness_mm``, ``model_min_component_mm3``, ``max_lesion_share_on_tissue_below``; see
    :func:`postprocess_settings`).
    """
    hu = np.asarray(hu)
    lung = _lung_values(lung_mask)
    if hu.ndim != 3 or hu.shape != lung.shape:
        raise ValueError(f"hu {hu.shape} and lung_mask {lung.shape} must be equal (z, y, x) shapes")
    labels = np.zeros(hu.shape, dtype=np.uint8)
    box = lung_crop_box(lung, margin_fraction)
    if box is None:
        return labels
    z_box, y_box, x_box = box
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE.get(model.device.type, 16)
    z_with_lung = np.flatnonzero(lung[z_box].any(axis=(1, 2))) + z_box.start
    for start in range(0, len(z_with_lung), max(1, int(batch_size))):
        zs = z_with_lung[start:start + batch_size]
        if zs[-1] - zs[0] == len(zs) - 1:  # consecutive slices (the rule): views, not copies
            zs = slice(int(zs[0]), int(zs[-1]) + 1)
        pred = predict_slices(model, hu_to_unit(hu[zs, y_box, x_box], model.hu_window), batch_size=batch_size)
        labels[zs, y_box, x_box] = pred * (lung[zs, y_box, x_box] > 0)
    if spacing_mm is not None and min_ggo_thickness_mm > 0:
        labels[z_box, y_box, x_box] = remove_thin_ggo(labels[z_box, y_box, x_box], spacing_mm, min_ggo_thickness_mm)
    if spacing_mm is not None and min_component_mm3 > 0:
        labels[z_box, y_box, x_box] = remove_small_lesions(labels[z_box, y_box, x_box], spacing_mm, min_component_mm3)
    if max_share_on_tissue_below < 1.0:
        from .lesions import remove_lesions_on_tissue_below

        labels = remove_lesions_on_tissue_below(labels, hu, max_share_on_tissue_below)
    return labels
