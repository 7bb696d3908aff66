"""The dense tower's state as it travels with a committed step (CommitRequest.dense_state).

    format "torch.save": torch.save(model.state_dict()) of the tower's CPU tensors;
    torch.load(io.BytesIO(state), weights_only=True) gives it back (serving/scoring.py).

Rank 0 of a sync job sends it with Commit(step) every `train.publish_dense_every` steps; the
replica serves the bytes as they came (it never imports torch) beside the rows of that step.
"""

from __future__ import annotations

import io

import torch
from torch import nn

DENSE_FORMAT = "torch.save"


def encode_dense(model: nn.Module) -> bytes:
    """model's state_dict as bytes in DENSE_FORMAT (serialised at once: no copies of the tensors,
    which made it ~9x slower for a 2 MB tower)."""
    buffer = io.BytesIO()
    torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def decode_dense(state: bytes, fmt: str = DENSE_FORMAT) -> dict[str, torch.Tensor]:
    """The state_dict of bytes from encode_dense; ValueError for another format."""
    if fmt != DENSE_FORMAT:
        raise ValueError(f"dense format: {fmt!r} is not supported, only {DENSE_FORMAT!r}")
    return torch.load(io.BytesIO(state), weights_only=True)
