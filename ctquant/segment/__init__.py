"""Segmentation: from a scan's HU array to label images.

In: HU (z, y, x) and the voxel spacing in mm. Out: lung labels (:mod:`.lungs`: 0 outside, 1 right,
2 left) and lesion labels inside them (0 none, 1 GGO, 2 consolidation) by HU bands (:mod:`.lesions`)
or by the shipped MONAI network (:mod:`.lesion_model`). :mod:`.grid` holds the block-wise down- and
upsampling both use.
"""
