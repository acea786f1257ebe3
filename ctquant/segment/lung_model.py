"""Dense lung that the classical lung step cannot see, added by a small MONAI U-Net.

The classical step (:mod:`ctquant.segment.lungs`) is tight on aerated lung but keeps dense lung only
between aerated lung and the rib cage: an airless base, a whole airless lobe or consolidation against
the mediastinum is lost. Here a 2D U-Net sees, on a fixed grid (``GRID_MM`` in-plane, ``GRID_PX``²
around the lungs, one slice every ``Z_STEP_MM``), the CT at three heights (``NEIGHBOUR_MM`` apart) and
the classical lung mask, and says where the whole lung is. Only what it adds is used, and only where
it is dense tissue that the classical mask lacks:

1. the network's lung probability above ``threshold`` on soft tissue (``dense_min_hu`` … ``bone_hu``)
   outside the classical lungs, and not enclosed by a classical lung in its slice (a diaphragm
   dome that the classical step took out; enclosed dense lung it fills itself);
2. opened in-plane (``opening_mm``): a rim along the pleura is grid noise, not consolidation;
3. kept where it touches a classical lung (3D) and is not the top of a diaphragm dome (a region lying
   mostly right above soft tissue that is not lung), and given the label of the nearest lung;
4. brought back to the scan's grid (nearest grid pixel) on the scan's own soft-tissue voxels.

Trained by ``scripts/train_lung_model.py`` on the real scans of ``../shared/data/real-ct`` with
pneumonia painted in (:mod:`ctquant.synthetic.hybrid`); ``models/README.md`` gives the data, the
held-out figures and the commands. Arrays are (z, y, x) in LPS as :mod:`ctquant.io.scans` delivers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..config import MODEL_DIR, file_sha256
from .grid import bounding_box
from .lungs import segment_lungs
from .lesion_model import hu_to_unit, read_checkpoint, save_lesion_model, to_device

#: In-plane pixel (mm) and size (pixels) of the network's grid: 400 mm around the lungs' centre.
GRID_MM, GRID_PX = 2.5, 160
#: Height between the network's slices (mm), and between a slice and the two neighbours it also sees.
Z_STEP_MM, NEIGHBOUR_MM = 2.5, 5.0
#: The network's slices reach this far below and above the classical lungs (mm): airless bases.
Z_MARGIN_MM = (30.0, 10.0)
#: HU window of the three CT channels (:func:`ctquant.segment.lesion_model.hu_to_unit`).
HU_WINDOW = (-1000.0, 400.0)
#: Grid pixels of partial volume between a lung and a region it encloses (:func:`dense_lung_on_grid`).
ENCLOSED_GAP_PX = 2
#: Margin (grid pixels) around the added dense lung within which its nearest lung voxel is searched.
NEAREST_MARGIN_PX = 8
CHECKPOINT_FORMAT = "ctquant-lung-model"
DEFAULT_MODEL_PATH: Path = MODEL_DIR / "lung_model.pt"
#: Slices per forward pass on the CPU.
BATCH_SIZE = 16


@dataclass
class LungModel:
    """A loaded lung network with its provenance (``metadata``: architecture, grid, training summary)."""

    network: torch.nn.Module
    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def provenance(self) -> dict[str, Any]:
        """A small JSON-ready summary for result files."""
        return {"path": str(self.path), "sha256": self.sha256,
                "architecture": self.metadata.get("architecture", {}).get("name"),
                "trained_on": self.metadata.get("training", {}).get("scans")}


def save_lung_model(network: torch.nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a lung checkpoint (the lesion model's layout, format :data:`CHECKPOINT_FORMAT`)."""
    metadata = {"input_size": [GRID_PX, GRID_PX], "hu_window": list(HU_WINDOW), "classes": ["outside", "lung"],
                **metadata}
    return save_lesion_model(network, path, metadata, checkpoint_format=CHECKPOINT_FORMAT)


