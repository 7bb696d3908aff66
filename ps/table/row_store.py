"""Rows in fixed-size blocks, so growth allocates a block and never copies the table.

The one block store of embps: the PS table (ps/table/embedding_table.py) and the serving replica
(serving/store.py) both keep their rows here. A row is `width` 4-byte words that the store copies
and never reads: the table's [value | optimizer state | freq, last_step as uint32], a replica's
float32 values or float16 values packed two per word.

    row r -> block r >> block_shift, offset r & (block_rows - 1)

    device "cpu"  blocks are numpy arrays; gather and scatter (and the table's optimizer update)
                  are single C++ calls over the table of block addresses. Needs no torch.
    other device  blocks are torch tensors (torch is imported only then); gather and scatter are
                  torch ops, one per touched block (a loop over blocks, never over keys).

Arrays in and out are numpy on CPU and torch tensors on the store's device otherwise; `values`
given to scatter may also be numpy on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ps import native

if TYPE_CHECKING:
    import torch

BLOCK_SHIFT = 16
BLOCK_ROWS = 1 << BLOCK_SHIFT
MAX_BLOCK_SHIFT = 30  # the C++ kernels' limit
# The most a block takes: wide rows get fewer rows a block. At 2^16 rows whatever the width, a
# table of dim 4096 with Adam took 3.2 GiB of address space for its first row, and one of dim
# 65536 failed its first push (48 GiB, MemoryError).
MAX_BLOCK_BYTES = 64 << 20


def block_shift_for(width: int) -> int:
    """The block shift of `width`-word rows: 2^16 rows a block, fewer where that passes MAX_BLOCK_BYTES."""
    fits = MAX_BLOCK_BYTES // (4 * max(1, width))
    return max(0, min(BLOCK_SHIFT, fits.bit_length() - 1))


def device_unavailable_reason(device: str) -> str | None:
    """None when this process can keep rows on `device` ("cpu" or "cuda[:index]"), else why not.

    Asked where tables are made (a shard at startup, an EmbeddingTable), not where a config is
    read: a launcher or `embps deploy render` may check a GPU job's config on a machine without one.
    """
    if device == "cpu":
        return None
    import torch

    try:
        index = torch.device(device).index
    except RuntimeError as exc:
        return f"not a torch device ({exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} here sees no CUDA device"
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


class RowStore:
    """Block storage for `width`-word rows on `device` ("cpu" or a torch device). Not thread-safe."""

    def __init__(self, width: int, device: str = "cpu", block_shift: int = BLOCK_SHIFT) -> None:
        if width <= 0:
            raise ValueError(f"width: must be > 0, got {width}")
        if not 0 <= block_shift <= MAX_BLOCK_SHIFT:
            raise ValueError(f"block_shift: must be in [0, {MAX_BLOCK_SHIFT}], got {block_shift}")
        self.width = width
        self.device = device
        self.block_shift = block_shift
        self.block_rows = 1 << block_shift
        self.blocks: list[np.ndarray | torch.Tensor] = []
        self._block_addresses = np.empty(0, dtype=np.uint64)

    @property
    def native(self) -> bool:
        """True when the blocks are host memory and the C++ kernels run on them."""
        return self.device == "cpu"

    @property
    def num_allocated_rows(self) -> int:
        return len(self.blocks) * self.block_rows

    @property
    def memory_bytes(self) -> int:
        """Bytes of the row blocks (all allocated rows, used or not)."""
        return len(self.blocks) * self.block_rows * self.width * 4

    @property
    def block_addresses(self) -> np.ndarray:
        """(num_blocks,) uint64 base addresses, for the C++ kernels (empty off the CPU)."""
        return self._block_addresses

    def ensure_rows(self, num_rows: int) -> None:
        """Allocates blocks until rows [0, num_rows) exist; new words are zero. Existing blocks
        never move."""
        while self.num_allocated_rows < num_rows:
            if self.native:
                block = np.zeros((self.block_rows, self.width), dtype=np.float32)
                self._block_addresses = np.append(self._block_addresses, np.uint64(block.ctypes.data))
            else:
                import torch

                block = torch.zeros((self.block_rows, self.width), dtype=torch.float32, device=self.device)
            self.blocks.append(block)

    def gather(
        self, rows: np.ndarray, col: int, num_cols: int, out: np.ndarray | torch.Tensor | None = None
    ) -> np.ndarray | torch.Tensor:
        """rows (n,) int64 -> (n, num_cols) float32 words [col, col + num_cols) of each row, into
        `out` (C-contiguous) when given.

        Negative rows are left as they are in `out` (zeros when `out` is None).
        """
        n = rows.shape[0]
        if self.native:
            if out is None:
                out = np.zeros((n, num_cols), dtype=np.float32)
            if n:
                native.gather(self._block_addresses, self.block_shift, self.width, rows, col, out)
            return out
        import torch

        if out is None:
            out = torch.zeros((n, num_cols), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        rows_t = torch.from_numpy(rows).to(self.device)
        for block_index, positions, offsets in self._split_by_block(rows_t):
            out[positions] = self.blocks[block_index][offsets, col : col + num_cols]
        return out

    def gather_host(self, rows: np.ndarray, col: int, num_cols: int) -> np.ndarray:
        """Like gather, always as a host numpy array: rows (n,) int64 -> (n, num_cols) float32."""
        words = self.gather(rows, col, num_cols)
        return words if self.native else words.cpu().numpy()

    def scatter(self, rows: np.ndarray, col: int, values: np.ndarray | torch.Tensor) -> None:
        """Writes values (n, k) float32 into words [col, col + k) of rows (n,) int64; negative rows
        are skipped."""
        if rows.shape[0] == 0:
            return
        if self.native:
            src = np.ascontiguousarray(values, dtype=np.float32)
            native.scatter(self._block_addresses, self.block_shift, self.width, rows, col, src)
            return
        import torch

        values = torch.as_tensor(values).to(self.device)
        rows_t = torch.from_numpy(rows).to(self.device)
        for block_index, positions, offsets in self._split_by_block(rows_t):
            self.blocks[block_index][offsets, col : col + values.shape[1]] = values[positions]

    def _split_by_block(self, rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """rows (n,) on the device -> per touched block: (block index, positions in rows, offsets)."""
        import torch

        valid = rows >= 0
        block_of_row = torch.where(valid, rows >> self.block_shift, -1)
        for block_index in torch.unique(block_of_row[valid]).tolist():
            positions = torch.nonzero(block_of_row == block_index, as_tuple=True)[0]
            offsets = rows[positions] & (self.block_rows - 1)
            yield block_index, positions, offsets
