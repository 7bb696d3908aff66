"""One training worker: a rank of torch.distributed that trains the dense tower and, through the
PS, the embeddings.

Per step (DESIGN section 1):

    batch (B/W rows) --one dedupe over every table--> unique (table, key) pairs u + inverse (B/W, F)
    --LookupMulti (one RPC per shard, every table in one buffer)--> values (u, D) leaf
    --[inverse]--> embeddings (B/W, F, D) --dense tower (DDP)--> loss
    backward: dense grads all-reduced by DDP; embedding grads (u, D) / W
    --one all_to_all--> owner rank of each key sums over ranks per (table, key)
    --PushMulti (one RPC per shard, once per key)--> PS shard

Nothing on a step's path loops over the tables in Python: the keys of all tables travel together,
tagged with their table, in one buffer with per-table offsets (csrc/multi_table.h).

The loss is the mean over the rank's rows, so DDP's average of dense gradients is the gradient
of the global-batch mean, and dividing the embedding gradients by W makes their sum over ranks the
same. Sync mode ends each step with a barrier after the pushes, so step t+1's lookups see every
update of step t. Async mode overlaps: a step's all_to_all and push go to a background thread
(the exchange over a process group of its own, so it never meets DDP's all-reduce on the default
group) with at most `staleness` steps in flight, and the next batch's lookups run in another during
this step's compute (that thread, not the step, waits for the pushes the lookups must see). The
step itself then waits for the other ranks only in DDP's all-reduce: a second barrier a step (the
exchange) cost each rank the other's lag once more. A push is done once every rank's push of its
step was acknowledged (a barrier on the push threads' group after each push): a rank pushes only
the keys of the shards it owns, so waiting for its own acknowledgement alone let a lookup read
another rank's shards one step staler than the bound (in a 2 x 2 job, 9% of the lookups for
certain and 21% more possibly).

Commits (DESIGN section 9): in sync mode rank 0 sends Commit(t) to every shard after step t's
barrier and waits for it before it joins step t + 1's all_to_all, so no push of t + 1 reaches a
shard before it; with it, every train.publish_dense_every steps, the dense tower of step t. The
call goes out on a thread of its own and runs beside step t + 1's lookups and compute (a Commit
only reads the rows its step changed, and a lookup changes none), so its round trip is off the
step's path. In async mode rank 0's push thread commits step t right after the push of step t
(every rank's, by the barrier): no push of t + 1 reaches a shard before that Commit returns, since
each needs rank 0's push thread in step t + 1's all_to_all, so the committed rows are exactly
step t's, as in sync mode.

A shard that does not answer within a call's deadline (ShardUnavailableError) fails the step under
`train.on_ps_unavailable = "abort"`; under "wait" the step's lookup or push is sent again until the
shard answers or `train.ps_unavailable_timeout_s` has passed. A push is prepared once and the
same prepared push (same push ids) is re-sent, so a shard that applied it before the outage does
not apply it again, and the job ends with the same weights as one that never saw the outage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ps import native
from ps.client import PSClient, ShardUnavailableError
from ps.sharding import ShardMap
from worker.batch import Batch
from worker.dense_publish import DENSE_FORMAT, encode_dense
from worker.metrics import auc, logloss_from_logits
from worker.sparse_exchange import exchange_to_owners
from worker.train_config import DenseOptimizer, Mode, PSUnavailablePolicy, TrainingJob

log = logging.getLogger("embps.worker")
T = TypeVar("T")
WAIT_PAUSE_SECONDS = 0.2  # between two tries of a waiting step (each try already took up to its deadline)


@dataclass
class StepTimes:
    """Seconds spent per phase, summed over steps (this rank)."""

    lookup: float = 0.0
    compute: float = 0.0
    all_to_all: float = 0.0
    push: float = 0.0
    steps: int = 0
    ps_unavailable: float = 0.0  # waiting for an unavailable shard (train.on_ps_unavailable = "wait")
    data_wait: float = 0.0  # waiting for the reader's next batch (its read-ahead was not enough)

    def as_dict(self) -> dict[str, float]:
        return {
            "lookup_s": self.lookup,
            "compute_s": self.compute,
            "all_to_all_s": self.all_to_all,
            "push_s": self.push,
            "steps": self.steps,
            "ps_unavailable_s": self.ps_unavailable,
            "data_wait_s": self.data_wait,
        }


@dataclass
class _Pulled:
    """Looked-up rows of one batch, every table at once, in the order the shards answered (shard
    after shard): row i holds key unique[i] of table tags[i] (float32, exact) with values[i]
    (u, D), seen counts[i] times; inverse (B, F) the row of each feature of each sample."""

    batch: Batch
    unique: np.ndarray
    tags: np.ndarray
    inverse: np.ndarray
    counts: np.ndarray
    values: np.ndarray


@dataclass
class _Outgoing:
    """What this rank pushes after the all_to_all: distinct keys per table, table after table."""

    keys: np.ndarray
    offsets: np.ndarray
    grads: np.ndarray  # (m, D)
    sightings: np.ndarray  # (m,)


def make_dense_optimizer(job: TrainingJob, params) -> torch.optim.Optimizer:
    lr = job.train.dense_lr
    kind = job.train.dense_optimizer
    if kind == DenseOptimizer.ADAM:
        return torch.optim.Adam(params, lr=lr)
    if kind == DenseOptimizer.ADAGRAD:
        return torch.optim.Adagrad(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


class Trainer:
    """Trains `model` (a dense tower: forward(dense, embeddings) -> logits) with embeddings on the PS.

    rank/world_size: this process in the default torch.distributed group (world_size 1 works
    without a process group).
    """

    def __init__(self, job: TrainingJob, model: nn.Module, client: PSClient, rank: int, world_size: int) -> None:
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.client = client
        self.model = model
        # Non-persistent buffers (the tower's interaction indices) are constants: broadcasting them
        # from rank 0 before every forward would cost a collective per step for nothing (DDP still
        # broadcasts them once, at construction).
        buffers = dict(model.named_buffers())
        persistent_buffers = any(name in buffers for name in model.state_dict())
        self.ddp = (
            nn.parallel.DistributedDataParallel(model, forward_sync_buffers=persistent_buffers)
            if world_size > 1
            else model
        )
        self.optimizer = make_dense_optimizer(job, self.model.parameters())
        self.shard_map: ShardMap = client.shard_map
        self.feature_tables = job.feature_tables()
        self.groups = self._table_groups()
        self.table_names = [table for table, _ in self.groups]
        self._column_group = np.empty(len(self.feature_tables), dtype=np.int64)
        for index, (_, columns) in enumerate(self.groups):
            self._column_group[columns] = index
        dims = {t.name: t.dim for t in job.ps.tables}
        used = {dims[name] for name in self.table_names}
        if len(used) > 1:
            raise ValueError(
                f"train.tables: the dense tower takes one embedding dim, the tables have dims {sorted(used)}"
            )
        self.dim = used.pop() if used else 0
        self.times = StepTimes()
        self.step = 0
        self._async = job.train.mode == Mode.ASYNC
        self._pushes: deque[Future] = deque()
        self._commits: deque[Future] = deque()  # async, rank 0: Commits queued on the push thread
        self._committed = 0  # the newest step committed to the PS (rank 0)
        # Async, rank 0: the first step some rank failed to push; neither it nor a later step is
        # committed (a later step's rows lack that push's updates on the failed rank's shards).
        self._unpushed_step: int | None = None
        self._push_pool = ThreadPoolExecutor(1, thread_name_prefix="push") if self._async else None
        # Async: the push thread's all_to_all, beside the main thread's DDP all-reduce. Collective:
        # every rank builds its Trainer at the same point.
        self._exchange_group = (
            dist.new_group(backend=dist.get_backend(), timeout=job.collective_timeout)
            if self._async and world_size > 1
            else None
        )
        self._pull_pool = ThreadPoolExecutor(1, thread_name_prefix="pull") if self._async else None
        # Sync mode, rank 0: the Commit of the step before, in flight during this step's lookups
        # and compute; waited for before this step's all_to_all (see the module docstring).
        self._commit_pool = ThreadPoolExecutor(1, thread_name_prefix="commit") if not self._async else None
        self._pending_commit: Future | None = None

    def _table_groups(self) -> list[tuple[str, list[int]]]:
        """(table, feature columns) per table, first-use order."""
        groups: dict[str, list[int]] = {}
        for column, table in enumerate(self.feature_tables):
            groups.setdefault(table, []).append(column)
        return list(groups.items())

    def pull(self, batch: Batch, step: int | None = None) -> _Pulled:
        """Looks up the unique keys of every table of `batch` for `step` (default: the next step,
        which trains on it; rows past a table's TTL at that step read as their init, as its push
        finds them): one dedupe, one lookup round.

        The rows stay in the order the shards answered them: their positions are folded into
        inverse and into the (u,)-sized key arrays instead of moving every (D,) row back."""
        step = self.step + 1 if step is None else step
        unique, offsets, inverse, counts = native.unique_by_table(batch.sparse, self._column_group, len(self.groups))
        values, positions = self._call_ps(
            f"lookup for step {step}",
            lambda: self.client.lookup_multi_grouped(self.table_names, unique, offsets, step),
        )
        tags = np.repeat(np.arange(len(self.groups), dtype=np.float32), np.diff(offsets))
        if positions is not None:
            row_of = np.empty(unique.shape[0], dtype=np.int64)
            row_of[positions] = np.arange(unique.shape[0], dtype=np.int64)
            inverse = row_of[inverse]
            unique, tags, counts = unique[positions], tags[positions], counts[positions]
        return _Pulled(batch, unique, tags, inverse, counts, values.reshape(-1, self.dim))

    def _pull_after(self, pushes: list[Future], batch: Batch, step: int) -> _Pulled:
        """pull(batch, step) once `pushes` have been applied (their errors raise here)."""
        for push in pushes:
            push.result()
        return self.pull(batch, step)

    def train_step(self, pulled: _Pulled, next_batch: Batch | None = None) -> tuple[float, _Pulled | None]:
        """One global step on this rank's rows; returns (local loss, the next batch's rows if
        prefetched). Collective: every rank calls it for the same step."""
        batch = pulled.batch
        self.step += 1
        prefetch: Future | None = None
        if self._async:
            # The next batch's lookups may miss this step's push and the k - 1 before it, no more:
            # the pull thread waits for the older pushes, so this step's compute does not.
            due = [self._pushes.popleft() for _ in range(max(0, len(self._pushes) - (self.job.train.staleness - 1)))]
            if next_batch is not None:
                prefetch = self._pull_pool.submit(self._pull_after, due, next_batch, self.step + 1)
            else:
                start = time.perf_counter()
                for push in due:
                    push.result()
                self.times.push += time.perf_counter() - start

        start = time.perf_counter()
        leaf = torch.from_numpy(pulled.values).requires_grad_(True)
        logits = self.ddp(batch.dense, self._embeddings(pulled, leaf))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.times.compute += time.perf_counter() - start

        start = time.perf_counter()
        self._wait_commit()
        self.times.push += time.perf_counter() - start

        start = time.perf_counter()
        if self._async:
            push = self._push_pool.submit(self._exchange_and_push, pulled, leaf, self.step)
            self._pushes.append(push)
            if self.rank == 0:
                # After the push, on the same thread, but not part of its future: the lookup that
                # waits for this push does not wait for the Commit's round trip too.
                # The tower of this step, read here: the next step changes it in place.
                tower = self._dense_state(self.step)
                self._commits.append(self._push_pool.submit(self._commit_pushed, push, self.step, tower))
            while self._commits and self._commits[0].done():
                self._commits.popleft().result()  # an error raises here
        else:
            outgoing = self._exchange(pulled, leaf)
            self.times.all_to_all += time.perf_counter() - start
            start = time.perf_counter()
            self._push_all(outgoing, self.step)
            if self.world_size > 1:
                dist.barrier()
            # Waited for before rank 0 joins step + 1's all_to_all, so no push of step + 1 precedes it.
            if self.rank == 0:
                self._pending_commit = self._commit_pool.submit(
                    self._send_commit, self.step, self._dense_state(self.step)
                )
        self.times.push += time.perf_counter() - start
        self.times.steps += 1

        next_pulled = None
        if prefetch is not None:
            start = time.perf_counter()
            next_pulled = prefetch.result()
            self.times.lookup += time.perf_counter() - start
        return float(loss.detach()), next_pulled

    def _exchange_and_push(self, pulled: _Pulled, leaf: torch.Tensor, step: int) -> bool:
        """Async, on the push thread (one step after the other): step's all_to_all over the
        exchange group, its push, then every rank's outcome (_every_rank_pushed). Each rank pushes
        only the keys of the shards it owns, so its own push being acknowledged says nothing of the
        other ranks' shards: this future completes once every rank's push of `step` is through, and
        a lookup that waits for it sees every update of that step. Returns whether every rank's
        push was acknowledged.

        A push that fails reports so too (then raises its error): it fails on its rank alone (the
        shards it owns), and a rank that skipped the exchange would meet the others' with its next
        all_to_all, and every rank would wait in gloo instead of getting to its error."""
        try:
            self._push_all(self._exchange(pulled, leaf, self._exchange_group), step)
        except BaseException:
            if self._unpushed_step is None:  # rank 0's own failure: the steps queued after it commit nothing
                self._unpushed_step = step
            with contextlib.suppress(Exception):  # fails where a rank is gone: the push's error is the one to tell
                self._every_rank_pushed(False)
            raise
        return self._every_rank_pushed(True)

    def _every_rank_pushed(self, pushed: bool) -> bool:
        """Whether every rank's push of the step was acknowledged: an all-reduce of the ranks'
        failures over the exchange group (the barrier it replaces was met by a failed push too,
        and rank 0 went on to commit the step on shards that never got its rows)."""
        if self._exchange_group is None:
            return pushed
        failed = torch.tensor([0 if pushed else 1], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self._exchange_group)
        return int(failed.item()) == 0

    def _commit_pushed(self, push: Future, step: int, tower: bytes) -> None:
        """Async, rank 0's push thread, right after `push` (step's): Commit(step) with `tower`
        (the dense tower after step's update, when step publishes it), unless a rank's push of it
        failed (rank 0's own error raises here too). No rank's push of step + 1 reaches a shard
        before this returns: each needs this thread in step + 1's all_to_all. So the shards' rows
        are those of step, as in sync mode, and so is the tower (before, an async job published
        none, and a replica's Scorer had no tower to score with)."""
        if not push.result() and self._unpushed_step is None:
            self._unpushed_step = step
            log.warning("step %d: a rank's push failed; neither it nor a later step is committed (that rank "
                        "ends the job)", step)
        self._send_commit(step, tower)

    def _dense_state(self, step: int) -> bytes:
        """The dense tower's bytes when step publishes it (train.publish_dense_every), else b"".
        Read on the training thread: the next step changes the tower in place."""
        every = self.job.train.publish_dense_every
        return encode_dense(self.model) if every and step % every == 0 else b""

    def _send_commit(self, step: int, state: bytes) -> None:
        """Commit(step) to every shard (DESIGN section 9), with the dense tower's bytes `state`
        (b"": none this step)."""
        if step <= self._committed:  # async: drain() committed a later step already
            return
        if self._unpushed_step is not None and step >= self._unpushed_step:
            return
        self._committed = step
        self._call_ps(f"commit of step {step}", lambda: self.client.commit(step, state, DENSE_FORMAT if state else ""))

    def _wait_commit(self) -> None:
        """Waits for the Commit in flight (sync mode, rank 0); its error raises here."""
        pending, self._pending_commit = self._pending_commit, None
        if pending is not None:
            pending.result()

    def _exchange(self, pulled: _Pulled, leaf: torch.Tensor, group: dist.ProcessGroup | None = None) -> _Outgoing:
        """Sends every table's (key, grad / W, count) rows to the keys' owner ranks in one
        all_to_all over `group` (None: the default one); returns what this rank pushes, summed per
        (table, key) in one pass."""
        # Row layout: [table index | grad (D) | count], all float32 (indexes and counts are exact
        # below 2^24); keys travel beside it bit for bit.
        owner = self.shard_map.owner_rank(pulled.unique, self.world_size)
        received_keys, received = exchange_to_owners(
            pulled.unique,
            leaf.grad,
            owner,
            self.world_size,
            divisor=self.world_size,
            lead=pulled.tags,
            trail=pulled.counts.astype(np.float32),
            group=group,
        )
        received_tags = received[:, 0].astype(np.int64)
        # The grads and counts columns are read where they arrived; the grads are summed into one
        # contiguous buffer, which the push sends as it is.
        keys, summed, offsets, counts = native.sum_by_table_key(
            received_keys, received_tags, received[:, 1:-1], len(self.groups), counts=received[:, -1]
        )
        return _Outgoing(keys, offsets, summed, np.rint(counts).astype(np.int64))

    def _embeddings(self, pulled: _Pulled, leaf: torch.Tensor) -> torch.Tensor:
        """(B, F, D) in feature order: one gather of the unique rows leaf (u, D). index_select, not
        leaf[inverse]: its backward is one index_add_, about 1.4x faster than advanced indexing's
        index_put_ with accumulate, and its forward about 3x (batch 1024 x 26, dim 64, one thread)."""
        inverse = torch.from_numpy(pulled.inverse)
        return leaf.index_select(0, inverse.reshape(-1)).view(*inverse.shape, leaf.shape[1])

    def _push_all(self, outgoing: _Outgoing, step: int) -> None:
        if outgoing.keys.shape[0]:
            prepared = self.client.prepare_push_multi(
                self.table_names,
                outgoing.keys,
                outgoing.offsets,
                outgoing.grads,
                outgoing.sightings,
                step=step,
                distinct=True,
            )
            self._call_ps(f"push of step {step}", lambda: self.client.send_push(prepared))

    def _call_ps(self, what: str, call: Callable[[], T]) -> T:
        """call() under train.on_ps_unavailable: "abort" lets ShardUnavailableError through; "wait"
        calls again (call must be safe to repeat) until it succeeds, and raises
        ShardUnavailableError once train.ps_unavailable_timeout_s has passed since the first failure."""
        train = self.job.train
        first_failure: float | None = None
        while True:
            try:
                result = call()
            except ShardUnavailableError as exc:
                if train.on_ps_unavailable == PSUnavailablePolicy.ABORT:
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    log.warning(
                        "rank %d: %s: shard %s unavailable, waiting up to %g s (train.on_ps_unavailable = wait): %s",
                        self.rank, what, exc.address, train.ps_unavailable_timeout_s, exc,
                    )  # fmt: skip
                elif now - first_failure >= train.ps_unavailable_timeout_s:
                    raise ShardUnavailableError(
                        f"{exc}; gave up after waiting {now - first_failure:.1f} s "
                        f"(train.ps_unavailable_timeout_s = {train.ps_unavailable_timeout_s:g})",
                        exc.code,
                        exc.address,
                    ) from exc
                time.sleep(WAIT_PAUSE_SECONDS)
                continue
            if first_failure is not None:
                waited = time.monotonic() - first_failure
                self.times.ps_unavailable += waited
                log.warning("rank %d: %s: the PS answers again after %.1f s; training goes on", self.rank, what, waited)
            return result

    def drain(self) -> None:
        """Waits for every in-flight push (async mode), then for every rank to get there."""
        while self._pushes:
            self._pushes.popleft().result()
        while self._commits:
            self._commits.popleft().result()
        self._wait_commit()
        if self.world_size > 1:
            dist.barrier()
        if self._async and self.rank == 0 and self.step:
            self._send_commit(self.step, b"")  # a no-op once the push thread committed it

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits (B,) of the current model (dense tower and PS rows) on `batch`: the rows as of
        this step (not the next step's, at which a row pushed ttl_steps ago has expired). A row
        past its TTL reads as its init here, as training reads it; a snapshot and a replica hold
        it until the shard's sweep drops it (README, Eviction)."""
        with torch.no_grad():
            pulled = self.pull(batch, self.step)
            return self.model(batch.dense, self._embeddings(pulled, torch.from_numpy(pulled.values)))

    def evaluate(self, batches: list[Batch]) -> dict[str, float | None]:
        """AUC and logloss of the current model on held-out batches (this rank's rows). A metric
        the batches do not define is None, with a warning, never an error that would end the job
        (before it wrote its model): AUC when the labels are of one class or not all 0 and 1 (click
        probabilities), both when a logit is not finite (the model diverged)."""
        y = torch.cat([batch.labels for batch in batches]).numpy()
        z = torch.cat([self.predict(batch) for batch in batches]).numpy()
        bad = int((~np.isfinite(z)).sum())
        if bad:
            log.warning("evaluation at step %d: %d of %d logits are not finite (the model diverged): "
                        "no AUC or logloss", self.step, bad, z.shape[0])
            return {"auc": None, "logloss": None}
        if not np.isin(y, (0.0, 1.0)).all():  # the readers take click probabilities in [0, 1]
            log.warning("evaluation at step %d: held-out labels other than 0 and 1 (click probabilities): AUC is "
                        "undefined, logloss only", self.step)
            return {"auc": None, "logloss": float(logloss_from_logits(y, z))}
        positives = int((y == 1).sum())
        if positives in (0, y.shape[0]):
            log.warning("evaluation at step %d: all %d held-out labels are %d: AUC is undefined, logloss only",
                        self.step, y.shape[0], int(positives > 0))
            return {"auc": None, "logloss": float(logloss_from_logits(y, z))}
        return {"auc": float(auc(y, z)), "logloss": float(logloss_from_logits(y, z))}

    def pull_timed(self, batch: Batch) -> _Pulled:
        start = time.perf_counter()
        pulled = self.pull(batch)
        self.times.lookup += time.perf_counter() - start
        return pulled

    def close(self) -> None:
        """Ends the trainer's threads: after drain() nothing is queued; after an error, the steps
        still queued are dropped (their pushes and lookups would only fail or wait on ranks that
        are ending), and the one running is waited for."""
        for pool in (self._push_pool, self._pull_pool, self._commit_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
