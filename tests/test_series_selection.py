"""Issue 16, items 2-4: series without SeriesInstanceUID, several reconstructions, several studies."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
import bad_inputs as bi  # noqa: E402
from ctquant.io import scans as ctio  # noqa: E402
from ctquant.synthetic import phantom as ph  # noqa: E402
from ctquant.config import load_quantify_config  # noqa: E402
from ctquant.errors import GeometryError, InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SELECTION = load_quantify_config().get("series_selection", {})


def _blank_series_uid(paths: list[Path]) -> None:
    for path in paths:
        bi.edit(path, lambda ds: setattr(ds, "SeriesInstanceUID", ""))


def _recon(paths: list[Path], folder: Path, kernel: str, tag: str, series_number: int) -> list[Path]:
    """Copies of a series' files as another reconstruction: another kernel, new series and SOP UIDs."""
    folder.mkdir(parents=True)
    out = []
    for k, path in enumerate(paths):
        target = folder / path.name
        shutil.copy(path, target)

        def change(ds, k=k):
            ds.ConvolutionKernel = kernel
            ds.SeriesInstanceUID = ph.uid_from("series", tag)
            ds.SOPInstanceUID = ph.uid_from("sop", tag, str(k))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = series_number
            ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} {kernel}"
        out.append(bi.edit(target, change))
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# -- item 2: no SeriesInstanceUID --------------------------------------------------------------------


def test_series_without_uid_loads_with_a_warning(tmp_path: Path, caplog):
    phantom = bi.tiny_phantom()
    paths = bi.write_series(tmp_path / "study")
    _blank_series_uid(paths)
    (info,) = ctio.find_series(tmp_path / "study")
    assert info.uid_missing and info.series_uid.startswith("no-uid-") and info.n_images == len(paths)
    with caplog.at_level(logging.WARNING, logger="ctquant.io.scans"):
        scan = ctio.load_scan(tmp_path / "study")
    np.testing.assert_array_equal(scan.hu, phantom.hu)
    assert scan.meta["series_instance_uid"] is None and scan.meta["series_uid_missing"] is True
    assert scan.meta["series_key"] == info.series_uid
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without SeriesInstanceUID" in warnings[0] and "FrameOfReferenceUID" in warnings[0]
    # the stand-in key names the series for --series as well
    assert ctio.load_scan(tmp_path / "study", series_uid=info.series_uid).hu.shape == phantom.hu.shape


def test_real_anonymised_jpeg2000_series_without_uid(shared_data: Path, caplog):
    folder = shared_data / "real-ct" / "abdomen-jpeg2000"
    with caplog.at_level(logging.WARNING, logger="ctquant.io.scans"):
        scan = ctio.load_scan(folder)
    assert any("20 DICOM file(s) without SeriesInstanceUID" in r.getMessage() for r in caplog.records)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    assert scan.hu.shape == (20, 512, 512)
    np.testing.assert_array_equal(scan.hu, sitk.GetArrayFromImage(reference))  # voxel for voxel as SimpleITK
    np.testing.assert_allclose(scan.spacing_mm[::-1], reference.GetSpacing(), atol=1e-4)
    assert scan.meta["convolution_kernel"] == "Br38f\\3" and scan.meta["kernel_class"] == "smooth"


def test_two_series_without_uid_on_one_grid_are_still_refused(tmp_path: Path):
    folder = tmp_path / "study"
    paths = bi.write_series(folder / "a", tag="a", series_description="Thorax")
    paths += bi.write_series(folder / "b", tag="b", series_description="Thorax")
    _blank_series_uid(paths)
    assert len(ctio.find_series(folder)) == 1  # nothing tells them apart...
    with pytest.raises(GeometryError, match="duplicate slice position"):  # ... and the volume is refused
        ctio.load_scan(folder)


def test_series_without_uid_of_two_studies_are_refused(tmp_path: Path):
    """Baseline and day-14 slices with blanked UIDs in one folder: two groups, two studies, refused."""
    folder = tmp_path / "study"
    paths = bi.write_series(folder / "a", tag="a", study_uid="", frame_of_reference_uid=ph.uid_from("for", "a"))
    paths += bi.write_series(folder / "b", tag="b", study_uid="", frame_of_reference_uid=ph.uid_from("for", "b"),
                             study_date="20200415")
    _blank_series_uid(paths)
    assert len(ctio.find_series(folder)) == 2
    with pytest.raises(InputError, match="from 2 different studies"):
        ctio.load_scan(folder)


# -- item 3: several reconstructions -------------------------------------------------------------------


@pytest.mark.parametrize("sharp,smooth", [("B70f", "B40f"), ("L", "B"), ("LUNG", "STANDARD"), ("FC51", "FC13")])
def test_kernel_classes(sharp: str, smooth: str):
    assert ctio.kernel_class(sharp, SELECTION) == "sharp"
    assert ctio.kernel_class(smooth, SELECTION) == "smooth"