def load_lung_model(path: str | Path | None = None, device: str = "cpu") -> LungModel:
    """Load the shipped (or given) lung network; a missing or corrupt file is a :class:`ModelError`."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    network, metadata = read_checkpoint(path, CHECKPOINT_FORMAT, "lung model", {"architecture", "input_size"})
    torch_device = to_device(network, device)
    return LungModel(network=network, path=path, sha256=file_sha256(path), metadata=metadata, device=torch_device)


@dataclass
class LungGrid:
    """Where the network's grid lies in a scan.

    Attributes:
        z: scan slice index of each network slice.
        z_step: scan slices between network slices.
        neighbour: scan slices between a network slice and each neighbour it sees.
        y_mm, x_mm: scan position (mm from the first pixel's centre) of the grid's first pixel centre.
        spacing_mm: the scan's voxel size (z, y, x).
    """

    z: np.ndarray
    z_step: int
    neighbour: int
    y_mm: float
    x_mm: float
    spacing_mm: tuple[float, float, float]

    def sample(self, volume: np.ndarray, z: np.ndarray, mode: str) -> torch.Tensor:
        """``volume``'s slices ``z`` on the grid, (n, GRID_PX, GRID_PX) float32 (``bilinear`` or ``nearest``)."""
        ny, nx = volume.shape[1:]
        _, sy, sx = self.spacing_mm
        steps = torch.arange(GRID_PX, dtype=torch.float64) * GRID_MM
        gy = ((self.y_mm + steps) / sy + 0.5) / ny * 2.0 - 1.0  # pixel centres, align_corners=False
        gx = ((self.x_mm + steps) / sx + 0.5) / nx * 2.0 - 1.0
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).float()  # (y, x, [x, y])
        slices = torch.from_numpy(np.ascontiguousarray(volume[z])).to(torch.float32)[:, None]
        out = F.grid_sample(slices, grid.expand(len(z), -1, -1, -1), mode=mode, padding_mode="border",
                            align_corners=False)[:, 0]
        inside_y = (gy >= -1) & (gy <= 1)
        inside_x = (gx >= -1) & (gx <= 1)
        outside = ~(inside_y[:, None] & inside_x[None, :])
        fill = -1000.0 if mode == "bilinear" else 0.0
        return out.masked_fill(outside, fill)

    def pixel_index(self, axis: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For the scan's ``n`` pixels along in-plane ``axis`` (1 y, 2 x): the nearest grid pixel, and
        whether it lies on the grid."""
        start = self.y_mm if axis == 1 else self.x_mm
        index = np.rint((np.arange(n) * self.spacing_mm[axis] - start) / GRID_MM).astype(int)
        return np.clip(index, 0, GRID_PX - 1), (index >= 0) & (index < GRID_PX)


def lung_grid(lung_labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> LungGrid | None:
    """The network's grid for a scan: centred in-plane on the classical lungs' box, its slices from
    ``Z_MARGIN_MM`` below to above them; None without lungs."""
    box = bounding_box(lung_labels)
    if box is None:
        return None
    sz, sy, sx = spacing_mm
    z_step = max(1, int(round(Z_STEP_MM / sz)))
    below, above = (int(round(m / sz)) for m in Z_MARGIN_MM)
    z = np.arange(max(0, box[0].start - below), min(lung_labels.shape[0], box[0].stop + above), z_step)
    centre_y = 0.5 * (box[1].start + box[1].stop - 1) * sy
    centre_x = 0.5 * (box[2].start + box[2].stop - 1) * sx
    half = 0.5 * (GRID_PX - 1) * GRID_MM
    return LungGrid(z=z, z_step=z_step, neighbour=max(1, int(round(NEIGHBOUR_MM / sz))),
                    y_mm=centre_y - half, x_mm=centre_x - half, spacing_mm=tuple(float(s) for s in spacing_mm))


def network_input(hu: np.ndarray, lung_labels: np.ndarray, grid: LungGrid
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The network's input (n, 4, GRID_PX, GRID_PX): the CT below, at and above each grid slice (unit range,
    :data:`HU_WINDOW`) and the classical lung mask; the grid's HU and the classical lung labels on the grid
    (n, GRID_PX, GRID_PX; uint8, 1 right, 2 left)."""
    last, n = hu.shape[0] - 1, len(grid.z)
    heights = np.concatenate([np.clip(grid.z - grid.neighbour, 0, last), grid.z, np.clip(grid.z + grid.neighbour, 0, last)])
    unique, inverse = np.unique(heights, return_inverse=True)  # each scan slice sampled once
    sampled = grid.sample(hu, unique, "bilinear")[torch.from_numpy(inverse.reshape(-1))]
    hu_grid = sampled[n:2 * n]
    labels_grid = grid.sample(lung_labels, grid.z, "nearest")
    unit = torch.from_numpy(hu_to_unit(sampled.numpy(), HU_WINDOW)).reshape(3, n, GRID_PX, GRID_PX)
    x = torch.cat([unit.permute(1, 0, 2, 3), (labels_grid > 0).float()[:, None]], dim=1)
    return x, hu_grid, labels_grid.numpy().astype(np.uint8)


def lung_probability(model: LungModel, x: torch.Tensor) -> np.ndarray:
    """The network's lung probability (n, GRID_PX, GRID_PX) float32 of its input (:func:`network_input`)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), BATCH_SIZE):
            batch = x[start:start + BATCH_SIZE].to(model.device)
            if model.device.type == "cpu":
                batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model.network(batch).float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, GRID_PX, GRID_PX), dtype=np.float32)


def is_addable(hu: np.ndarray, dense_min_hu: float, bone_hu: float) -> np.ndarray:
    """Density that may be dense lung: ``dense_min_hu`` … ``bone_hu`` (HU)."""
    hu = np.asarray(hu)
    return (hu >= dense_min_hu) & (hu < bone_hu)


def _without_domes(add: np.ndarray, lung: np.ndarray, hu_grid: np.ndarray, dome_min_hu: float = -200.0) -> np.ndarray:
    """``add`` less its per-slice regions that lie mostly right above soft tissue that is not lung (neither
    classical nor added): the top of a diaphragm dome (liver, spleen) seen from above. Dependent
    consolidation in a base lies above more of itself; only its lowest slice goes."""
    out = add.copy()
    for m in np.flatnonzero(add[1:].any(axis=(1, 2))) + 1:  # axis 0 runs from the feet up
        below = (hu_grid[m - 1] > dome_min_hu) & ~lung[m - 1] & ~add[m - 1]
        regions, n = ndi.label(add[m])
        area = np.bincount(regions.ravel(), minlength=n + 1)
        rests = np.bincount(regions[below], minlength=n + 1)
        dome = rests > 0.5 * area
        dome[0] = False
        out[m][dome[regions]] = False
    return out


def _touching(add: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """``add`` less its 3D components (face-connected, with the lungs) that touch no ``lung`` voxel."""
    components, _ = ndi.label(add | lung)
    touching = np.unique(components[lung])
    return add & np.isin(components, touching[touching > 0])


def dense_lung_on_grid(probability: np.ndarray, hu_grid: np.ndarray, lung_grid_labels: np.ndarray,
                       grid: LungGrid, *, threshold: float, opening_mm: float, dense_min_hu: float,
                       bone_hu: float) -> np.ndarray:
    """Labels (1 right, 2 left) of the dense lung the network adds on its grid (steps 1-3 of the module)."""
    lung = lung_grid_labels > 0
    add = (probability > threshold) & is_addable(hu_grid, dense_min_hu, bone_hu) & ~lung
    iterations = int(round(opening_mm / GRID_MM))
    if iterations > 0 and add.any():
        cross = np.zeros((3, 3, 3), dtype=bool)
        cross[1] = ndi.generate_binary_structure(2, 1)
        add = ndi.binary_opening(add, structure=cross, iterations=iterations)
    if not add.any():
        return np.zeros(add.shape, dtype=np.uint8)
    add = _touching(add, lung)
    for m in np.flatnonzero(add.any(axis=(1, 2))):  # enclosed by a slice's lung (across a partial-volume rim of up
        # to ``ENCLOSED_GAP_PX``): a diaphragm dome the classical step took out (enclosed dense lung it fills itself)
        closed = ndi.binary_closing(np.pad(lung[m], ENCLOSED_GAP_PX), iterations=ENCLOSED_GAP_PX)
        closed = closed[ENCLOSED_GAP_PX:-ENCLOSED_GAP_PX, ENCLOSED_GAP_PX:-ENCLOSED_GAP_PX]
        add[m] &= ~ndi.binary_fill_holes(closed)
    add = _touching(_without_domes(add, lung, hu_grid), lung)  # what the two rules cut off goes too
    if not add.any():
        return np.zeros(add.shape, dtype=np.uint8)
    # the label of the nearest lung voxel, searched in the box of what is added grown by NEAREST_MARGIN_PX
    box = bounding_box(add)
    box = tuple(slice(max(0, b.start - NEAREST_MARGIN_PX), min(size, b.stop + NEAREST_MARGIN_PX))
                for b, size in zip(box, add.shape))
    labels_box = lung_grid_labels[box]
    out = np.zeros(add.shape, dtype=np.uint8)
    if not labels_box.any():
        return out
    sampling = (grid.z_step * grid.spacing_mm[0], GRID_MM, GRID_MM)
    _, nearest = ndi.distance_transform_edt(labels_box == 0, sampling=sampling, return_indices=True)
    out[box] = np.where(add[box], labels_box[tuple(nearest)], 0)
    return out


def add_dense_lung(hu: np.ndarray, spacing_mm: tuple[float, float, float], lung_labels: np.ndarray,
                   model: LungModel, *, threshold: float = 0.85, opening_mm: float = 5.0,
                   dense_min_hu: float = -400.0, bone_hu: float = 200.0) -> np.ndarray:
    """``lung_labels`` (1 right, 2 left, the classical step's) with the dense lung the network finds added.

    Args:
        hu: CT volume (z, y, x) in HU, LPS.
        spacing_mm: voxel size (z, y, x) in mm.
        lung_labels: the classical lungs (:func:`ctquant.segment.lungs.segment_lungs`); never reduced.
        model: the lung network (:func:`load_lung_model`).
        threshold: lung probability above which dense tissue is lung.
        opening_mm: in-plane opening of what is added (thinner rims are dropped).
        dense_min_hu, bone_hu: what is added is soft tissue between these densities.
    """
    grid = lung_grid(lung_labels, spacing_mm)
    if grid is None:
        return lung_labels
    x, hu_grid, labels_grid = network_input(hu, lung_labels, grid)
    probability = lung_probability(model, x)
    added = dense_lung_on_grid(probability, hu_grid.numpy(), labels_grid, grid, threshold=threshold,
                               opening_mm=opening_mm, dense_min_hu=dense_min_hu, bone_hu=bone_hu)
    out = lung_labels.copy()
    if not added.any():
        return out
    box = bounding_box(added)
    iy, on_y = grid.pixel_index(1, hu.shape[1])
    ix, on_x = grid.pixel_index(2, hu.shape[2])
    rows = np.flatnonzero(on_y & (iy >= box[1].start) & (iy < box[1].stop))  # the scan pixels under the box
    cols = np.flatnonzero(on_x & (ix >= box[2].start) & (ix < box[2].stop))
    window = np.ix_(rows, cols)
    for m in range(box[0].start, box[0].stop):  # each grid slice stands for the scan slices nearest to it
        side = added[m][np.ix_(iy[rows], ix[cols])]
        if not side.any():
            continue
        z0 = grid.z[m] - grid.z_step // 2
        for z in range(max(0, z0), min(hu.shape[0], z0 + grid.z_step)):
            hu_z, target = hu[z][window], out[z][window]
            take = (side > 0) & (target == 0) & is_addable(hu_z, dense_min_hu, bone_hu)
            target[take] = side[take]
            out[z][window] = target
    return out


def segment_lungs_with_model(hu: np.ndarray, spacing_mm: tuple[float, float, float], model: LungModel | None, *,
                             dependent: str = "posterior") -> np.ndarray:
    """The product's lung step on arrays: the classical lungs (:func:`ctquant.segment.lungs.segment_lungs`,
    ``dependent`` side), then the dense lung ``model`` adds (:func:`add_dense_lung`; None: classical alone)."""

    labels = segment_lungs(hu, spacing_mm, dependent=dependent)
    if model is None or not labels.any():
        return labels
    return add_dense_lung(hu, spacing_mm, labels, model)
