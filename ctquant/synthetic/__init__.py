"""Synthetic data for tests, benchmarks and the sample: not used by the product's stages.

In: a seed and parameters (or a real CT and its lung mask). Out: a phantom chest CT with known lungs,
GGO and consolidation, writable as a DICOM series (:mod:`.phantom`), or pneumonia painted into a
real CT with its truth labels (:mod:`.hybrid`).
"""