@pytest.fixture(scope="module")
def two_kernels(tmp_path_factory) -> Path:
    """One acquisition reconstructed twice: sharp B70f (series 2, listed first) and smooth B40f (series 3)."""
    root = tmp_path_factory.mktemp("kernels") / "study"
    paths = bi.write_series(root / "sharp", convolution_kernel="B70f", series_number=2)
    _recon(paths, root / "smooth", "B40f", "smooth", series_number=3)
    return root


def test_smoother_reconstruction_is_chosen_and_said(two_kernels: Path):
    found = ctio.find_series(two_kernels)
    assert [s.kernel for s in found] == ["B70f", "B40f"]  # the sharp one first: picked before the rule
    choice = ctio.choose_series(found, selection=SELECTION)
    assert choice.info.kernel == "B40f" and choice.kernel_class == "smooth"
    assert "B40f (smooth) over B70f (sharp)" in choice.reason and "series_selection.kernel = smooth" in choice.reason
    scan = ctio.load_scan(two_kernels)
    assert scan.meta["convolution_kernel"] == "B40f" and scan.meta["series_choice"] == choice.reason
    # the rule is configurable
    sharp = ctio.choose_series(found, selection={**SELECTION, "kernel": "sharp"})
    assert sharp.info.kernel == "B70f"
    with pytest.raises(InputError, match="series_selection.kernel"):
        ctio.choose_series(found, selection={**SELECTION, "kernel": "softest"})


def test_series_command_prints_kernel_and_reason(two_kernels: Path):
    code, stdout, stderr = bi.run_in_process(["series", str(two_kernels)])
    assert code == 0, stderr
    assert "B70f (sharp)" in stdout and "B40f (smooth)" in stdout
    assert "chosen:" in stdout and "B40f (smooth) over B70f (sharp)" in stdout


def test_measures_record_kernel_and_choice(two_kernels: Path, tmp_path: Path):
    out = tmp_path / "out"
    code, stdout, stderr = bi.run_in_process(["quantify", str(two_kernels), "--out", str(out), "--method", "hu",
                                              "--device", "cpu"])
    assert code == 0, stderr
    prov = json.loads((out / "measures.json").read_text())["provenance"]
    assert prov["convolution_kernel"] == "B40f" and prov["kernel_class"] == "smooth"
    assert "over B70f (sharp)" in prov["series_choice"]
    assert prov["series_instance_uid"] == ph.uid_from("series", "smooth")


def test_real_philips_lung_and_standard_reconstructions(shared_data: Path, tmp_path: Path):
    """A0001 came with an L (lung) series upstream: a copy given kernel B and new UIDs is preferred."""
    source = shared_data / "real-ct" / "lung-pet-ct-dx-A0001"
    files = _files(source)
    study = tmp_path / "study"
    shutil.copytree(source, study / "L")
    _recon(files, study / "B", "B", "a0001-b", series_number=9)
    found = ctio.find_series(study)
    assert sorted(s.kernel for s in found) == ["B", "L"]
    choice = ctio.choose_series(found, selection=SELECTION)
    assert choice.info.kernel == "B"
    assert "B (smooth) over L (sharp)" in choice.reason


# -- item 4: several studies ---------------------------------------------------------------------------


def test_folder_with_two_studies_is_refused_unless_series_chooses(sample_dir: Path):
    found = ctio.find_series(sample_dir)
    assert len(found) == 2 and len({s.study_uid for s in found}) == 2
    with pytest.raises(InputError, match="2 different studies.*--series"):
        ctio.choose_series(found, selection=SELECTION)
    day14 = ctio.find_series(sample_dir / "day14")[0].series_uid
    choice = ctio.choose_series(found, day14, selection=SELECTION)
    assert choice.info.series_uid == day14 and choice.reason == "named with --series"
    code, _, stderr = bi.run_in_process(["quantify", str(sample_dir), "--out", "unused", "--method", "hu"])
    assert code == 3 and "different studies" in stderr


def test_equal_series_of_one_study_are_a_warning(tmp_path: Path, caplog):
    paths = bi.write_series(tmp_path / "study" / "a", convolution_kernel="B40f")
    _recon(paths, tmp_path / "study" / "b", "B40f", "copy", series_number=5)
    with caplog.at_level(logging.WARNING, logger="ctquant.io.scans"):
        choice = ctio.choose_series(ctio.find_series(tmp_path / "study"), selection=SELECTION)
    assert choice.info.series_uid == ph.uid_from("series", "main")
    assert any("2 equally suitable CT series" in r.getMessage() for r in caplog.records)
