"""How much memory a piece of torch work adds at its peak, measured rather than guessed.

`PeakMemory(device)` is a context manager; after the block, `.peak` is the most bytes the block had
allocated at once beyond what existed before it:
- CUDA: the caching allocator's own counter (`torch.cuda.max_memory_allocated`, reset on entry);
- CPU: PyTorch keeps no such counter, so every storage an operation returns inside the block is
  recorded, through a `TorchDispatchMode`, with its size, and forgotten when torch frees it (storages
  keep their Python object for as long as they live, so a finalizer on it runs exactly then). That
  sees the tensors autograd saves for backward and the ones the backward pass makes (it runs on the
  calling thread on CPU), not the allocator's slack, nor memory outside PyTorch.
The CPU tracker adds Python work to every operation: time the same work outside it.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class _StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Storages the operation was given (in place, out=, views of them) are not new, even when they
        # were made before the block.
        given = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in given and storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, nbytes)
        return out


class PeakMemory:
    """Context manager: `.peak` bytes the block allocated at most at once (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0
        self._tracker: _StorageTracker | None = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._tracker = _StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc)
            self.peak = self._tracker.peak


def free_bytes(device: torch.device) -> int:
    """Memory a run could still take on `device`: the GPU's free memory, or on the CPU the kernel's
    estimate of what can be allocated without swapping (MemAvailable; the whole of RAM without it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


HEADROOM = 0.8
"""The share of the free memory a task's estimated peak may take before `inner.checkpoint: auto` turns
checkpointing on (the rest for the allocator's slack, other processes and the estimate's error)."""


def estimated_peak(peak_one_step: int, peak_two_steps: int, steps: int) -> int:
    """One task's peak at `steps` inner steps without checkpointing, from measured peaks at 1 and 2: it
    grows by a step's kept activations per step (bench/memory.py shows the line)."""
    return peak_one_step + (steps - 1) * max(peak_two_steps - peak_one_step, 0)


def needs_checkpoint(peak_one_step: int, peak_two_steps: int, steps: int, free: int) -> bool:
    """Whether a task's estimated peak at `steps` steps exceeds `HEADROOM` of `free` bytes."""
    return estimated_peak(peak_one_step, peak_two_steps, steps) > HEADROOM * free
