"""Which device and which arithmetic precision a computation runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from dkgm.errors import DKGMError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device, key: str = "the stage's device") -> torch.device:
    """`auto` -> CUDA when present, else the CPU; `cpu`, `cuda`, `cuda:N` as given. A device this
    machine lacks is one line naming `key` (the params key that chose it) and the fix. A CUDA
    device comes back configured for the pipeline's work (configure_cuda)."""
    import torch

    if isinstance(device, torch.device):
        return configure_cuda(device)
    if device == "auto":
        return configure_cuda(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DKGMError(f"{key}: {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DKGMError(f"{key}: {device!r} but this machine has no CUDA device: set {key} to auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DKGMError(f"{key}: {device!r} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                        f"set {key} to auto or a smaller index")
    return configure_cuda(dev)


def _set_fp32_precision(matmul: str, conv: str) -> None:
    """TF32 on or off through the per-backend precision settings (torch >= 2.9), falling back
    to the legacy allow_tf32 flags on older torch."""
    import torch

    cuda_matmul, cudnn_conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(cuda_matmul, "fp32_precision") and hasattr(cudnn_conv, "fp32_precision"):
        cuda_matmul.fp32_precision = matmul
        cudnn_conv.fp32_precision = conv
    else:  # pragma: no cover - torch < 2.9
        cuda_matmul.allow_tf32 = matmul == "tf32"
        torch.backends.cudnn.allow_tf32 = conv == "tf32"


def configure_cuda(device: torch.device) -> torch.device:
    """On a CUDA device: float32 matmuls and convolutions in TF32 (the network's fp32 parts; the
    distance passes opt out with exact_fp32) and cudnn.benchmark (every stage runs fixed shapes
    many times). A no-op on the CPU."""
    import torch

    if device.type == "cuda":
        _set_fp32_precision("tf32", "tf32")
        torch.backends.cudnn.benchmark = True
    return device


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Full float32 matmuls inside the block, whatever the stage set: no TF32 on CUDA, no bf16
    rounding on CPUs with AMX (the per-backend `fp32_precision` API only: torch raises when it is
    mixed with the legacy set_float32_matmul_precision). Nearest-neighbour and bandwidth passes
    rank distances whose differences TF32's 10-bit mantissa would blur."""
    import torch

    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if not backends:  # pragma: no cover - torch < 2.9
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        return
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


@cache
def cpu_has_bf16() -> bool:
    """Whether the CPU reports bf16 arithmetic units (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes in bf16 natively (compute capability 8.0 and later)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(choice: str, device: torch.device, key: str = "the stage's precision") -> str:
    """auto: bf16 autocast on CUDA devices with bf16 units and on CPUs with them (measured on an
    AVX512-BF16 CPU: 1.7-2.1x the fp32 training throughput of the default U-Net, 2.4x its sampling
    throughput); fp32 elsewhere. An explicit bf16 on a GPU without bf16 units is one line naming
    `key` (emulated bf16 would be slower than fp32)."""
    import torch

    if choice == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise DKGMError(f"{key}: bf16 but {torch.cuda.get_device_name(device)} has no bf16 units: set {key} to "
                        "auto or fp32")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun sets them (0, 1 when run alone)."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(choice: str, key: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun, the process group started (NCCL on CUDA, bound to
    this rank's GPU first, else gloo); (0, 1, resolve_device(choice)) when run alone."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(choice, key)
    use_cuda = torch.cuda.is_available() and choice != "cpu"
    device = torch.device("cpu")
    if use_cuda:  # bind this process to its GPU before NCCL starts, or every rank's communicator lands on GPU 0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        if use_cuda:
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), world, resolve_device(device)
