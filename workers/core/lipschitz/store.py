"""Local-Lip's saved iterate vectors (Section 3.3, Table 1 "using saved u"): for every training
example and every affine layer the last power-iteration vector u, kept off the accelerator in low
precision (float16; it only seeds the next power iteration, so precision matters little).

In host memory by default; with a `directory`, in memory-mapped files there (one per layer,
`layer<k>-<rows>x<width>.f16`, sparse until written), for stores larger than the RAM one wants to
spend (CIFAR-10 with 6C2F: 114,176 values per example, 11.4 GB for 50,000 examples). Rows grow
as new example indices appear; a row never written is all zeros, which the caller treats as
"no saved vector".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .network import Network

_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}


class IterateStore:
    def __init__(self, dtype: torch.dtype = torch.float16, directory: str | Path | None = None):
        if directory is not None and dtype not in _NUMPY:
            raise ValueError(f"a memory-mapped store holds float16 or float32, not {dtype}")
        self.dtype = dtype
        self.directory = None if directory is None else Path(directory)
        self.tables: dict[int, torch.Tensor] = {}

    def _new_table(self, layer: int, rows: int, width: int) -> torch.Tensor:
        if self.directory is None:
            return torch.zeros((rows, width), dtype=self.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"layer{layer}-{rows}x{width}.f16"
        # a new file reads as zeros; the tensor shares the mapping, so writes go to the file
        return torch.from_numpy(np.memmap(path, dtype=_NUMPY[self.dtype], mode="w+",
                                          shape=(rows, width)))

    def _drop(self, layer: int, table: torch.Tensor) -> None:
        if self.directory is not None:
            (self.directory / f"layer{layer}-{table.shape[0]}x{table.shape[1]}.f16").unlink(
                missing_ok=True)

    def get(self, layer: int, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The saved vectors of the examples `index` (float32, (B, *shape)); zeros for examples
        never saved; None when nothing of this layer and width is saved."""
        table = self.tables.get(layer)
        width = int(torch.Size(shape).numel())
        if table is None or table.shape[1] != width:
            return None
        index = index.cpu()
        out = table[index.clamp_max(table.shape[0] - 1)].float()
        out[index >= table.shape[0]] = 0
        return out.view(len(index), *shape)

    def put(self, layer: int, index: torch.Tensor, u: torch.Tensor) -> None:
        flat = u.detach().flatten(1).to("cpu", self.dtype)
        table = self.tables.get(layer)
        needed = int(index.max()) + 1
        if table is None or table.shape[1] != flat.shape[1]:
            if table is not None:
                self._drop(layer, table)
            table = self._new_table(layer, needed, flat.shape[1])
        elif table.shape[0] < needed:  # grow geometrically: a few copies over the first epoch
            grown = self._new_table(layer, max(needed, 2 * table.shape[0]), flat.shape[1])
            grown[:table.shape[0]] = table
            self._drop(layer, table)
            table = grown
        table[index.cpu()] = flat
        self.tables[layer] = table

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    @staticmethod
    def size_for(network: Network, examples: int, dtype: torch.dtype = torch.float16) -> int:
        """Bytes the store takes for `examples` training examples: one input-shaped vector per
        affine layer and example."""
        per_example = sum(stage.affine.in_numel for stage in network.stages)
        return per_example * examples * torch.empty((), dtype=dtype).element_size()

    def state_dict(self) -> dict:
        return {str(k): v.clone() for k, v in self.tables.items()}

    def load_state_dict(self, state: dict) -> None:
        self.tables = {}
        for key, table in state.items():
            layer = int(key)
            self.tables[layer] = self._new_table(layer, table.shape[0], table.shape[1])
            self.tables[layer][:] = table.to(self.dtype)
