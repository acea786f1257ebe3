"""QC montage, per-scan and cohort HTML reports, the `report` command, and the quantify end to end."""

from __future__ import annotations

import base64
import io
from html import unescape
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from typer.testing import CliRunner

from ctquant.cli import app
from ctquant.outputs.dicomseg import COLOURS, read_seg
from ctquant.io.scans import Scan, load_scan
from ctquant.outputs.qc import caption_lines, pick_axial_slices, pick_coronal_row, qc_montage
from ctquant.outputs.reports import collect_results, fmt, render_scan_report, write_cohort_report

PATIENT_NAME, PATIENT_ID = "Secret^Patient", "PID-SECRET-42"
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_dicom"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def synthetic_measures(subject: str = "S01", timepoint: str = "baseline", scale: float = 1.0) -> dict:
    def side(lung, ggo, cons):
        return {"lung_volume_ml": lung, "ggo_volume_ml": ggo * scale, "ggo_pct": round(100 * ggo * scale / lung, 4),
                "consolidation_volume_ml": cons * scale, "consolidation_pct": round(100 * cons * scale / lung, 4),
                "opacity_volume_ml": (ggo + cons) * scale,
                "opacity_pct": round(100 * (ggo + cons) * scale / lung, 4), "mean_lung_hu": -781.25}

    return {
        "schema": "ctquant.measures/1", "subject_id": subject, "timepoint": timepoint, "method": "hu",
        "lungs": {"right": side(2412.375, 301.5, 88.25), "left": side(2099.125, 150.75, 40.5),
                  "both": side(4511.5, 452.25, 128.75)},
        "bilateral": {"ggo": True, "consolidation": True, "opacity": True},
        "flags": ["left_lung_cut_by_field_of_view: z"],
        "provenance": {"ctquant_version": "0.1.0", "method": "hu", "model_file": None, "model_sha256": None,
                       "config": {"bilateral_min_pct_of_lung": 0.5, "hu_bands": {"ggo": [-700, -300]}},
                       "config_sha256": "c0ffee" * 10, "input": f"/data/{PATIENT_NAME}_{PATIENT_ID}/ct",
                       "input_format": "dicom", "series_instance_uid": "1.2.3.4.5.6",
                       "study_instance_uid": "1.2.3.4.5", "study_date": "20200401",
                       "spacing_mm": [5.0, 1.8, 1.8], "shape": [54, 192, 192], "device": "cpu",
                       "software": {"ctquant": "0.1.0", "numpy": "2"}, "created_utc": "2026-01-01T00:00:00+00:00"},
    }


