"""TEST-ONLY shim: run megatron-core on CPU (gloo) by redirecting its hard CUDA calls.

megatron-core 0.19 assumes CUDA in a few places that a CPU run reaches (REFERENCES.md §1): the
model-parallel RNG tracker (``torch.cuda`` RNG states), buffers allocated on
``torch.cuda.current_device()``, ``device="cuda"`` literals and ``.cuda()`` calls in its
gradient-norm and buffer code, CUDA streams in its DDP, and ``tensor.type()`` checks against
``'torch.cuda.FloatTensor'`` in its optimizer wrappers. :func:`cpu_shim` patches exactly those
for the duration of a ``with`` block and restores everything on exit.

This makes the Megatron tests **CPU smoke tests**: they show that the adapter's layouts, the
sharding engine and the checkpoints are exact on a real megatron-core ``GPTModel``, not how
megatron-core behaves on a GPU (``tests/gpu/megatron_gpu_check.py`` runs one real step there).
It never ships in the package: nothing under ``archopt_plugins`` or ``integrations`` imports it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

# Set while the shim is active: the Megatron recipe runner refuses backend.device=cpu without it.
SHIM_ENV = "ARCHOPT_MEGATRON_CPU_SHIM"

_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "tensor", "rand", "randn", "randint")


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _cpu_device(*args: Any, **kwargs: Any) -> torch.device:
    return torch.device("cpu")


def _as_cpu(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cpu_shim() -> Iterator[None]:
    """Patch megatron-core's CUDA assumptions to CPU inside the block (test use only)."""
    from megatron.core.tensor_parallel import random as mrandom

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    original_type = torch.Tensor.type

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # megatron's optimizer wrappers accept only 'torch.cuda.*Tensor' type names
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        name = original_type(self)
        return _CUDA_TYPE_NAMES.get(name, name) if self.device.type == "cpu" else name

    def on_cpu(factory):
        def make(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _as_cpu(kwargs["device"])
            return factory(*args, **kwargs)
        return make

    patch(torch.cuda, "current_device", _cpu_device)
    patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    patch(torch.cuda, "Stream", _NullStream)
    patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    patch(torch.cuda, "synchronize", lambda *a, **k: None)
    patch(torch.cuda, "empty_cache", lambda *a, **k: None)
    patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    patch(torch.Tensor, "type", tensor_type)
    patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    for factory in _FACTORIES:  # tensors created with device="cuda" / current_device()
        patch(torch, factory, on_cpu(getattr(torch, factory)))
    previous = os.environ.get(SHIM_ENV)
    os.environ[SHIM_ENV] = "1"
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
        if previous is None:
            os.environ.pop(SHIM_ENV, None)
        else:
            os.environ[SHIM_ENV] = previous
