"""One cache of feature rows, keyed by the content of each image and by the feature network.

Scoring is the expensive half of evaluation on a CPU (the Inception network runs at ~7 images/s
on 2 cores), and the same images are often scored more than once: the comparison re-draws the
rows that refine and sample_baseline already drew (same network, seeds and sampler: the same
bytes), and a stage re-run after an edit elsewhere featurises what it featurised before. The
cache answers those from disk and computes only what it has not seen.

Keys:
- an image: BLAKE2b-128 of its uint8 bytes and its shape (what the network sees is a function of
  exactly these: the resize and the normalisation are fixed by the network's key);
- the network: the weights' SHA-256, the resize, the device type and torch's version (another
  device or build gives other last digits) and a digest of this package's `inception.py` source,
  so that a change to the preprocessing or the feature code can never be answered with old rows.

Storage: `<dir>/<network key>/<shard>.npz`, one shard per call that computed anything (keys,
features and, with the full network, the IS probabilities), each written to a temporary name and
renamed into place, so a crash leaves no half shard and two processes writing at once only
duplicate rows. The folder is `.dkgm/features/` under the project (git and DVC ignore `.dkgm/`);
`DKGM_FEATURE_CACHE` names another folder, or `off` turns the cache off. It holds nothing that
cannot be recomputed: delete it at any time.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

ENV = "DKGM_FEATURE_CACHE"
DEFAULT_DIR = Path(".dkgm") / "features"
KEY_BYTES = 16


def image_keys(images: np.ndarray) -> np.ndarray:
    """(N, KEY_BYTES) uint8: BLAKE2b of each image's bytes and shape (uint8 images only)."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"image_keys expects uint8 images, got {images.dtype}")
    shape = repr(images.shape[1:]).encode()
    out = np.empty((len(images), KEY_BYTES), np.uint8)
    for i, img in enumerate(images):
        h = hashlib.blake2b(img.tobytes(), digest_size=KEY_BYTES)
        h.update(shape)
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def network_key(weights_sha256: str, resize: str, device: str, code: str | None = None) -> str:
    """The feature network's part of the key (hex, 24 characters)."""
    if code is None:
        code = hashlib.sha256((Path(__file__).parent / "inception.py").read_bytes()).hexdigest()
    text = "\n".join((weights_sha256, resize, device, code))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_dir(root: str | Path) -> Path | None:
    """Where the cache lives for a project at `root`: DKGM_FEATURE_CACHE, or `.dkgm/features`; None when off."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    return Path(env).expanduser() if env else Path(root) / DEFAULT_DIR


class FeatureCache:
    """Feature rows (and optional probabilities) by image key, for one feature network."""

    def __init__(self, directory: str | Path, key: str):
        self.dir = Path(directory) / key
        self.key = key
        self._index: dict[bytes, tuple[Path, int]] | None = None
        self._loaded: dict[Path, dict[str, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    def _shards(self) -> list[Path]:
        return sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []

    def index(self) -> dict[bytes, tuple[Path, int]]:
        if self._index is None:
            self._index = {}
            for shard in self._shards():
                try:
                    with np.load(shard) as z:
                        keys = z["keys"]
                except Exception:  # noqa: BLE001 - a shard that cannot be read is recomputed, not trusted
                    continue
                for row, k in enumerate(keys):
                    self._index.setdefault(k.tobytes(), (shard, row))
        return self._index

    def _shard(self, path: Path) -> dict[str, np.ndarray]:
        if path not in self._loaded:
            with np.load(path) as z:
                self._loaded[path] = {name: z[name] for name in z.files}
        return self._loaded[path]

    def lookup(self, keys: np.ndarray, with_probs: bool) -> tuple[np.ndarray, list[np.ndarray | None], list]:
        """(hit mask, feature rows of the hits (None where missed), their probabilities)."""
        index = self.index()
        hit = np.zeros(len(keys), bool)
        feats: list[np.ndarray | None] = [None] * len(keys)
        probs: list[np.ndarray | None] = [None] * len(keys)
        for i, k in enumerate(keys):
            where = index.get(k.tobytes())
            if where is None:
                continue
            try:
                shard = self._shard(where[0])
            except Exception:  # noqa: BLE001 - gone or corrupt since indexed: compute it again
                continue
            if with_probs and "probs" not in shard:
                continue
            feats[i] = shard["features"][where[1]]
            probs[i] = shard["probs"][where[1]] if with_probs else None
            hit[i] = True
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        return hit, feats, probs

    def store(self, keys: np.ndarray, features: np.ndarray, probs: np.ndarray | None) -> None:
        """Add rows as one new shard (atomic: a temporary name renamed into place)."""
        if not len(keys):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        tmp, final = self.dir / f".{name}.tmp.npz", self.dir / f"{name}.npz"
        arrays = {"keys": np.asarray(keys, np.uint8), "features": np.asarray(features, np.float32)}
        if probs is not None:
            arrays["probs"] = np.asarray(probs, np.float32)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, final)
        except OSError:  # a full disk or a read-only folder: the cache is an optimisation, never a failure
            tmp.unlink(missing_ok=True)
            return
        if self._index is not None:
            for row, k in enumerate(arrays["keys"]):
                self._index.setdefault(k.tobytes(), (final, row))
