"""Dataset loaders, splits, conversions and the swiss roll's geometry."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from dkgm import data as ds
from dkgm.errors import DKGMError
from dkgm.figures import image_grid


def test_mnist5k_is_the_real_digits():
    images, labels = ds.load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert np.all(np.bincount(labels) > 400)  # roughly balanced classes
    # MNIST digits: dark background, ink in the centre
    assert images[:, :, :3, :].mean() < 1.0 and images[:, :, 10:18, 10:18].mean() > 60


def test_missing_or_malformed_digits_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.csv.gz"
    with pytest.raises(DKGMError, match="nope.csv.gz"):
        ds.load_mnist5k(missing)
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    with pytest.raises(DKGMError, match="785 columns"):
        ds.load_mnist5k(bad)


def test_uint8_float_round_trip_is_exact():
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    f = ds.to_float(every)
    assert f.min() == -1.0 and f.max() == 1.0
    np.testing.assert_array_equal(ds.to_uint8(f), every)
    np.testing.assert_array_equal(ds.to_uint8(np.array([-3.0, 3.0])), [0, 255])  # clipped


def test_padding_centres_the_image():
    img = np.full((2, 1, 28, 28), 7, np.uint8)
    out = ds.pad_images(img, 32)
    assert out.shape == (2, 1, 32, 32)
    assert out[:, :, 2:30, 2:30].min() == 7 and out.sum() == img.sum()
    with pytest.raises(DKGMError):
        ds.pad_images(img, 20)


def test_split_is_deterministic_disjoint_and_sized():
    a = ds.split_assignment(1000, 0.1, 0.2, seed=3)
    b = ds.split_assignment(1000, 0.1, 0.2, seed=3)
    c = ds.split_assignment(1000, 0.1, 0.2, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a == "val").sum() == 100 and (a == "test").sum() == 200 and (a == "train").sum() == 700
    with pytest.raises(DKGMError, match="sum below 1"):
        ds.split_assignment(10, 0.5, 0.5, 0)


def test_swissroll_distance_known_answers():
    roll = ds.SwissRoll(noise=0.0)
    t = np.linspace(roll.t_min, roll.t_max, 50)
    on_curve = roll.curve(t)
    assert ds.SwissRoll().distance(on_curve).max() < 1e-3
    # step off the curve along its normal by 0.05 (the spiral's arms are ~1.2 apart)
    tangent = np.stack([np.cos(t) - t * np.sin(t), np.sin(t) + t * np.cos(t)], -1)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], -1) / np.linalg.norm(tangent, axis=1, keepdims=True)
    np.testing.assert_allclose(roll.distance(on_curve + 0.05 * normal), 0.05, atol=1e-3)
    pts, tt = ds.SwissRoll(noise=0.1).sample(4000, seed=0)
    assert pts.dtype == np.float32 and tt.min() >= roll.t_min and tt.max() <= roll.t_max
    # Gaussian noise of std s in 2-D: mean distance to a (locally straight) curve is s * sqrt(2/pi)
    assert ds.SwissRoll().distance(pts).mean() == pytest.approx(0.1 * math.sqrt(2 / math.pi), rel=0.08)


def test_image_grid_layout():
    imgs = np.stack([np.full((1, 3, 3), i, np.uint8) for i in range(5)])
    grid = image_grid(imgs, ncol=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[9, 1, 0] == 4 and grid[9, 5, 0] == 255


@pytest.mark.parametrize("n, c, ncol, pad", [(5, 1, 2, 1), (7, 3, 3, 2), (2, 1, 8, 2), (9, 3, None, 0)])
def test_image_grid_matches_torchvision_make_grid(n, c, ncol, pad):
    torch = pytest.importorskip("torch")
    make_grid = pytest.importorskip("torchvision.utils").make_grid
    imgs = np.random.default_rng(n).integers(0, 256, (n, c, 4, 5), dtype=np.uint8)
    ref = make_grid(torch.from_numpy(imgs), nrow=ncol or 3, padding=pad, pad_value=255)[:c].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(image_grid(imgs, ncol=ncol, pad=pad), ref)


def test_labeled_grid_scales_tiles_and_draws_labels_in_its_margins():
    from dkgm.errors import DKGMError
    from dkgm.figures import labeled_grid

    value = lambda r, c: 10 * (3 * r + c) + 5  # noqa: E731
    rows = [np.stack([np.full((1, 28, 28), value(r, c), np.uint8) for c in range(n)]) for r, n in ((0, 3), (1, 2))]
    out = labeled_grid(rows, ["first", "second"], ["a", "b", "c"])
    assert out.ndim == 3 and out.shape[2] == 1  # grey stays grey
    scale = 2  # 28 px tiles are doubled (closest to 56 px)
    h, w = (2 * 30 + 2) * scale, (3 * 30 + 2) * scale  # image_grid with pad 2, then scaled
    top, left = out.shape[0] - h, out.shape[1] - w
    assert top > 0 and left > 0
    for r in range(2):
        for c in range(3):
            y, x = top + (2 + 30 * r + 14) * scale, left + (2 + 30 * c + 14) * scale
            expected = 255 if (r, c) == (1, 2) else value(r, c)  # the short row is padded with white
            assert out[y - 20 : y + 20, x - 20 : x + 20, 0].tolist() == [[expected] * 40] * 40, (r, c)
    # each row's label sits in the left margin at the height of its row, each column's above it
    for r in range(2):
        band = out[top + (2 + 30 * r) * scale : top + (30 + 30 * r) * scale, :left, 0]
        assert (band < 128).any()
    for c in range(3):
        assert (out[:top, left + (2 + 30 * c) * scale : left + (30 + 30 * c) * scale, 0] < 128).any()
    assert labeled_grid(rows, ["first", "second"]).shape[0] == h  # no column labels: no top margin
    with pytest.raises(DKGMError, match="2 rows but 1 row labels"):
        labeled_grid(rows, ["first"])
