"""Rows of a table in fixed-size blocks, so growth allocates a block and never copies the table.

Each row is `width` float32 words: [value (dim) | optimizer state | freq (uint32) | last_step
(uint32)]; the two metadata words are stored bit-for-bit as uint32 inside the float32 block.

Row r lives at block r >> BLOCK_SHIFT, offset r & (BLOCK_ROWS - 1). On CPU, gather/scatter/update
are single C++ calls over the table of block addresses; on other devices they are torch ops, one
per touched block (a loop over blocks, never over keys).
"""

from __future__ import annotations

import numpy as np
import torch

from ps import native

BLOCK_SHIFT = 16
BLOCK_ROWS = 1 << BLOCK_SHIFT


class RowStore:
    """Block storage for `width`-word rows on `device`. Not thread-safe."""

    def __init__(self, width: int, device: str = "cpu", block_shift: int = BLOCK_SHIFT) -> None:
        if width <= 0:
            raise ValueError(f"width: must be > 0, got {width}")
        self.width = width
        self.device = torch.device(device)
        self.block_shift = block_shift
        self.block_rows = 1 << block_shift
        self.blocks: list[torch.Tensor] = []
        self._block_addresses = np.empty(0, dtype=np.uint64)

    @property
    def native(self) -> bool:
        """True when the C++ kernels run on this store (host memory)."""
        return self.device.type == "cpu"

    @property
    def num_allocated_rows(self) -> int:
        return len(self.blocks) * self.block_rows

    @property
    def memory_bytes(self) -> int:
        return len(self.blocks) * self.block_rows * self.width * 4 + self._block_addresses.nbytes

    @property
    def block_addresses(self) -> np.ndarray:
        """(num_blocks,) uint64 base addresses, for the C++ kernels."""
        return self._block_addresses

    def ensure_rows(self, num_rows: int) -> None:
        """Allocates blocks until rows [0, num_rows) exist; new words are zero."""
        while self.num_allocated_rows < num_rows:
            block = torch.zeros((self.block_rows, self.width), dtype=torch.float32, device=self.device)
            self.blocks.append(block)
            if self.native:
                self._block_addresses = np.append(self._block_addresses, np.uint64(block.data_ptr()))

    def gather(self, rows: np.ndarray, col: int, num_cols: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """rows (n,) int64 -> (n, num_cols) float32 words [col, col + num_cols) of each row.

        Negative rows are left as they are in `out` (zeros when `out` is None).
        """
        n = rows.shape[0]
        if out is None:
            out = torch.zeros((n, num_cols), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        if self.native:
            native.gather(self._block_addresses, self.block_shift, self.width, rows, col, out.numpy())
            return out
        rows_t = torch.from_numpy(rows).to(self.device)
        for block_index, positions, offsets in self._split_by_block(rows_t):
            out[positions] = self.blocks[block_index][offsets, col : col + num_cols]
        return out

    def scatter(self, rows: np.ndarray, col: int, values: torch.Tensor) -> None:
        """Writes values (n, k) float32 into words [col, col + k) of rows (n,); negative rows skipped."""
        if rows.shape[0] == 0:
            return
        if self.native:
            src = values.detach().to(torch.float32).contiguous().numpy()
            native.scatter(self._block_addresses, self.block_shift, self.width, rows, col, src)
            return
        rows_t = torch.from_numpy(rows).to(self.device)
        values = values.to(self.device)
        for block_index, positions, offsets in self._split_by_block(rows_t):
            self.blocks[block_index][offsets, col : col + values.shape[1]] = values[positions]

    def _split_by_block(self, rows: torch.Tensor):
        valid = rows >= 0
        block_of_row = torch.where(valid, rows >> self.block_shift, -1)
        for block_index in torch.unique(block_of_row[valid]).tolist():
            positions = torch.nonzero(block_of_row == block_index, as_tuple=True)[0]
            offsets = rows[positions] & (self.block_rows - 1)
            yield block_index, positions, offsets
