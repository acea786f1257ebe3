"""The shipped MONAI lesion model: loading, failure modes, volume segmentation, scoring, evaluation script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctquant import lesion_model as lm
from ctquant.config import MODEL_DIR, file_sha256
from ctquant.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = MODEL_DIR / "lesion_model.pt"


@pytest.fixture(scope="module")
def model() -> lm.LesionModel:
    torch.set_num_threads(2)
    return lm.load_lesion_model()


# --------------------------------------------------------------------------------- loading
def test_shipped_weights_load_with_provenance(model):
    assert model.path == SHIPPED
    assert model.sha256 == file_sha256(SHIPPED)
    assert model.classes == ("background", "ggo", "consolidation")
    assert model.hu_window == lm.DEFAULT_HU_WINDOW
    assert len(model.input_size) == 2 and min(model.input_size) >= 128
    assert model.metadata["architecture"]["name"] in ("UNet", "BasicUNet", "SegResNet", "AttentionUnet")
    assert not model.network.training
    assert SHIPPED.stat().st_size < 20 * 2**20  # a few MB at most


def test_missing_weight_file_is_model_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError) as info:
        lm.load_lesion_model(missing)
    assert info.value.path == str(missing) and str(missing) in str(info.value)
    assert "not found" in info.value.reason
    assert info.value.exit_code == 6


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weight_file_is_model_error(tmp_path, damage):
    bad = tmp_path / f"{damage}.pt"
    blob = SHIPPED.read_bytes()
    bad.write_bytes({"truncated": blob[: len(blob) // 2], "garbage": b"\x00not a checkpoint" * 64, "empty": b""}[damage])
    with pytest.raises(ModelError) as info:
        lm.load_lesion_model(bad)
    assert str(bad) in str(info.value)
    assert "corrupt" in info.value.reason


def test_incompatible_weights_are_model_error(tmp_path, model):
    metadata = dict(model.metadata)
    other = lm.build_network({"name": "UNet", "kwargs": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                                          "channels": [4, 8], "strides": [2]}})
    path = lm.save_lesion_model(other, tmp_path / "wrong.pt", metadata)  # weights of another shape
    with pytest.raises(ModelError) as info:
        lm.load_lesion_model(path)
    assert str(path) in str(info.value) and "incompatible" in info.value.reason

    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ModelError, match="not a ctquant lesion model"):
        lm.load_lesion_model(tmp_path / "foreign.pt")


# --------------------------------------------------------------------------- normalisation
def test_hu_to_unit_window():
    low, high = lm.DEFAULT_HU_WINDOW
    out = lm.hu_to_unit(np.array([-3000, low, -850, 40, high, 3000], dtype=np.int16))
    assert out.dtype == np.float32
    assert out[0] == 0.0 and out[1] == 0.0 and out[-2] == 1.0 and out[-1] == 1.0
    # lung parenchyma and soft tissue land where the 8-bit training exports have them (grey ~40 and ~214)
    assert 0.10 < out[2] < 0.20 and 0.78 < out[3] < 0.90


def test_image8_to_unit():
    out = lm.image8_to_unit(np.array([[0, 51, 255]], dtype=np.uint8))
    assert out.dtype == np.float32 and np.allclose(out, [[0.0, 0.2, 1.0]])


# ------------------------------------------------------------------------------- inference
def _phantom(shape=(6, 80, 96)):
    """A small HU volume: body at +40 HU, two lungs at -850 HU with a GGO-like (-500 HU) patch."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.full(shape, -1000, dtype=np.int16)
    body = ((y - 40) / 36.0) ** 2 + ((x - 48) / 46.0) ** 2 < 1
    hu[body] = 40
    lungs = (((y - 40) / 26.0) ** 2 + ((x - 26) / 16.0) ** 2 < 1) | (((y - 40) / 26.0) ** 2 + ((x - 70) / 16.0) ** 2 < 1)
    lungs &= (z >= 1) & (z <= 4)
    hu[lungs] = -850
    hu[lungs & (((y - 35) ** 2 + (x - 22) ** 2) < 60)] = -500
    return hu, lungs


def test_segment_lesions_shape_and_zero_outside_lung(model):
    hu, lungs = _phantom()
    labels = lm.segment_lesions(hu, lungs, model, batch_size=3)
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert not labels[~lungs].any()
    assert not labels[0].any() and not labels[5].any()  # slices without lung are not run
    # integer lung labels (1 right, 2 left) are accepted as a mask too
    again = lm.segment_lesions(hu, lungs.astype(np.uint8) * 2, model)
    assert np.array_equal(labels, again)  # deterministic on CPU


