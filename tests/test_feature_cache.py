"""The feature cache (dkgm.feature_cache): rows keyed by image content and by the feature network;
what it answers equals what the network computes, and it computes only what it has not seen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkgm import feature_cache as fc
from dkgm import inception


def _net(stub_features, tmp_path, probs: bool = False) -> inception.InceptionFeatures:
    w = inception.Weights(str(stub_features), stub_features.name, inception.sha256_file(stub_features), True,
                          "test", probs)
    net = inception.InceptionFeatures(w, "cpu")
    if probs:  # a classifier head on the stub's features: the IS probabilities go through the cache too
        net._output = torch.nn.Linear(inception.FEATURE_DIM, 11, bias=False)
        torch.nn.init.normal_(net._output.weight, generator=torch.Generator().manual_seed(0))
    net.use_cache(tmp_path)
    return net


def _counting(net: inception.InceptionFeatures) -> list[int]:
    """Record how many images each call really sends through the network."""
    seen: list[int] = []
    compute = net._compute

    def wrapped(images, batch_size, progress):
        seen.append(len(images))
        return compute(images, batch_size, progress)

    net._compute = wrapped
    return seen


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("probs", [False, True])
def test_cached_rows_equal_computed_rows_and_only_new_images_are_computed(stub_features, tmp_path, probs):
    net = _net(stub_features, tmp_path, probs)
    seen = _counting(net)
    a, b = _images(0, 7), _images(1, 5)
    first = net(a, batch_size=4)
    assert seen == [7] and net.cache.misses == 7 and net.cache.hits == 0
    mixed = np.concatenate([a[[5, 0, 3]], b, a[[1]]])
    progress: list[int] = []
    second = net(mixed, batch_size=4, progress=progress.append)
    assert seen == [7, 5] and net.cache.hits == 4  # only b went through the network
    assert progress[-1] == len(mixed)
    np.testing.assert_array_equal(second.features[:3], first.features[[5, 0, 3]])  # answered from disk: exact
    np.testing.assert_array_equal(second.features[-1], first.features[1])
    plain = inception.InceptionFeatures(net.weights, "cpu")  # no cache: the reference answer
    plain._output = net._output
    ref = plain(mixed, batch_size=4)
    np.testing.assert_allclose(second.features, ref.features, rtol=0, atol=1e-5)  # other batches: float32 noise
    if probs:
        assert second.probs is not None and second.probs.shape == (len(mixed), 11)
        np.testing.assert_allclose(second.probs, ref.probs, rtol=0, atol=1e-5)
    else:
        assert second.probs is None
    # a new process (a new cache object over the same folder) sees the stored rows
    again = _net(stub_features, tmp_path, probs)
    seen_again = _counting(again)
    np.testing.assert_array_equal(again(mixed).features, second.features)
    assert seen_again == [0] and again.cache.hits == len(mixed)


def test_keys_follow_every_byte_the_shape_and_the_network():
    x = _images(2, 3)
    y = x.copy()
    y[1, 0, 27, 27] ^= 1  # one bit of one pixel
    kx, ky = fc.image_keys(x), fc.image_keys(y)
    assert (kx[0] == ky[0]).all() and (kx[2] == ky[2]).all() and not (kx[1] == ky[1]).all()
    assert not (fc.image_keys(x.reshape(3, 1, 14, 56))[0] == kx[0]).all()  # same bytes, another shape
    base = fc.network_key("a" * 64, "matrix", "cpu", code="c")
    assert len({base, fc.network_key("b" * 64, "matrix", "cpu", code="c"), fc.network_key("a" * 64, "pil", "cpu", code="c"),
                fc.network_key("a" * 64, "matrix", "cuda", code="c"), fc.network_key("a" * 64, "matrix", "cpu", code="d")}) == 5
    assert fc.network_key("a" * 64, "matrix", "cpu") == fc.network_key("a" * 64, "matrix", "cpu")  # this file's code
    with pytest.raises(TypeError, match="uint8"):
        fc.image_keys(x.astype(np.float32))


def test_a_corrupt_shard_is_recomputed_not_trusted(stub_features, tmp_path):
    net = _net(stub_features, tmp_path)
    x = _images(3, 4)
    first = net(x)
    (shard,) = net.cache.dir.glob("*.npz")
    shard.write_bytes(b"not an npz")
    fresh = _net(stub_features, tmp_path)
    seen = _counting(fresh)
    np.testing.assert_allclose(fresh(x).features, first.features, atol=1e-5)
    assert seen == [4] and not list(fresh.cache.dir.glob(".*.tmp.npz"))  # no temporary left behind


def test_the_environment_moves_or_turns_off_the_cache(stub_features, tmp_path, monkeypatch):
    monkeypatch.setenv(fc.ENV, "off")
    assert fc.cache_dir(tmp_path) is None and _net(stub_features, tmp_path).cache is None
    monkeypatch.setenv(fc.ENV, str(tmp_path / "elsewhere"))
    net = _net(stub_features, tmp_path / "project")
    net(_images(4, 2))
    assert list((tmp_path / "elsewhere").rglob("*.npz")) and not (tmp_path / "project").exists()
    monkeypatch.delenv(fc.ENV)
    assert fc.cache_dir(tmp_path) == tmp_path / ".dkgm" / "features"
