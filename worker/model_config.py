"""The dense tower's shape (`[model]` of a job file), apart from the tower itself so that what
only reads a job (the launcher, `embps deploy`) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """DLRM's dense part: bottom MLP, dot interaction, top MLP.

    bottom: num_dense -> bottom_sizes... -> dim (ReLU after each layer, the last one included)
    top:    dim + (F + 1) F / 2 -> top_sizes... -> 1 (ReLU after each hidden layer, none on the logit)
    """

    num_dense: int = 13
    num_sparse: int = 26  # F: embeddings per sample, one per categorical feature
    dim: int = 16  # D: embedding dimension, also the bottom MLP's output width
    bottom_sizes: tuple[int, ...] = (512, 256, 64)  # hidden widths; a final layer to `dim` is added
    top_sizes: tuple[int, ...] = (512, 256)  # hidden widths; a final layer to 1 logit is added
    seed: int = 0  # initial weights are a pure function of (config, seed)

    def __post_init__(self) -> None:
        for name in ("num_dense", "num_sparse", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("bottom_sizes", "top_sizes"):
            sizes = tuple(getattr(self, name))
            if any(not isinstance(size, int) or size < 1 for size in sizes):
                raise ValueError(f"{name}: every layer width must be an int >= 1, got {sizes}")
            object.__setattr__(self, name, sizes)

    @property
    def num_interactions(self) -> int:
        """Pairwise dot products of the F + 1 vectors, diagonal excluded."""
        return (self.num_sparse + 1) * self.num_sparse // 2
