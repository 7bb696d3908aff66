"""The dense tower's shape (`[model]` of a job file), apart from the tower itself so that what
only reads a job (the launcher, `embps deploy`) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

# Widest hidden layer a job may ask for (the bound of a table's dim too): a 65536 x 65536 layer
# already holds 4 G weights, so a wider one is a typo, which should fail at load rather than as an
# out-of-memory error in every worker after the shards started.
MAX_LAYER_WIDTH = 1 << 16
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2^64 - 1]


@dataclass(frozen=True)
class ModelConfig:
    """DLRM's dense part: bottom MLP, dot interaction, top MLP.

    bottom: num_dense -> bottom_sizes... -> dim (ReLU after each layer, the last one included)
    top:    dim + (F + 1) F / 2 -> top_sizes... -> 1 (ReLU after each hidden layer, none on the logit)

    Errors name the field without its section (`bottom_sizes[0]: ...`); the job loader
    (worker/train_config.py) puts `model.` in front.
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
        for name, width in (("num_dense", self.num_dense), ("num_sparse", self.dim + self.num_interactions)):
            if width > MAX_LAYER_WIDTH:  # the job loader names its own fields first (worker/train_config.py)
                raise ValueError(
                    f"{name}: makes a layer {width:,} wide, past the widest a model may have ({MAX_LAYER_WIDTH:,})"
                )
        for name in ("bottom_sizes", "top_sizes"):
            sizes = tuple(getattr(self, name))
            for i, size in enumerate(sizes):
                if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_LAYER_WIDTH:
                    raise ValueError(
                        f"{name}[{i}]: a layer width must be an integer in [1, {MAX_LAYER_WIDTH}], got {size!r}"
                    )
            object.__setattr__(self, name, sizes)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: must be an integer in [0, {MAX_SEED}], got {self.seed!r}")

    @property
    def num_interactions(self) -> int:
        """Pairwise dot products of the F + 1 vectors, diagonal excluded."""
        return (self.num_sparse + 1) * self.num_sparse // 2
