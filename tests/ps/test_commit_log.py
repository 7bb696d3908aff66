"""A shard's commit log (ps/shard/commits.py) against the plain reading of its contract: every
commit held, scanned whole. The log answers from its newest end (its cost follows the range asked
for, not the run's length); the answers must be the same."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.errors import LogGapError
from ps.shard.commits import CommitLog, SealedCommit

WIDTH = 2


class ReferenceLog:
    """The commits held, oldest first, under the same bounds; every question answered by a scan."""

    def __init__(self, max_bytes: int, max_commits: int) -> None:
        self.max_bytes, self.max_commits = max_bytes, max_commits
        self.commits = [_commit(0, 0, 0, [], [], True)]

    def seal(self, commit: SealedCommit) -> None:
        newest = self.commits[-1]
        no_change = commit.complete and commit.from_version == commit.to_version and not len(commit.touched_keys) \
            and not len(commit.deleted_keys)
        if no_change and commit.from_version == newest.to_version:  # the newest rows are this step's too
            self.commits[-1] = dataclasses.replace(newest, step=commit.step, commit_time=commit.commit_time)
            return
        self.commits.append(commit)
        while len(self.commits) > 1 and (
            len(self.commits) > self.max_commits or sum(c.nbytes for c in self.commits) > self.max_bytes
        ):
            self.commits.pop(0)

    def after(self, position: int) -> tuple[int, int, int, list[int], list[list[float]], list[int]]:
        """(step, from, to, touched keys, their rows, deleted keys) after position; raises as the log must."""
        if position < self.commits[0].from_version:
            raise LogGapError("fell behind")
        if any(not c.complete and c.to_version > position for c in self.commits):
            raise LogGapError("incomplete")
        newest = self.commits[-1]
        if position > newest.to_version:
            raise ValueError("ahead")
        rows: dict[int, list[float] | None] = {}  # key -> its last row, None once deleted
        for c in self.commits:
            if c.to_version > position:
                rows.update({int(k): list(v) for k, v in zip(c.touched_keys, c.values, strict=True)})
                rows.update({int(k): None for k in c.deleted_keys})
        picked = [c for c in self.commits if c.to_version > position]
        to = newest.to_version if picked else position
        touched = sorted(k for k, v in rows.items() if v is not None)
        return (newest.step, position, to, touched, [rows[k] for k in touched],
                sorted(k for k, v in rows.items() if v is None))


def _commit(step: int, since: int, to: int, touched: list[int], deleted: list[int], complete: bool) -> SealedCommit:
    values = np.array([[k, step] for k in touched], dtype=np.float32).reshape(len(touched), WIDTH)
    return SealedCommit(step, since, to, np.array(touched, dtype=np.int64), values,
                        np.array(deleted, dtype=np.int64), complete, 0.0)


def _answer(log: CommitLog, position: int):
    try:
        c = log.after(position, "t")
    except (LogGapError, ValueError) as exc:
        return type(exc).__name__
    return (c.step, c.from_version, c.to_version, c.touched_keys.tolist(), c.values.tolist(),
            c.deleted_keys.tolist())


def _reference_answer(reference: ReferenceLog, position: int):
    try:
        return reference.after(position)
    except (LogGapError, ValueError) as exc:
        return type(exc).__name__


# A commit: how many pushes since the previous one (0: an empty commit), the keys it touched
# and deleted (disjoint, sorted), and whether the update log still covered it.
commits = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sets(st.integers(0, 12), max_size=4),
        st.sets(st.integers(13, 20), max_size=2),
        st.booleans() | st.just(True),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(commits, st.integers(1, 8), st.integers(300, 3000))
def test_after_and_check_answer_as_a_scan_of_every_commit_held(sealed, max_commits, max_bytes):
    log = CommitLog(WIDTH, base_version=0, base_step=0, max_bytes=max_bytes, max_commits=max_commits)
    reference = ReferenceLog(max_bytes, max_commits)
    version = 0
    for step, (pushes, touched, deleted, complete) in enumerate(sealed, start=1):
        since, version = version, version + pushes
        commit = _commit(step, since, version, sorted(touched) if pushes else [],
                         sorted(deleted) if pushes else [], complete or not pushes)
        log.seal(commit)
        reference.seal(commit)
        for position in range(version + 2):
            assert _answer(log, position) == _reference_answer(reference, position), (step, position)
            held = _reference_answer(reference, position)
            if held == "LogGapError":
                with pytest.raises(LogGapError):
                    log.check(position, "t")
    assert log.last_version == version


def test_a_commit_before_the_newest_version_starts_a_new_history():
    """A standby that loaded its primary's (older) state commits versions below its log's newest:
    its log starts again there, and a subscriber of the old history resyncs."""
    log = CommitLog(WIDTH, base_version=0, base_step=0)
    log.seal(_commit(1, 0, 5, [1, 2], [], True))
    epoch = log.epoch
    log.seal(_commit(2, 5, 3, [], [], False))
    assert log.epoch == epoch + 1
    assert (log.last_step, log.last_version) == (2, 3)
    assert _answer(log, 3) == (2, 3, 3, [], [], [])
    assert _answer(log, 5) == "ValueError"


def test_a_table_nobody_follows_holds_one_entry_for_its_incomplete_commits_however_long_the_run():
    """A shard seals a commit per table per step; for a table no committed stream follows it is
    incomplete and without rows, and consecutive ones merge: the log's memory stays flat instead of
    holding max_commits of them, and it answers as the commits one by one did."""
    log = CommitLog(WIDTH, base_version=0, base_step=0, max_bytes=1 << 30, max_commits=4096)
    log.seal(_commit(1, 0, 3, [1, 2], [], True))
    version = 3
    for step in range(2, 10_002):
        log.seal(_commit(step, version, version + 2, [], [], False))
        version += 2
    # One entry for 10,000 commits (the complete one before them is out of reach, and dropped).
    assert log.memory_bytes == _commit(2, 3, 5, [], [], False).nbytes
    assert (log.last_step, log.last_version) == (10_001, version)
    for position in (0, 3, 5, version - 1):  # an incomplete range after it: resync
        with pytest.raises(LogGapError, match="resync with full_sync"):
            log.after(position, "t")
    assert _answer(log, version) == (10_001, version, version, [], [], [])
    log.seal(_commit(10_002, version, version + 1, [7], [], True))  # followed again: complete commits append
    assert _answer(log, version) == (10_002, version, version + 1, [7], [[7, 10_002]], [])


def test_a_table_no_push_touches_holds_one_entry_however_many_steps_are_committed():
    """A commit of a table nothing touched since the newest commit was appended: a table pushed
    once in a while held one per step up to max_commits (93 MB of commits for a 200-table shard,
    and every commit slower by half). It moves the newest commit to its step instead."""
    log = CommitLog(WIDTH, base_version=0, base_step=0, max_bytes=1 << 30, max_commits=4096)
    log.seal(_commit(1, 0, 3, [1, 2], [], True))
    held = log.memory_bytes
    for step in range(2, 10_002):
        log.seal(_commit(step, 3, 3, [], [], True))
    assert log.memory_bytes == held and (log.last_step, log.last_version) == (10_001, 3)
    assert _answer(log, 0) == (10_001, 0, 3, [1, 2], [[1, 1], [2, 1]], [])  # rows as of step 10,001: unchanged
    assert _answer(log, 3) == (10_001, 3, 3, [], [], [])



def test_an_incomplete_commit_drops_the_rows_sealed_before_it():
    """Rows sealed while a replica followed a table are out of reach once an incomplete commit
    follows them (its replica left: the table's commits go unsealed). They were held until
    max_commits or max_bytes pushed them out, which a table no one follows never does."""
    log = CommitLog(WIDTH, base_version=0, base_step=0, max_bytes=1 << 30, max_commits=4096)
    empty = log.memory_bytes
    version = 0
    for step in range(1, 51):
        log.seal(_commit(step, version, version + 1, list(range(step, step + 10)), [], True))
        version += 1
    assert log.memory_bytes > 40 * empty
    log.seal(_commit(51, version, version + 3, [], [], False))
    assert log.memory_bytes == _commit(51, version, version + 3, [], [], False).nbytes
    for position in (0, 25, version, version + 2):  # the reason said is the unsealed range, not the bounds
        with pytest.raises(LogGapError, match="sealed without its rows .* resync with full_sync"):
            log.after(position, "t")
    version += 3
    assert _answer(log, version) == (51, version, version, [], [], [])
    log.seal(_commit(52, version, version + 1, [4], [], True))
    assert _answer(log, version) == (52, version, version + 1, [4], [[4, 52]], [])
