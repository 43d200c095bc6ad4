"""The data-kind objects: storage round trips, the distance to the data, the arch check, unknown kinds."""

from __future__ import annotations

import numpy as np
import pytest

from dkgm.data import SwissRoll
from dkgm.errors import DKGMError
from dkgm.kinds import IMAGES, KINDS, POINTS, kind_of


def test_images_store_and_load_round_trip_on_the_pixel_grid():
    u = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    x = IMAGES.load(u)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(IMAGES.store(x), u)
    assert IMAGES.store(np.array([[-3.0, 3.0, 0.001]])).tolist() == [[0, 255, 128]]  # clipped and rounded
    noisy = x + np.float32(0.003)  # between grid values: as_saved snaps it to what a saved sample holds
    assert np.array_equal(IMAGES.as_saved(noisy), IMAGES.as_saved(IMAGES.as_saved(noisy)))
    assert np.array_equal(IMAGES.as_saved(u), x)


def test_points_are_stored_as_float32_unchanged():
    p = np.array([[0.25, -1.5], [3.0, 2.0]])
    assert POINTS.store(p).dtype == np.float32 and np.array_equal(POINTS.load(POINTS.store(p)), p.astype(np.float32))
    assert np.array_equal(POINTS.as_saved(p), p.astype(np.float32))


def test_distance_to_the_data_and_refines_summary():
    x, anchors = np.zeros((2, 1, 2, 2), np.float32), np.stack([np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.5)])
    assert IMAGES.distance_to_data(x, anchors, None).tolist() == [0.0, 0.5]  # RMS per pixel to the own anchor
    roll = SwissRoll()
    on = roll.curve(np.array([roll.t_min, roll.t_max]))
    assert np.allclose(POINTS.distance_to_data(on, None, roll), 0.0, atol=1e-5)
    assert IMAGES.progress_metrics(np.array([0.4, 0.1]), None, lambda: pytest.fail("images need no training set")) == {
        "kde_rms_distance_to_anchor": 0.4, "rms_distance_to_anchor": 0.1}
    m = POINTS.progress_metrics(np.array([0.4, 0.1]), roll, lambda: on)
    assert m["manifold_distance_reduction"] == pytest.approx(4.0) and m["train_mean_distance_to_manifold"] < 1e-5


def test_arch_check_and_unknown_kind_are_one_line_errors():
    IMAGES.check_arch("unet", "mnist5k")
    POINTS.check_arch("mlp", "swissroll")
    with pytest.raises(DKGMError, match=r"debiaser.arch mlp does not fit mnist5k \(images\): use unet or dae"):
        IMAGES.check_arch("mlp", "mnist5k")
    with pytest.raises(DKGMError, match=r"data/prepared/meta.json: unknown data kind 'voxels'"):
        kind_of("voxels", "data/prepared/meta.json")
    assert set(KINDS) == {"images", "points"} and str(IMAGES) == "images"


def test_sample_figures(tmp_path):
    from PIL import Image

    u = np.zeros((20, 1, 4, 4), np.uint8)
    IMAGES.sample_figure(tmp_path / "grid.png", u, None, "samples", limit=16)
    assert Image.open(tmp_path / "grid.png").size == (8 * 6 + 2, 2 * 6 + 2)  # 16 tiles of 4 px, 8 a row, 2 px pads
    POINTS.sample_figure(tmp_path / "scatter.png", np.random.default_rng(0).normal(size=(50, 2)), np.zeros((5, 2)),
                         "refined", manifold=SwissRoll(), title="t")
    assert Image.open(tmp_path / "scatter.png").size[0] > 100
