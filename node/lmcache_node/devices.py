"""Which device the server serves, checked at start: a missing GPU is an error, not a surprise.

``--device cuda`` on a machine where CUDA cannot work exits at start with the reason (a
CPU-only torch, no driver library, no device visible) and what to check; ``--device auto``
takes CUDA when it works and says which it chose.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DRIVER_LIBRARY = "libcuda.so.1"


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used here; the message says why and what to check."""


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # cpu, cuda or xpu
    reason: str


@dataclass(frozen=True)
class CudaFacts:
    """What decides whether CUDA works here (injectable, so every branch is testable)."""

    torch_version: str
    torch_cuda: str | None  # torch.version.cuda: None for a CPU-only build
    available: bool
    driver_loadable: bool
    nvidia_visible: str | None
    cuda_visible: str | None

    @classmethod
    def probe(cls) -> CudaFacts:
        try:
            ctypes.CDLL(DRIVER_LIBRARY)
            driver = True
        except OSError:
            driver = False
        return cls(
            torch_version=torch.__version__,
            torch_cuda=torch.version.cuda,
            available=torch.version.cuda is not None and torch.cuda.is_available(),
            driver_loadable=driver,
            nvidia_visible=os.environ.get("NVIDIA_VISIBLE_DEVICES"),
            cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )


def cuda_problem(facts: CudaFacts | None = None) -> str | None:
    """Why CUDA cannot be used in this process, or None when it can."""
    facts = facts or CudaFacts.probe()
    if facts.torch_cuda is None:
        return (
            f"this PyTorch ({facts.torch_version}) is a CPU-only build: run the CUDA variant of "
            "the node image (lmcache-node:<version>-cuda)"
        )
    if facts.available:
        return None
    if not facts.driver_loadable:
        return (
            f"the NVIDIA driver library ({DRIVER_LIBRARY}) is not visible in this container: "
            "run the pod with runtimeClassName: nvidia (or on nodes whose default runtime is "
            f"nvidia's) and NVIDIA_VISIBLE_DEVICES=all (now: {facts.nvidia_visible!r})"
        )
    return (
        "the NVIDIA driver is present but no CUDA device is visible: check "
        f"NVIDIA_VISIBLE_DEVICES (now: {facts.nvidia_visible!r}; the cache pod needs 'all', "
        f"without requesting GPUs) and CUDA_VISIBLE_DEVICES (now: {facts.cuda_visible!r})"
    )


def xpu_problem() -> str | None:
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return None
    return f"this PyTorch ({torch.__version__}) sees no Intel XPU device"


def resolve_device(requested: str) -> DeviceChoice:
    """The device to serve for ``requested`` (cpu, cuda, xpu or auto); raises
    ``DeviceUnavailableError`` when an explicit GPU device cannot work."""
    if requested == "cpu":
        return DeviceChoice("cpu", "configured")
    if requested == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise DeviceUnavailableError(f"--device cuda, but CUDA is unavailable: {problem}")
        return DeviceChoice("cuda", "configured")
    if requested == "xpu":
        problem = xpu_problem()
        if problem is not None:
            raise DeviceUnavailableError(f"--device xpu, but XPU is unavailable: {problem}")
        return DeviceChoice("xpu", "configured")
    problem = cuda_problem()
    if problem is None:
        return DeviceChoice("cuda", "auto: CUDA is available")
    return DeviceChoice("cpu", f"auto: CUDA is not usable ({problem})")
