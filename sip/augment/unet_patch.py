"""Swapping a UNet's module ``forward`` methods for the length of one pipeline call: the mechanism that feature
caching (:mod:`sip.augment.unet_cache`) and token merging (:mod:`sip.augment.token_merge`) share, in its own
module so that neither imports the other for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

_MISSING = object()


@contextmanager
def patched_forwards(unet: nn.Module, modules: list[nn.Module], wrap: Callable[[int, Callable], Callable],
                     on_call: Callable) -> Iterator[None]:
    """For the block: module ``i``'s forward becomes ``wrap(i, forward)`` and ``on_call(unet, args, kwargs)``
    runs before every UNet call; everything is restored on exit, even after an error."""
    patched: list[tuple[nn.Module, Any]] = []
    hook = unet.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        for index, module in enumerate(modules):
            # keep what was there: accelerate's offload hooks, for one, set an instance ``forward``
            patched.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = wrap(index, module.forward)
        yield
    finally:
        hook.remove()
        for module, previous in reversed(patched):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous
