"""Sparse gradient exchange: each key's gradients go to its owner rank, which sums them once.

    rank r:  unique keys u_r (u_r,) int64, grads (u_r, dim) float32
       owner(key) = shard_of(key) % world_size           (DESIGN section 1)
       one all_to_all_single of packed rows [key as 2 float32 words | grad (dim)]
    owner:   received keys from every rank -> summed per (table, key) -> one push per shard it owns

Keys travel bit-for-bit inside the float32 payload (an int64 is two 32-bit words), so one
collective carries both; the split sizes go first in a small all_to_all of counts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def exchange_to_owners(
    keys: np.ndarray, grads: torch.Tensor, owner: np.ndarray, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sends each (key, grad) row to owner[i] and returns what this rank received.

    keys (u,) int64, grads (u, dim) float32 (CPU), owner (u,) int64 in [0, world_size) ->
    received keys (m,) int64 and grads (m, dim) float32, rank by rank in rank order; a key sent
    by several ranks appears once per sender. Collective: every rank must call it.
    """
    dim = grads.shape[1]
    if world_size == 1:
        return keys, grads.detach().cpu().numpy()
    order = np.argsort(owner, kind="stable")
    packed = np.empty((keys.shape[0], dim + 2), dtype=np.float32)
    packed[:, :2] = keys[order].view(np.float32).reshape(-1, 2)
    packed[:, 2:] = grads.detach().cpu().numpy()[order]
    send_counts = np.bincount(owner, minlength=world_size).astype(np.int64)
    recv_counts = torch.empty(world_size, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, torch.from_numpy(send_counts))
    recv_counts_list = recv_counts.tolist()
    received = torch.empty((sum(recv_counts_list), dim + 2), dtype=torch.float32)
    dist.all_to_all_single(
        received,
        torch.from_numpy(packed),
        output_split_sizes=recv_counts_list,
        input_split_sizes=send_counts.tolist(),
    )
    received_np = received.numpy()
    received_keys = np.ascontiguousarray(received_np[:, :2]).view(np.int64).reshape(-1)
    return received_keys, np.ascontiguousarray(received_np[:, 2:])

