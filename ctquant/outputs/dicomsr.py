"""A DICOM Structured Report of ctquant's numbers (TID 1500 Measurement Report), written with highdicom.

:func:`write_sr` writes ``measurements.dcm`` beside the SEG (:mod:`ctquant.outputs.dicomseg`): a
Comprehensive SR (no spatial coordinates are needed, and it is the class the most readers take) holding, per lung and for both, the lung volume, the GGO and consolidation
volumes and their % of that lung, so that a PACS, OHIF or 3D Slicer shows the numbers and not only the
masks. Every number is taken from the measures dict (``measures.json``'s ``lungs``), rounded as there.

Content (TID 1500 → TID 1411 Volumetric ROI Measurements, one group per SEG segment; TID 1501 for the
two lungs together, which no single segment holds):

====================  ==================  =========================================================
group (tracking id)   references          measurements
====================  ==================  =========================================================
Right lung            SEG segment 1       Volume (mL), finding site Lung, laterality Right
Left lung             SEG segment 2       Volume (mL), finding site Lung, laterality Left
Ground-glass opacity  SEG segment 3       Volume (mL) and Volume Ratio (% of both lungs)
Consolidation         SEG segment 4       the same
Ground-glass opacity, SEG segment 3       the same for the part in the right lung (group finding
right lung                                site Lung, laterality Right)
... left lung, and    SEG segments 3, 4   the same, for each lesion class and lung
Consolidation, ...
Lungs                 (TID 1501)          Volume (mL) of both lungs
====================  ==================  =========================================================

The first four groups are one per SEG segment, in segment order, because 3D Slicer's
QuantitativeReporting pairs report groups with the loaded segments in that order.

Laterality sits on the group's finding site (not on single measurements) because dcmqi's TID 1500
reader, which 3D Slicer's QuantitativeReporting uses, interprets it only there.

Codes: Volume SCT 118565006 and Volume Ratio DCM 113288 (CID 7469), units UCUM ``ml`` and ``%``;
finding types SCT 39607008 "Lung", DCM 112120 "Ground glass opacity", SCT 9656002 "Consolidation";
laterality from CID 244; procedure LN 25045-6 "CT unspecified body region" (CID 100).

Observer context: a device observer named ``ctquant`` (model name ``ctquant <version>``, serial
number the lesion model's SHA-256 when ``--method model``); each group's algorithm identification
(TID 4019) names ctquant and its version with the method and the model, code and config hashes as
parameters. The SR references the SEG (segments, and the source series through it) and lists the SEG
and every source CT image as evidence; its patient and study attributes are the SEG's, i.e. the
source's made conformant (:func:`ctquant.outputs.dicomseg.conformant_header`).

:func:`read_sr_measures` reads such an SR back into the ``lungs`` layout of the measures dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..version import __version__
from .dicomseg import CONSOLIDATION_CODE, save_dataset
from ..errors import InputError

#: (measures key prefix, SEG segment number, tracking identifier) of the lesion groups.
LESIONS = (("ggo", 3, "Ground-glass opacity"), ("consolidation", 4, "Consolidation"))
LUNG_SEGMENTS = (("right", 1, "Right lung"), ("left", 2, "Left lung"))
SIDES = ("right", "left", "both")


def _concept(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _units():
    return {"ml": _concept("ml", "UCUM", "milliliter"), "%": _concept("%", "UCUM", "percent")}


def _finding_type(key: str):
    if key == "ggo":
        return codes.DCM.GroundGlassOpacity
    if key == "consolidation":
        return _concept(*CONSOLIDATION_CODE)
    return codes.SCT.Lung


def _site(side: str):
    """Finding site Lung, with laterality for ``right``/``left``."""
    from highdicom.sr import FindingSite

    laterality = {"right": codes.cid244.Right, "left": codes.cid244.Left}.get(side)
    return FindingSite(anatomic_location=codes.SCT.Lung, laterality=laterality)


def _tracking_label(label: str, side: str) -> str:
    return label if side == "both" else f"{label}, {side} lung"


def _algorithm(provenance: dict[str, Any], method: str):
    from highdicom.sr import AlgorithmIdentification

    params = [f"method={method}"]
    for key in ("model_sha256", "code_sha256", "config_sha256"):
        if provenance.get(key):
            params.append(f"{key}={provenance[key]}")
    return AlgorithmIdentification(name="ctquant", version=str(provenance.get("ctquant_version") or __version__),
                                   parameters=params)


def build_sr(seg: Dataset, sources: Sequence[Dataset], measures: dict[str, Any], *,
             series_number: int | None = None):
    """A :class:`highdicom.sr.ComprehensiveSR` of ``measures`` referencing ``seg``'s segments.

    Args:
        seg: the ctquant SEG the numbers were measured on (a header is enough).
        sources: the source CT images' headers (listed as evidence).
        measures: the measures dict (``measures.json``): ``lungs``, ``method``, ``provenance``.
        series_number: the SR's series number (default: the SEG's + 1).
    """
    import highdicom as hd
    from highdicom.sr import (DeviceObserverIdentifyingAttributes, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              ReferencedSegment, TrackingIdentifier,
                              VolumetricROIMeasurementsAndQualitativeEvaluations)

    lungs = measures["lungs"]
    method = str(measures.get("method") or "unknown")
    provenance = measures.get("provenance") or {}
    units = _units()
    algorithm = _algorithm(provenance, method)
    numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)

    def segment(number: int):
        if number not in numbers:
            raise ValueError(f"the SEG has no segment {number}")
        return ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                 segment_number=number, source_series=hd.sr.SourceSeriesForSegmentation(series_uid))

    def volume(value: float) -> Measurement:
        return Measurement(name=codes.SCT.Volume, value=float(value), unit=units["ml"], algorithm_id=algorithm)

    def ratio(value: float) -> Measurement:
        return Measurement(name=codes.DCM.VolumeRatio, value=float(value), unit=units["%"], algorithm_id=algorithm)

    def lesion_group(key: str, number: int, label: str, side: str):
        """The part of a lesion segment in one lung (or both): the group's finding site says which."""
        return VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=_tracking_label(label, side)),
            referenced_segment=segment(number), finding_type=_finding_type(key),
            finding_category=codes.cid7150.MorphologicallyAbnormalStructure, finding_sites=[_site(side)],
            algorithm_id=algorithm,
            measurements=[volume(lungs[side][f"{key}_volume_ml"]), ratio(lungs[side][f"{key}_pct"])])

    # First one group per SEG segment, in segment order (3D Slicer pairs groups with segments so).
    groups = []
    for side, number, label in LUNG_SEGMENTS:
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=label),
            referenced_segment=segment(number), finding_type=codes.SCT.Lung,
            finding_category=codes.cid7150.AnatomicalStructure, finding_sites=[_site(side)],
            algorithm_id=algorithm, measurements=[volume(lungs[side]["lung_volume_ml"])]))
    groups += [lesion_group(key, number, label, "both") for key, number, label in LESIONS]
    groups += [lesion_group(key, number, label, side) for key, number, label in LESIONS for side in ("right", "left")]
    groups.append(MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="Lungs"),
        finding_type=codes.SCT.Lung, finding_category=codes.cid7150.AnatomicalStructure,
        finding_sites=[_site("both")], algorithm_id=algorithm,
        measurements=[volume(lungs["both"]["lung_volume_ml"])]))

    model_sha = provenance.get("model_sha256")
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="ctquant", manufacturer_name="ctquant",
            model_name=f"ctquant {provenance.get('ctquant_version') or __version__}"[:64],
            serial_number=str(model_sha)[:64] if model_sha else None))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
        imaging_measurements=groups)
    if series_number is None:
        series_number = int(seg.SeriesNumber) + 1 if seg.get("SeriesNumber") not in (None, "") else 1000
    return hd.sr.ComprehensiveSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=max(1, min(int(series_number), 2**31 - 1)),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctquant",
        series_description=f"ctquant measurements ({method})"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def write_sr(seg_path: str | Path, sources: Sequence[Dataset], measures: dict[str, Any],
             path: str | Path, *, compression: str = "deflate") -> Path:
    """Write the SR of ``measures`` beside the SEG at ``seg_path`` (see the module docstring).

    Raises:
        InputError: ``seg_path`` is not a readable DICOM file.
        OutputError: the file cannot be written.
    """
    try:
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"cannot read the SEG the SR references: {exc}", seg_path) from None
    sr = build_sr(seg, sources, measures)
    return save_dataset(sr, path, compression)


