"""Small torch helpers the layers share: whether a submodule may be bypassed for speed, and
autocast switched off for work that must stay in the working precision."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

__all__ = ["bypassable", "without_autocast"]


def bypassable(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether code may use ``module``'s parameters directly instead of calling it: it is a
    ``cls`` itself (not a subclass, nor a quantised or parametrised replacement) and calling it
    would run no forward (pre-)hooks, its own or global ones. Otherwise the call must be made,
    so that hooks and replaced modules see it."""
    return type(module) is cls and not (
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


def without_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for x's device inside the block, where it is on: the m×m work and the
    landmarks must stay in the working precision (at least float32), which autocast would
    otherwise lower to float16/bfloat16 for every product. A no-op (no context switch) when
    autocast is off."""
    device = x.device.type
    # (Asking a device type without autocast, e.g. "meta", would raise.)
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
