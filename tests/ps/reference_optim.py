"""Independent reference of the sparse optimizers: a dense torch table, plain tensor math.

The reference holds every key's row in a dict of float32 tensors and applies, per step, one
update per unique key to the sum of that key's gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from ps.table.config import OptimizerConfig, OptimizerKind


class ReferenceTable:
    def __init__(self, config: OptimizerConfig, dim: int, init) -> None:
        self.config = config
        self.dim = dim
        self.init = init  # keys (n,) -> (n, dim) float32
        self.rows: dict[int, dict[str, torch.Tensor]] = {}

    def _row(self, key: int) -> dict[str, torch.Tensor]:
        if key not in self.rows:
            c, d = self.config, self.dim
            w = torch.from_numpy(self.init(np.array([key], dtype=np.int64))[0].copy())
            state = {"w": w}
            if c.kind == OptimizerKind.ADAGRAD:
                state["s"] = torch.full((d,), c.initial_accumulator)
            elif c.kind == OptimizerKind.ROWWISE_ADAGRAD:
                state["s"] = torch.full((1,), c.initial_accumulator)
            elif c.kind == OptimizerKind.ADAM:
                state.update(m=torch.zeros(d), v=torch.zeros(d), t=torch.zeros(1))
            elif c.kind == OptimizerKind.FTRL:
                state.update(z=torch.zeros(d), n=torch.zeros(d))
            self.rows[key] = state
        return self.rows[key]

    def lookup(self, key: int) -> torch.Tensor:
        return self._row(key)["w"]

    def step(self, keys: np.ndarray, grads: np.ndarray) -> None:
        summed: dict[int, torch.Tensor] = {}
        for k, g in zip(keys.tolist(), torch.from_numpy(grads), strict=True):
            summed[k] = summed[k] + g if k in summed else g.clone()
        for k, g in summed.items():
            self._apply(self._row(k), g)

    def _apply(self, r: dict[str, torch.Tensor], g: torch.Tensor) -> None:
        c = self.config
        if c.kind == OptimizerKind.SGD:
            r["w"] = r["w"] - c.lr * g
        elif c.kind == OptimizerKind.ADAGRAD:
            r["s"] = r["s"] + g * g
            r["w"] = r["w"] - c.lr * g / (torch.sqrt(r["s"]) + c.eps)
        elif c.kind == OptimizerKind.ROWWISE_ADAGRAD:
            r["s"] = r["s"] + (g * g).sum() / self.dim
            r["w"] = r["w"] - (c.lr / (torch.sqrt(r["s"]) + c.eps)) * g
        elif c.kind == OptimizerKind.ADAM:
            r["t"] = r["t"] + 1
            r["m"] = c.beta1 * r["m"] + (1 - c.beta1) * g
            r["v"] = c.beta2 * r["v"] + (1 - c.beta2) * g * g
            m_hat = r["m"] / (1 - c.beta1 ** r["t"])
            v_hat = r["v"] / (1 - c.beta2 ** r["t"])
            r["w"] = r["w"] - c.lr * m_hat / (torch.sqrt(v_hat) + c.eps)
        elif c.kind == OptimizerKind.FTRL:
            n_new = r["n"] + g * g
            sigma = (torch.sqrt(n_new) - torch.sqrt(r["n"])) / c.lr
            r["z"] = r["z"] + g - sigma * r["w"]
            r["n"] = n_new
            w = -(r["z"] - torch.sign(r["z"]) * c.l1) / ((c.ftrl_beta + torch.sqrt(n_new)) / c.lr + c.l2)
            r["w"] = torch.where(r["z"].abs() <= c.l1, torch.zeros_like(w), w)
        else:
            raise ValueError(c.kind)
