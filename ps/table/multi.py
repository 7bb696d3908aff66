"""Lookup and push on many tables at once: one native call (csrc/multi_table.h) walks them all,
the GIL released once, instead of one Python call per table.

    keys (n,) table after table, offsets (T + 1,)  --one C++ call-->  values, table after table

Per-table maps, rows, init and optimizers are the tables' own; a table the native call cannot
serve exactly as EmbeddingTable would (device rows, torch kernels, admission, a row index for
eviction or TTL, a push that may not fit) goes through its own Python verbs, with the same result.
Tables whose updates run in fbgemm (TableConfig.kernels) are pushed as groups: one fbgemm
table-batched call per group of tables that share optimizer, dim and device (fbgemm_kernels.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ps import bulk_messages, native
from ps.table import fbgemm_kernels
from ps.table.embedding_table import ApplyResult, EmbeddingTable

if TYPE_CHECKING:
    from google.protobuf.message import Message


def value_offsets(tables: Sequence[EmbeddingTable], offsets: np.ndarray) -> np.ndarray:
    """(T + 1,) where each table's values start in a flat buffer, table after table."""
    dims = np.array([t.dim for t in tables], dtype=np.int64)
    out = np.zeros(len(tables) + 1, dtype=np.int64)
    np.cumsum(np.diff(offsets) * dims, out=out[1:])
    return out


def _args(
    tables: Sequence[EmbeddingTable], steps: Sequence[int] | None = None
) -> tuple[list, list, np.ndarray, np.ndarray, np.ndarray]:
    parts = [t.multi_args(None if steps is None else steps[i]) for i, t in enumerate(tables)]
    maps = [p[0] for p in parts]
    blocks = [p[1] for p in parts]
    params = np.array([p[2] for p in parts], dtype=np.int64).reshape(len(parts), 9)
    reals = np.array([p[3] for p in parts], dtype=np.float64).reshape(len(parts), 6)
    seeds = np.array([p[4] for p in parts], dtype=np.uint64)
    return maps, blocks, params, reals, seeds


def lookup_tables(
    tables: Sequence[EmbeddingTable], keys: np.ndarray, offsets: np.ndarray, steps: Sequence[int] | None = None
) -> np.ndarray:
    """keys (n,) int64 table after table, offsets (T + 1,) -> values, flat float32, table t's
    (n_t, dim_t) rows after those of tables < t. Keys without a row read as their init value.
    steps (T,): the step each table's rows are read for (EmbeddingTable.read; None: as stored)."""
    starts = value_offsets(tables, offsets)
    out = np.empty(int(starts[-1]), dtype=np.float32)
    if all(t.multi_native for t in tables):
        native.lookup_multi(*_args(tables, steps), keys, offsets, out)
        return out
    for i, table in enumerate(tables):  # device tables: one torch lookup each
        part = keys[offsets[i] : offsets[i + 1]]
        out[starts[i] : starts[i + 1]] = table.read(part, None if steps is None else steps[i]).reshape(-1)
    return out


def lookup_tables_reply(
    tables: Sequence[EmbeddingTable],
    keys: np.ndarray,
    offsets: np.ndarray,
    header: Message,
    field: str,
    steps: Sequence[int] | None = None,
) -> bytes:
    """`header` serialised with lookup_tables' values (float32, little-endian) as its bytes field
    `field`: the whole reply, written by the native call straight into the bytes object when every
    table is native (ps/bulk_messages.py)."""
    if all(t.multi_native for t in tables) and sys.byteorder == "little":
        number = header.DESCRIPTOR.fields_by_name[field].number
        return native.lookup_multi_reply(*_args(tables, steps), keys, offsets, header.SerializeToString(), number)
    values = lookup_tables(tables, keys, offsets, steps).astype("<f4", copy=False)
    return bulk_messages.encode(header, **{field: values})