def tiny_png(colour=(200, 30, 30), size=(60, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def colour_mask(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return np.all(np.abs(rgb[..., :3].astype(int) - np.array(colour)) <= tol, axis=-1)


def toy_chest(lesions: str) -> tuple[Scan, np.ndarray, np.ndarray]:
    """A small chest-like volume (z 30, y 64, x 80; 5 x 3 x 3 mm) with two lungs and lesion bars.

    lesions="sides": GGO only in the right lung, consolidation only in the left, on every lung slice.
    lesions="levels": GGO only in the upper third, consolidation only in the lower third (both lungs).
    """
    shape = (30, 64, 80)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    hu = np.full(shape, -1000, np.int16)
    body = ((x - 40) / 36) ** 2 + ((y - 32) / 28) ** 2 < 1
    hu[body] = 40
    lungs = np.zeros(shape, np.uint8)
    inside = (z >= 3) & (z <= 26)
    lungs[inside & (((x - 24) / 11) ** 2 + ((y - 32) / 18) ** 2 < 1)] = 1  # x index 0 = patient's right
    lungs[inside & (((x - 56) / 11) ** 2 + ((y - 32) / 18) ** 2 < 1)] = 2
    hu[lungs > 0] = -850
    les = np.zeros(shape, np.uint8)
    bar = (np.abs(y - 38) < 5)
    if lesions == "sides":
        les[(lungs == 1) & bar & (np.abs(x - 24) < 5)] = 1
        les[(lungs == 2) & bar & (np.abs(x - 56) < 5)] = 2
    else:
        les[(lungs > 0) & bar & (z >= 19)] = 1
        les[(lungs > 0) & bar & (z <= 10)] = 2
    hu[les == 1] = -500
    hu[les == 2] = 10
    scan = Scan(hu=hu, spacing_mm=(5.0, 3.0, 3.0), origin_mm=(-120.0, -96.0, -75.0), meta={"format": "test"})
    return scan, lungs, les


# --------------------------------------------------------------------------------------------------
# QC montage
# --------------------------------------------------------------------------------------------------


def test_slice_picks():
    _, lungs, les = toy_chest("levels")
    picks = pick_axial_slices(lungs, les, 12)
    assert len(picks) == 12 and picks == sorted(picks, reverse=True)  # superior (high z) first
    assert 3 <= min(picks) and max(picks) <= 26
    opacity = (les > 0).sum(axis=(1, 2))
    assert int(np.argmax(opacity)) in picks
    assert 14 <= pick_coronal_row(lungs, les) <= 50
    assert pick_axial_slices(np.zeros((5, 4, 4), np.uint8), np.zeros((5, 4, 4), np.uint8), 12) == [4, 3, 2, 1, 0]


def test_qc_montage_radiological_left_right(tmp_path):
    scan, lungs, les = toy_chest("sides")
    measures = synthetic_measures()
    path = qc_montage(scan, lungs, les, measures, tmp_path / "qc.png")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    height, width = rgb.shape[:2]
    assert 800 <= width <= 3000 and 500 <= height <= 2500
    assert rgb.std() > 20  # not blank
    found = {key: colour_mask(rgb, colour) for key, colour in COLOURS.items()}
    for key, mask in found.items():
        assert mask.sum() > 50, f"no {key} contour pixels"
    # GGO drawn only in the right lung, consolidation only in the left: radiological view puts the
    # patient's right on the image's left, in the axial tiles and the coronal slice alike.
    ggo_x = np.nonzero(found["ggo"])[1].mean()
    cons_x = np.nonzero(found["consolidation"])[1].mean()
    assert ggo_x < cons_x
    right_x = np.nonzero(found["right_lung"])[1].mean()
    left_x = np.nonzero(found["left_lung"])[1].mean()
    assert right_x < left_x


def test_qc_montage_superior_on_top(tmp_path):
    scan, lungs, les = toy_chest("levels")
    path = qc_montage(scan, lungs, les, synthetic_measures(), tmp_path / "qc.png")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    width = rgb.shape[1]
    ggo, cons = colour_mask(rgb, COLOURS["ggo"]), colour_mask(rgb, COLOURS["consolidation"])
    coronal = slice(int(0.8 * width), width)  # the coronal slice is the montage's right part
    axial = slice(0, int(0.6 * width))
    for part in (axial, coronal):
        assert ggo[:, part].sum() > 10 and cons[:, part].sum() > 10
        assert np.nonzero(ggo[:, part])[0].mean() < np.nonzero(cons[:, part])[0].mean()


def test_caption_has_key_numbers():
    lines = "\n".join(caption_lines(synthetic_measures()))
    assert "S01 · baseline" in lines and "method: hu" in lines and "ctquant 0.1.0" in lines
    assert "Right lung: 2412 mL" in lines and "Left lung: 2099 mL" in lines
    assert f"GGO {fmt(100 * 301.5 / 2412.375, '.2f')} %" in lines
    assert "FLAGS: left_lung_cut_by_field_of_view: z" in lines


# --------------------------------------------------------------------------------------------------
# HTML reports
# --------------------------------------------------------------------------------------------------


def assert_self_contained(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html, re.I)
    assert "url(" not in html and "@import" not in html and "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html


def test_scan_report_numbers_provenance_privacy():
    measures = synthetic_measures(subject="<b>S01</b>")
    html = render_scan_report(measures, tiny_png())
    assert_self_contained(html)
    for side in ("right", "left", "both"):
        m = measures["lungs"][side]
        assert f">{m['lung_volume_ml']:.1f}<" in html
        assert f">{m['ggo_pct']:.2f}<" in html and f">{m['consolidation_pct']:.2f}<" in html
    assert '"lung_volume_ml": 2412.375' in unescape(html)  # exact measures.json values in the raw section
    assert "left_lung_cut_by_field_of_view: z" in html
    for value in ("1.2.3.4.5.6", "c0ffee" * 10, "2020-04-01", "0.1.0", "hu"):
        assert value in html
    assert html.count("data:image/png;base64,") == 1
    assert "&lt;b&gt;S01&lt;/b&gt;" in html and "<b>S01</b>" not in html  # autoescaped
    assert "Secret" not in html and PATIENT_ID not in html  # the input path is withheld


def _results_tree(root: Path) -> Path:
    for subject, tp, scale in (("S02", "day14", 0.5), ("S02", "baseline", 1.0), ("S10", "baseline", 1.2)):
        folder = root / "scans" / subject / tp
        folder.mkdir(parents=True)
        (folder / "measures.json").write_text(json.dumps(synthetic_measures(subject, tp, scale)))
        (folder / "qc.png").write_bytes(tiny_png())
    hidden = root / "scans" / ".S03.tmp-x"  # an unfinished write: ignored
    hidden.mkdir()
    (hidden / "measures.json").write_text("{")
    ep = root / "endpoints"
    ep.mkdir()
    (ep / "endpoints.csv").write_text("endpoint,n_evaluable,n_reduction,pct,ci_low\nopacity_reduction,2,2,100,15.81139\n")
    (ep / "subjects.csv").write_text("subject_id,endpoint,reduction,input,patient_name\nS02,opacity_reduction,True,"
                                     f"/data/{PATIENT_NAME},{PATIENT_NAME}\n")
    (ep / "waterfall_opacity.png").write_bytes(tiny_png((0, 114, 178)))
    (root / "trajectory_opacity.png").write_bytes(tiny_png((0, 158, 115)))
    (root / "failures.csv").write_text(f"subject_id,timepoint,input,error\nS04,baseline,/data/{PATIENT_NAME},"
                                       f"\"/data/{PATIENT_NAME}/ct: no usable CT series\"\n")
    return root


def test_cohort_report(tmp_path):
    root = _results_tree(tmp_path / "results")
    results, skipped = collect_results(root)
    assert [(m["subject_id"], m["timepoint"]) for _, m in results] == [("S02", "baseline"), ("S02", "day14"),
                                                                        ("S10", "baseline")]
    assert skipped == []
    out = write_cohort_report(root, tmp_path / "cohort.html")
    html = out.read_text()
    assert_self_contained(html)
    assert "3 scan(s) of 2 subject(s)" in html
    assert html.count("data:image/jpeg;base64,") == 3  # one QC image per scan
    assert html.count("data:image/png;base64,") == 2  # the two endpoint plots
    assert "opacity_reduction" in html and "15.811" in html  # endpoints.csv and subjects.csv tables
    assert "no usable CT series" in html and "&lt;path&gt;" in html
    assert "Secret" not in html and "/data/" not in html
    half = synthetic_measures("S02", "day14", 0.5)["lungs"]["both"]
    assert f">{half['ggo_pct']:.2f}<" in html
    assert 'href="#scan-S02-baseline"' in html and 'id="scan-S02-day14"' in html


def test_report_command(tmp_path):
    root = _results_tree(tmp_path / "results")
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "cohort_report.html").is_file()
    result = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r.html"), "--no-qc-images"])
    assert result.exit_code == 0 and "data:image/jpeg" not in (tmp_path / "r.html").read_text()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 3
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 3


# --------------------------------------------------------------------------------------------------
# End to end on the sample study (or a small phantom when the sample is not generated)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantified(tmp_path_factory):
    """`ctquant quantify --method hu --seg-format both` on a DICOM series in a folder named after the patient."""
    from ctquant.run.scan import quantify_to_dir

    work = tmp_path_factory.mktemp("e2e")
    source = work / f"{PATIENT_NAME.replace('^', '_')}_{PATIENT_ID}"
    if (SAMPLE_DIR / "truth.json").exists():
        shutil.copytree(SAMPLE_DIR / "baseline", source)
        header = pydicom.dcmread(next(p for p in sorted(source.rglob("*")) if p.is_file()), stop_before_pixels=True)
        names = [str(header.PatientName), str(header.PatientID)]
    else:
        from ctquant.synthetic.phantom import make_phantom, write_dicom_series

        phantom = make_phantom((40, 160, 160), (6.0, 2.1, 2.1))
        write_dicom_series(phantom, source, study_uid="1.2.826.0.1.3680043.10.999.1",
                           series_uid="1.2.826.0.1.3680043.10.999.2",
                           frame_of_reference_uid="1.2.826.0.1.3680043.10.999.3", study_date="20200401",
                           series_description="phantom", series_number=2, patient_id=PATIENT_ID,
                           patient_name=PATIENT_NAME)
        names = [PATIENT_NAME, PATIENT_ID]
    out = work / "results" / "scans" / "S01" / "baseline"
    measures = quantify_to_dir(source, out, method="hu", device="cpu", subject_id="S01", timepoint="baseline",
                               seg_format="both")
    return source, out, measures, [n for n in names if n]


def test_quantify_writes_seg_qc_and_report(quantified):
    source, out, measures, names = quantified
    for name in ("measures.json", "lungs.nii.gz", "lesions.nii.gz", "segmentation.dcm", "qc.png", "report.html"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # The SEG holds exactly the NIfTI labels, on the source grid.
    scan = load_scan(source)
    for which, nifti in (("lungs", "lungs.nii.gz"), ("lesions", "lesions.nii.gz")):
        seg = sitk.GetArrayFromImage(read_seg(out / "segmentation.dcm", which, reference=scan))
        assert np.array_equal(seg, sitk.GetArrayFromImage(sitk.ReadImage(str(out / nifti))))
    ds = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == scan.source_datasets[0].FrameOfReferenceUID
    algo = ds.SegmentSequence[2].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmVersion == measures["provenance"]["ctquant_version"] and "method=hu" in algo.AlgorithmParameters
    # The report shows measures.json's numbers, and nothing that names the patient.
    saved = json.loads((out / "measures.json").read_text())
    html = (out / "report.html").read_text()
    assert_self_contained(html)
    for side in ("right", "left", "both"):
        m = saved["lungs"][side]
        assert f">{m['lung_volume_ml']:.1f}<" in html and f">{m['ggo_pct']:.2f}<" in html
        assert f'"lung_volume_ml": {m["lung_volume_ml"]}' in unescape(html)
    assert saved["provenance"]["series_instance_uid"] in html
    for name in names + ["Secret"]:
        assert name not in html
    # The QC picture: a sensible size, not blank, with contours of the lungs.
    rgb = np.asarray(Image.open(out / "qc.png").convert("RGB"))
    assert 1000 <= rgb.shape[1] <= 3000 and 600 <= rgb.shape[0] <= 2500
    assert rgb.std() > 20
    assert colour_mask(rgb, COLOURS["right_lung"]).sum() > 200 and colour_mask(rgb, COLOURS["left_lung"]).sum() > 200
    if saved["lungs"]["both"]["ggo_pct"] > 1:
        assert colour_mask(rgb, COLOURS["ggo"]).sum() > 100


def test_quantify_nifti_input_refuses_dicom_seg(tmp_path, quantified):
    source = quantified[0]
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.Shrink(load_scan(source).to_sitk(), [2, 2, 1]), str(nifti))  # smaller: faster
    result = CliRunner().invoke(app, ["quantify", str(nifti), "--out", str(tmp_path / "out"), "--method", "hu",
                                      "--device", "cpu", "--seg-format", "dicom-seg"])
    assert result.exit_code == 3
    assert "DICOM SEG needs a DICOM source series" in result.output
    assert not (tmp_path / "out" / "measures.json").exists()


# --------------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install chromium) - report rendering not checked")


def screenshot(html: Path, png: Path, profile: Path) -> np.ndarray:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,2000",
           html.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert png.is_file(), "chromium wrote no screenshot"
    return np.asarray(Image.open(png).convert("RGB"))


def test_reports_render_in_chromium(tmp_path, quantified):
    out = quantified[1]
    results = out.parents[2]
    cohort = write_cohort_report(results, tmp_path / "cohort.html")
    for name, html in (("scan", out / "report.html"), ("cohort", cohort)):
        shot = screenshot(html, tmp_path / f"{name}.png", tmp_path / f"profile-{name}")
        assert shot.shape[:2] == (2000, 1280)
        assert shot.std() > 25, f"{name} report screenshot is blank"
        # The embedded QC montage renders: a large dark (black background) area with contour colours.
        dark = np.all(shot < 40, axis=-1)
        # (the cohort report shows 640-px thumbnails linked to the full image: a smaller dark area)
        assert dark.mean() > (0.05 if name == "scan" else 0.02), f"{name}: QC image not shown"
        assert colour_mask(shot, COLOURS["right_lung"], tol=50).sum() > 20


# --------------------------------------------------------------------------------------------------
# Readable QC pictures, small cohort reports, unclipped plot titles (issue 16)


def big_png(size=(2090, 968), seed=0) -> bytes:
    """A QC-montage-sized PNG with texture (so that JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size[1], size[0], 3), np.uint8)
    image[:, :, :] = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 1), np.uint8).repeat(8, 0).repeat(8, 1)[
        : size[1], : size[0]]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _embedded_images(html: str, mime: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(rf"data:{mime};base64,([A-Za-z0-9+/=]+)", html)]


def test_cohort_report_embeds_thumbnails_linked_to_the_full_image(tmp_path):
    root = _results_tree(tmp_path / "results")
    for qc in root.glob("scans/*/*/qc.png"):
        qc.write_bytes(big_png())
    html = write_cohort_report(root, tmp_path / "elsewhere" / "cohort.html").read_text()
    thumbs = _embedded_images(html, "image/jpeg")
    assert len(thumbs) == 3 and all(t.width <= 640 for t in thumbs)
    per_scan = sum(len(m) for m in re.findall(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", html)) / 3
    assert per_scan < 120_000  # was ~300 KB per scan (1600 px JPEG)
    links = re.findall(r'<a href="([^"#]+qc\.png)"', html)
    assert links and all((tmp_path / "elsewhere" / link).resolve().is_file() for link in links)
    assert "../results/scans/S02/baseline/qc.png" in links


def test_scan_report_qc_image_enlarges_and_links_the_file():
    png = big_png()
    html = render_scan_report(synthetic_measures(), png)
    assert_self_contained(html)
    full = _embedded_images(html, "image/png")
    assert [im.size for im in full] == [(2090, 968)]  # the full image, shown fitted, enlarged on a click
    assert 'class="zoom" id="zoom-scan"' in html and '<label for="zoom-scan"' in html
    assert "input.zoom:checked + label img { max-width: none; }" in html
    assert '<a href="qc.png">' in html


@pytest.mark.parametrize("n_subjects", [1, 3, 12])
def test_endpoint_plot_titles_and_labels_are_not_clipped(tmp_path, n_subjects):
    from ctquant.trial import endpoints as E

    rows = [{"subject_id": f"S{i:02d}", "evaluable": True, "reduction": i % 2 == 0,
             "verdict": "reduction" if i % 2 == 0 else "no reduction", "both_from": 10.0, "both_to": 5.0 + i,
             "both_rel_change_pct": -50.0 + 5 * i, "both_abs_change": -5.0 + 0.5 * i} for i in range(n_subjects)]
    for ep in E.load_endpoints().endpoints:
        for plot in (E.plot_waterfall, E.plot_trajectories):
            fig = plot(rows, ep, tmp_path / "p.png", group="arm=placebo")
            renderer = fig.canvas.get_renderer()
            width, height = fig.bbox.width, fig.bbox.height
            for ax in fig.axes:
                for text in (ax.title, ax.yaxis.label):
                    if text.get_text():
                        box = text.get_window_extent(renderer)
                        assert box.x0 >= -0.5 and box.x1 <= width + 0.5 and box.y0 >= -0.5 and box.y1 <= height + 0.5, \
                            f"{plot.__name__} {ep.name}: {text.get_text()!r} clipped ({box} in {width}x{height})"
