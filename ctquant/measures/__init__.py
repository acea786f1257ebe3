"""Measures of label images.

In: HU, lung labels, lesion labels and the spacing in mm. Out: per lung (right, left, both) the lung
volume (mL), GGO / consolidation / opacity volume and % of lung, mean lung HU, bilateral involvement
and quality flags (:mod:`.volumes`); the overlap of two masks, the one Dice of ctquant
(:mod:`.overlap`).
"""
