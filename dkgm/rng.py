"""Per-sample random streams.

Every generated sample s owns a seed (base seed + s). Its anchor, its kernel noise and
every later noise draw come from generators derived from that seed alone, so sample s is
bit-identical whatever the batch size, batch order or device count.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named stream of one sample (independent streams per name)."""
    if seed < 0:
        raise ValueError(f"seeds must be non-negative, got {seed}")
    state = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def sample_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one sample's named stream."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stream_seed(seed, stream))
    return gen


def sample_generators(seeds: Sequence[int], stream: str) -> list[torch.Generator]:
    return [sample_generator(int(s), stream) for s in seeds]


def randn_per_sample(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` from each sample's generator (CPU, float32)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
