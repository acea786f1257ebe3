"""Reading and writing images: the first stage.

In: a DICOM study folder or file (the series chosen by the ``series_selection`` rule, calibration
checked), or a NIfTI/NRRD/MHA volume in HU. Out: a :class:`ctquant.io.scans.Scan` (HU array in
(z, y, x), spacing in mm, geometry, the source DICOM headers, metadata for provenance); label images
written back on the input's grid and geometry (:func:`ctquant.io.scans.write_label_image`).
"""