def read_sr_measures(path: str | Path) -> dict[str, dict[str, float]]:
    """The numbers of a ctquant SR in the measures dict's layout: ``{side: {key: value}}`` for
    ``lung_volume_ml``, ``{ggo,consolidation}_volume_ml`` and ``{ggo,consolidation}_pct``."""
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
    except Exception as exc:  # highdicom raises various errors on non-SR files
        raise InputError(f"not a readable DICOM SR: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                         path) from None
    out: dict[str, dict[str, float]] = {side: {} for side in SIDES}
    keys = {"Right lung": "lung", "Left lung": "lung", "Lungs": "lung"}
    for key, _, label in LESIONS:
        keys.update({_tracking_label(label, side): key for side in SIDES})
    laterality = {codes.cid244.Right.value: "right", codes.cid244.Left.value: "left"}
    report = sr.content
    groups = [*report.get_volumetric_roi_measurement_groups(), *report.get_image_measurement_groups()]
    for group in groups:
        key = keys.get(str(group.tracking_identifier))
        if key is None:
            continue
        side = "both"
        for site in group.finding_sites:
            if site.laterality is not None:
                side = laterality[site.laterality.value]
        for m in group.get_measurements():
            if m.name == codes.SCT.Volume:
                out[side]["lung_volume_ml" if key == "lung" else f"{key}_volume_ml"] = float(m.value)
            elif m.name == codes.DCM.VolumeRatio:
                out[side][f"{key}_pct"] = float(m.value)
    return out
