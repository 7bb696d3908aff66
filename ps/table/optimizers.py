"""Sparse optimizers: state layout per row, hyper-parameters, and the device-generic torch path.

On CPU the update runs in C++ (csrc/row_ops.h, `apply_update`, which takes the native
OptimizerKind of the same name: ps/native.py maps them); on other devices it runs as torch
ops on gathered rows (`apply_torch` below). Both follow the same float32 math, written once more,
independently, as the reference in tests/ps/reference_optim.py:

  sgd              w -= lr * g
  adagrad          s += g*g;                 w -= lr * g / (sqrt(s) + eps)
  rowwise_adagrad  s += sum(g*g) / dim;      w -= (lr / (sqrt(s) + eps)) * g
  adam             t += 1; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g*g;
                   w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)     (t per row: lazy)
  ftrl             n' = n + g*g; sigma = (sqrt(n') - sqrt(n)) / lr; z += g - sigma w; n = n';
                   w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((ftrl_beta + sqrt(n)) / lr + l2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ps.table.config import OptimizerConfig, OptimizerKind

if TYPE_CHECKING:  # imported by apply_torch: a CPU shard runs the native path and needs no torch
    import torch


def state_width(kind: OptimizerKind, dim: int) -> int:
    """Number of float32 state words per row."""
    return {
        OptimizerKind.SGD: 0,
        OptimizerKind.ADAGRAD: dim,
        OptimizerKind.ROWWISE_ADAGRAD: 1,
        OptimizerKind.ADAM: 2 * dim + 1,
        OptimizerKind.FTRL: 2 * dim,
    }[kind]


def hyper_parameters(config: OptimizerConfig) -> np.ndarray:
    """The (4,) float64 vector the native kernel reads, in the order of csrc/row_ops.h."""
    values = {
        OptimizerKind.SGD: (config.lr, 0.0, 0.0, 0.0),
        OptimizerKind.ADAGRAD: (config.lr, config.eps, 0.0, 0.0),
        OptimizerKind.ROWWISE_ADAGRAD: (config.lr, config.eps, 0.0, 0.0),
        OptimizerKind.ADAM: (config.lr, config.beta1, config.beta2, config.eps),
        OptimizerKind.FTRL: (config.lr, config.ftrl_beta, config.l1, config.l2),
    }[config.kind]
    return np.asarray(values, dtype=np.float64)


def initial_state(config: OptimizerConfig, num_rows: int, dim: int) -> np.ndarray:
    """State words of new rows: (num_rows, state_width) float32."""
    state = np.zeros((num_rows, state_width(config.kind, dim)), dtype=np.float32)
    if config.kind in (OptimizerKind.ADAGRAD, OptimizerKind.ROWWISE_ADAGRAD):
        state[:] = config.initial_accumulator
    return state


def apply_torch(config: OptimizerConfig, words: torch.Tensor, grads: torch.Tensor, dim: int) -> None:
    """One optimizer step in place on gathered rows.

    words (u, width) float32: [value | state] columns of u unique rows (metadata columns untouched);
    grads (u, dim) float32: the summed gradient of each row. Same device for both.
    """
    import torch

    w = words[:, :dim]
    s = words[:, dim:]
    g = grads
    kind = config.kind
    if kind == OptimizerKind.SGD:
        w -= config.lr * g
    elif kind == OptimizerKind.ADAGRAD:
        acc = s[:, :dim]
        acc += g * g
        w -= config.lr * g / (acc.sqrt() + config.eps)
    elif kind == OptimizerKind.ROWWISE_ADAGRAD:
        acc = s[:, :1]
        acc += (g * g).sum(dim=1, keepdim=True) / dim
        w -= (config.lr / (acc.sqrt() + config.eps)) * g
    elif kind == OptimizerKind.ADAM:
        m, v, t = s[:, :dim], s[:, dim : 2 * dim], s[:, 2 * dim : 2 * dim + 1]
        t += 1.0
        b1 = torch.tensor(config.beta1, dtype=torch.float32, device=words.device)
        b2 = torch.tensor(config.beta2, dtype=torch.float32, device=words.device)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2 = 1.0 - torch.pow(b2, t)
        m.mul_(b1).add_((1.0 - b1) * g)
        v.mul_(b2).add_((1.0 - b2) * g * g)
        w -= config.lr * (m / bc1) / ((v / bc2).sqrt() + config.eps)
    elif kind == OptimizerKind.FTRL:
        z, n = s[:, :dim], s[:, dim : 2 * dim]
        n_new = n + g * g
        sigma = (n_new.sqrt() - n.sqrt()) / config.lr
        z += g - sigma * w
        n.copy_(n_new)
        denom = (config.ftrl_beta + n_new.sqrt()) / config.lr + config.l2
        shrunk = -(z - torch.sign(z) * config.l1) / denom
        w.copy_(torch.where(z.abs() <= config.l1, torch.zeros_like(w), shrunk))
    else:  # pragma: no cover - validated in TableConfig
        raise ValueError(f"optimizer.kind: unknown optimizer {kind!r}")
