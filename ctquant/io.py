"""Reading CT scans (DICOM series, NIfTI/NRRD/MHA) into HU volumes, and writing label volumes.

Arrays are numpy in (z, y, x) order, as SimpleITK's ``GetArrayFromImage`` gives them; ``spacing_mm``
follows the same (z, y, x) order. ``origin_mm`` and ``direction`` are in the patient (LPS) frame,
as SimpleITK holds them: origin is the centre of voxel [0, 0, 0]; direction is the 3×3 matrix
(row-major) whose columns are the x, y, z index axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass
class Scan:
    """A CT volume in Hounsfield units with its geometry and provenance.

    Attributes:
        hu: int16 array (z, y, x) of Hounsfield units.
        spacing_mm: voxel size (z, y, x) in mm.
        origin_mm: LPS position (x, y, z) of the centre of voxel [0, 0, 0], in mm.
        direction: 9 floats, row-major 3×3 direction cosines (columns: x, y, z index axes).
        meta: provenance (series/study UIDs, dates, description, kernel, source path...), never the
            patient's name or ID.
        source_datasets: for DICOM input, the pydicom headers (no pixel data) of each slice in
            z order, for writing DICOM SEG that references them; empty for other formats.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    source_datasets: list = field(default_factory=list, repr=False)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: ``hu``) on this scan's grid and geometry."""
        array = self.hu if array is None else array
        if array.shape != self.hu.shape:
            raise ValueError(f"array shape {array.shape} differs from the scan's {self.hu.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in self.spacing_mm[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin_mm))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image