def test_segment_lesions_without_lung_is_empty(model):
    hu, _ = _phantom()
    labels = lm.segment_lesions(hu, np.zeros(hu.shape, bool), model)
    assert labels.shape == hu.shape and not labels.any()
    with pytest.raises(ValueError):
        lm.segment_lesions(hu, np.zeros((2, 3, 4), bool), model)


def test_lung_crop_box_margin():
    mask = np.zeros((5, 200, 300), bool)
    mask[1:4, 50:150, 100:200] = True
    zb, yb, xb = lm.lung_crop_box(mask, margin_fraction=0.1)
    assert (zb.start, zb.stop) == (1, 4)
    assert (yb.start, yb.stop) == (40, 160) and (xb.start, xb.stop) == (90, 210)
    assert lm.lung_crop_box(np.zeros((2, 4, 4), bool)) is None


def test_predict_slices_any_size(model):
    rng = np.random.default_rng(0)
    slices = rng.random((2, 100, 70), dtype=np.float32)
    labels = lm.predict_slices(model, slices, batch_size=1)
    assert labels.shape == (2, 100, 70) and labels.dtype == np.uint8


# ------------------------------------------------------------------------------------ Dice
def test_dice_convention():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1:3, 1:3] = True
    assert lm.dice_score(empty, empty) == 1.0  # absent from both
    assert lm.dice_score(some, empty) == 0.0  # absent from the label only
    assert lm.dice_score(empty, some) == 0.0  # absent from the prediction only
    assert lm.dice_score(some, some) == 1.0
    half = empty.copy()
    half[1:3, 1] = True
    assert lm.dice_score(half, some) == pytest.approx(2 * 2 / (2 + 4))

    pred = np.array([[0, 1, 1], [0, 0, 0]])
    ref = np.array([[0, 1, 2], [0, 0, 0]])
    scores = lm.class_dice(pred, ref)
    assert scores["dice_ggo"] == pytest.approx(2 / 3)
    assert scores["dice_consolidation"] == 0.0
    assert scores["dice_lesion"] == 1.0
    assert lm.class_dice(np.zeros((2, 2)), np.zeros((2, 2))) == {
        "dice_ggo": 1.0, "dice_consolidation": 1.0, "dice_lesion": 1.0}


def test_dice_matches_monai_metric():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(1)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for _ in range(5):
        pred = rng.integers(0, 3, (12, 12))
        ref = rng.integers(0, 2, (12, 12))  # no consolidation in the reference
        onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), 3).permute(2, 0, 1)[None]  # noqa: E731
        monai_scores = metric(onehot(pred), onehot(ref))[0].numpy()
        ours = lm.class_dice(pred, ref)
        assert monai_scores == pytest.approx([ours["dice_ggo"], ours["dice_consolidation"]], abs=1e-6)


# ---------------------------------------------------------------------------- MONAI bundle
def test_bundle_config_builds_network_and_loads_shipped_weights(model):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(REPO_ROOT / "configs" / "inference.json")
    parser["bundle_root"] = str(REPO_ROOT)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    parser.get_parsed_content("load_weights")
    network.eval()
    x = torch.rand(1, 1, *model.input_size)
    with torch.inference_mode():
        assert torch.allclose(network(x), model.network(x), atol=1e-5)
    metadata = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    spec = metadata["network_data_format"]
    assert spec["inputs"]["image"]["spatial_shape"] == list(model.input_size)
    assert spec["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "ggo", "2": "consolidation"}


# ------------------------------------------------------------------------- evaluate script
def test_evaluate_script_on_real_slices(shared_data, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("2", "12", "20"):  # held-out slices; 2 has no consolidation
        shutil.copy(shared_data / "medseg-2d" / "images" / f"{name}.jpg", images)
        shutil.copy(shared_data / "medseg-2d" / "labels" / f"{name}.png", labels)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "evaluate_lesion_model.py"),
                           "--images", str(images), "--labels", str(labels), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["n_images"] == 3 and len(result["per_image"]) == 3
    for key in ("dice_ggo", "dice_consolidation", "dice_lesion"):
        assert 0.0 <= result[key] <= 1.0
        assert all(0.0 <= row[key] <= 1.0 for row in result["per_image"])
        assert result[key] == pytest.approx(np.mean([row[key] for row in result["per_image"]]), abs=1e-3)
    assert result["model"]["sha256"] == file_sha256(SHIPPED)
    assert "lesion_area_error_pct" in result["per_image"][0]
    assert "mean" in proc.stdout
