"""Overlap of two masks: the one Dice of ctquant (model evaluation, reader agreement, lung accuracy).

In: two boolean masks (or label images) on one grid; out: Dice 2|A∩B| / (|A| + |B|) per class.
"""

from __future__ import annotations

import numpy as np

from ..segment.lesions import CONSOLIDATION, GGO


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice 2|P∩G| / (|P| + |G|) of two masks; 1.0 where both are empty, 0.0 where only one is."""
    p = np.asarray(prediction, dtype=bool)
    g = np.asarray(reference, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and reference {g.shape} differ in shape")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def class_dice(prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-image Dice of GGO, consolidation and lesion (GGO ∪ consolidation) for label images."""
    return {
        "dice_ggo": dice_score(prediction == GGO, reference == GGO),
        "dice_consolidation": dice_score(prediction == CONSOLIDATION, reference == CONSOLIDATION),
        "dice_lesion": dice_score(prediction > 0, reference > 0),
    }
