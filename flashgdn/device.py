"""GPU gating: which compute capabilities the kernels are built for, and cached device facts."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .kernels import policy

# compute capability -> CuTe DSL target. Hopper is verified on hardware; Blackwell (SM100/SM103)
# is compiled in CI and correct by construction, but not yet run on hardware.
SUPPORTED_ARCHS = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_103a"}


class UnsupportedGPUError(RuntimeError):
    pass


class DeviceFacts(NamedTuple):
    """What kernel selection reads of a device: its target, SM count (the batch regime) and the
    name of its tuning table (kernels.policy.device_class)."""

    arch: str
    sm_count: int
    device_class: str


@functools.lru_cache(maxsize=None)
def device_facts(index: int) -> DeviceFacts:
    """DeviceFacts of CUDA device `index`; raises for GPUs we do not build for."""
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    arch = SUPPORTED_ARCHS.get(cc)
    if arch is None:
        supported = ", ".join(f"SM{a}{b}" for a, b in SUPPORTED_ARCHS)
        raise UnsupportedGPUError(
            f"flashgdn kernels support {supported} (Hopper H100/H200, Blackwell B200/B300); "
            f"{props.name} is SM{cc[0]}{cc[1]}, which is not supported"
        )
    sms = props.multi_processor_count
    return DeviceFacts(arch, sms, policy.device_class(arch, sms, props.total_memory / 2**30))


def unavailable_reason() -> "str | None":
    """None when flashgdn's kernels can run on the current CUDA device, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) not in SUPPORTED_ARCHS:
        supported = ", ".join(f"SM{a}{b}" for a, b in SUPPORTED_ARCHS)
        return f"{torch.cuda.get_device_name()} is SM{major}{minor}; flashgdn supports {supported}"
    return None


def facts_of(device: torch.device) -> DeviceFacts:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device_facts(index)
