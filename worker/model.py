"""The dense tower: a DLRM-style model over dense features and looked-up embeddings.

The embedding tables live on the PS; the trainer looks up the keys of a batch and hands the
rows to the tower as one tensor, then pushes that tensor's gradient back. So any module with
this call signature can be the tower (the `DenseTower` protocol):

    forward(dense (B, num_dense) float32, embeddings (B, F, D) float32) -> logits (B,) float32

`embeddings[i, f]` is the row of key `batch.sparse[i, f]`. The module must be differentiable
with respect to `embeddings` (that gradient is what updates the PS) and must not detach it.
`check_dense_tower` checks a module against the protocol on a tiny input.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from worker.model_config import ModelConfig


@runtime_checkable
class DenseTower(Protocol):
    """forward(dense (B, num_dense), embeddings (B, F, D)) -> logits (B,)."""

    def __call__(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor: ...


def _mlp(sizes: list[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if relu_last or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRMDenseTower(nn.Module):
    """bottom MLP(dense) -> x (B, D); T = [x, embeddings] (B, F + 1, D);
    Z = T T^T, upper triangle without diagonal -> (B, (F + 1) F / 2); top MLP([x, Z]) -> (B,).

    Weights are drawn as in DLRM (normal, std sqrt(2 / (fan_in + fan_out)); biases std
    sqrt(1 / fan_out)) from a torch.Generator seeded with `config.seed`, so two towers with the
    same config are equal, whatever the global torch RNG state.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected ModelConfig, got {type(config).__name__}")
        self.config = config
        self.bottom = _mlp([config.num_dense, *config.bottom_sizes, config.dim], relu_last=True)
        self.top = _mlp([config.dim + config.num_interactions, *config.top_sizes, 1], relu_last=False)
        vectors = config.num_sparse + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        # Z's upper triangle as positions in the flattened (F + 1)^2 products: one index_select,
        # whose backward is one index_add_; indexing with (rows, cols) gave the same values and
        # gradients bit for bit at 1.6-3x the time, its backward an index_put_ with accumulate
        # (batch 1024, 26 features, one thread: 10-18 -> 5.5-6.6 ms with the bmm).
        self.register_buffer("_pairs", rows * vectors + cols, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    fan_out, fan_in = module.weight.shape
                    std = math.sqrt(2.0 / (fan_in + fan_out))
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * math.sqrt(1.0 / fan_out))

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """dense (B, num_dense) float32, embeddings (B, F, D) float32 -> logits (B,) float32."""
        cfg = self.config
        if dense.ndim != 2 or dense.shape[1] != cfg.num_dense:
            raise ValueError(f"dense: expected shape (B, {cfg.num_dense}), got {tuple(dense.shape)}")
        if embeddings.shape[1:] != (cfg.num_sparse, cfg.dim) or embeddings.shape[0] != dense.shape[0]:
            raise ValueError(
                f"embeddings: expected shape (B={dense.shape[0]}, {cfg.num_sparse}, {cfg.dim}), "
                f"got {tuple(embeddings.shape)}"
            )
        x = self.bottom(dense)
        vectors = torch.cat([x.unsqueeze(1), embeddings], dim=1)
        products = torch.bmm(vectors, vectors.transpose(1, 2))
        interactions = products.flatten(1).index_select(1, self._pairs)
        return self.top(torch.cat([x, interactions], dim=1)).squeeze(1)


def check_dense_tower(module: DenseTower, num_dense: int, num_sparse: int, dim: int, batch_size: int = 3) -> None:
    """Raises TypeError/ValueError unless `module` follows the `DenseTower` protocol.

    Calls it on a random (batch_size, ...) input and checks the logits' shape (B,) and dtype,
    and that a gradient of shape (B, F, D) reaches the embeddings. Leaves no gradients behind.
    """
    if not callable(module):
        raise TypeError(f"module: expected a callable dense tower, got {type(module).__name__}")
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(batch_size, num_dense, generator=generator)
    embeddings = torch.randn(batch_size, num_sparse, dim, generator=generator, requires_grad=True)
    logits = module(dense, embeddings)
    if not isinstance(logits, torch.Tensor) or logits.shape != (batch_size,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"module: must return logits of shape (B,) = ({batch_size},), got {shape}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"module: logits must be floating point, got {logits.dtype}")
    if not logits.requires_grad:
        raise ValueError("module: logits do not depend on embeddings through autograd (was it detached?)")
    (grad,) = torch.autograd.grad(logits.sum(), embeddings, allow_unused=True)
    if grad is None or grad.shape != embeddings.shape:
        raise ValueError("module: no gradient reaches the embeddings; the PS rows could not be trained")
