"""Parameters and gradients as one flat tensor, the form they travel in between driver and workers.

One contiguous buffer is one object-store entry and one copy, instead of a pickled dict of dozens of
small tensors; `Layout` remembers the names and shapes to rebuild the dict on the other side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Tensors) -> "Layout":
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def numel(self) -> int:
        return sum(_prod(s) for s in self.shapes)

    def flatten(self, tensors: Tensors) -> torch.Tensor:
        """The tensors of `tensors`, in this layout's order, concatenated into one 1-d tensor."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"tensors missing from the flat layout: {missing[:5]}")
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Tensors:
        """Views of `flat` with this layout's names and shapes."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat tensor has {flat.numel()} elements; the layout needs {self.numel}")
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = _prod(shape)
            out[name] = flat[offset:offset + n].view(shape)
            offset += n
        return out


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