def push_tables(
    tables: Sequence[EmbeddingTable],
    keys: np.ndarray,
    offsets: np.ndarray,
    grads: np.ndarray,
    counts: np.ndarray | None,
    step: int | None,
) -> list[ApplyResult]:
    """Applies each table's gradients as tables[t].apply_gradients(keys_t, grads_t, step, counts_t)
    would. grads: flat float32, table after table (n_t, dim_t); counts (n,) int64 >= 1 or None.

    The caller has checked the grads (finite) and counts (>= 1). All or nothing: every table
    that could refuse its keys (a capacity) is checked first (check_room), and every table's row
    blocks are allocated (reserve_rows), so a CapacityError or a MemoryError leaves every table as
    it was. Then tables the native call cannot serve go first, through
    apply_gradients; then every other table in one native call, which cannot fail.
    """
    if len({id(t) for t in tables}) != len(tables):
        # Each table's room is reserved for its own keys once: a table twice would overrun it.
        raise ValueError("tables: a table appears more than once in one push")
    if step is None:
        steps = [t.check_step(None) for t in tables]  # each table's next version
    else:
        steps = [tables[0].check_step(step)] * len(tables) if tables else []
    starts = value_offsets(tables, offsets)
    sizes = np.diff(offsets)
    results: list[ApplyResult | None] = [None] * len(tables)
    fast = [i for i, t in enumerate(tables) if t.multi_push_ready(int(sizes[i]))]
    groups: dict[object, list[int]] = {}  # fbgemm tables, by what one fbgemm call may share
    for i, table in enumerate(tables):
        if table.fbgemm_push_ready(int(sizes[i])):
            groups.setdefault(table.fbgemm_group, []).append(i)
    batched = set(fast).union(*groups.values())
    slow = [i for i in range(len(tables)) if i not in batched]
    if len(tables) > 1:  # one table's apply_gradients is all or nothing by itself
        for i in slow:
            part = slice(offsets[i], offsets[i + 1])
            tables[i].check_room(keys[part], None if counts is None else counts[part], steps[i])
        # Every table's row blocks before any table changes: a block that cannot be had
        # (MemoryError) then leaves them all as they were (a later table's, after the first ones
        # applied, left a push half applied that a retry applied again).
        for i, table in enumerate(tables):
            table.reserve_rows(int(sizes[i]))
    for i in slow:
        table = tables[i]
        results[i] = table.apply_gradients(
            keys[offsets[i] : offsets[i + 1]],
            grads[starts[i] : starts[i + 1]].reshape(-1, table.dim),
            step=steps[i],
            counts=None if counts is None else counts[offsets[i] : offsets[i + 1]],
        )
    for key, members in groups.items():
        begun = [
            tables[i].begin_fbgemm_push(
                keys[offsets[i] : offsets[i + 1]],
                grads[starts[i] : starts[i + 1]].reshape(-1, tables[i].dim),
                None if counts is None else counts[offsets[i] : offsets[i + 1]],
                steps[i],
            )
            for i in members
        ]
        fbgemm_kernels.KERNELS.apply(key, [b[2] for b in begun], [b[3] for b in begun])
        for i, b in zip(members, begun, strict=True):
            results[i] = tables[i].end_fbgemm_push(b, steps[i])
    if fast:
        chosen = [tables[i] for i in fast]
        if len(fast) == len(tables):
            sub_keys, sub_offsets, sub_grads, sub_counts = keys, offsets, grads, counts
        else:
            sub_keys = np.concatenate([keys[offsets[i] : offsets[i + 1]] for i in fast])
            sub_offsets = np.zeros(len(fast) + 1, dtype=np.int64)
            np.cumsum(sizes[fast], out=sub_offsets[1:])
            sub_grads = np.concatenate([grads[starts[i] : starts[i + 1]] for i in fast])
            sub_counts = None if counts is None else np.concatenate([counts[offsets[i] : offsets[i + 1]] for i in fast])
        if len(tables) == 1:
            chosen[0].reserve_rows(int(sizes[fast[0]]))
        updated = np.empty(sub_keys.shape[0], dtype=np.int64)
        num_updated = np.empty(len(fast), dtype=np.int64)
        num_inserted = np.empty(len(fast), dtype=np.int64)
        native.push_multi(
            *_args(chosen),
            np.ascontiguousarray(sub_keys, dtype=np.int64),
            np.ascontiguousarray(sub_offsets, dtype=np.int64),
            np.ascontiguousarray(sub_grads, dtype=np.float32),
            None if sub_counts is None else np.ascontiguousarray(sub_counts, dtype=np.int64),
            np.array([steps[i] for i in fast], dtype=np.uint32),
            updated,
            num_updated,
            num_inserted,
        )
        for j, (i, table) in enumerate(zip(fast, chosen, strict=True)):
            first = int(sub_offsets[j])
            touched = updated[first : first + int(num_updated[j])]
            results[i] = table.finish_multi_push(steps[i], touched, int(num_inserted[j]))
    return results  # type: ignore[return-value]
