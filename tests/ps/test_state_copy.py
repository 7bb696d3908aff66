"""A table's image as the pieces a primary sends its new standby (ps/shard/state_copy.py): read
back bit for bit from pieces of any size, and bytes that are not such pieces refused with a
ValueError naming why (the standby answers INVALID_ARGUMENT), never a crash or a wrong table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ps.shard.state_copy import TableImageReader, table_image_pieces
from ps.table.config import OptimizerConfig, OptimizerKind, TableConfig
from ps.table.embedding_table import EmbeddingTable
from ps.table.state import TableImage


def _image(storage: str = "float32", rows: int = 1000):
    table = EmbeddingTable(TableConfig("t", dim=8, storage=storage,
                                       optimizer=OptimizerConfig(kind=OptimizerKind.ADAGRAD, lr=0.1)))
    keys = np.arange(0, 3 * rows, 3, dtype=np.int64)
    table.apply_gradients(keys, np.random.default_rng(1).standard_normal((rows, 8)).astype(np.float32), step=7)
    return table.image()


def _read(pieces) -> object:
    reader = TableImageReader(bytes(pieces[0]))
    for piece in pieces[1:]:
        reader.add(bytes(piece))
    return reader.finish()


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 30])
def test_a_state_reads_back_bit_for_bit_from_pieces_of_any_size(storage, size):
    state = _image(storage, rows=50 if size == 1 else 1000)
    pieces = table_image_pieces(state, size)
    assert all(len(p) <= size for p in pieces[1:])
    back = _read(pieces)
    for name in TableImage.ARRAYS:
        a, b = state.arrays[name], back.arrays[name]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert (back.counters, back.rng) == (state.counters, state.rng)


def test_an_empty_table_is_its_header_alone():
    table = EmbeddingTable(TableConfig("t", dim=4))
    pieces = table_image_pieces(table.image(), 1024)
    assert len(pieces) == 1
    assert _read(pieces).arrays["keys"].shape == (0,)


def test_pieces_are_views_of_the_exported_arrays_not_copies():
    image = _image()
    pieces = table_image_pieces(image, 1 << 30)
    words = image.arrays["words"]
    assert any(isinstance(p, memoryview) and p.obj is not None and np.shares_memory(np.asarray(p), words)
               for p in pieces[1:])


def _header(**changes) -> bytes:
    header = json.loads(table_image_pieces(_image(rows=10), 1 << 30)[0])
    header.update(changes)
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    "header, why",
    [
        (b"", "not a table image header"),
        (b"\xff\xfe", "not a table image header"),
        (b"[]", "not a table image header"),
        (_header(format="embps-table-state-1"), "format 'embps-table-state-1'"),
        (_header(counters={"version": 1}), "counters ['version']"),
        (_header(counters={**dict.fromkeys(TableImage.COUNTERS, 0), "version": -1}), "-1 is not a count"),
        (_header(counters={**dict.fromkeys(TableImage.COUNTERS, 0), "step": True}), "True is not a count"),
        (_header(rng=3), "rng: not an object"),
        (_header(arrays=[["keys", "<i8", [1]]]), "arrays ['keys']"),
    ],
)
def test_a_header_that_is_not_one_is_refused(header, why):
    with pytest.raises(ValueError, match="state copy: ") as raised:
        TableImageReader(header)
    assert why in str(raised.value)


def test_arrays_of_other_kinds_shapes_or_sizes_are_refused():
    arrays = json.loads(_header())["arrays"]
    for index, dtype, shape, why in [
        (0, "|O", [1], "arrays are 1-D or 2-D numbers"),
        (0, "<U4", [1], "arrays are 1-D or 2-D numbers"),
        (3, "<f4", [2, 2, 2], "arrays are 1-D or 2-D numbers"),
        (3, "<f4", [1 << 40, 1 << 40], "a header announcing"),
        (3, "<f4", [-1, 8], "-1 is not a count"),
    ]:
        changed = [list(a) for a in arrays]
        changed[index][1:] = [dtype, shape]
        with pytest.raises(ValueError, match=why):
            TableImageReader(_header(arrays=changed))


def test_too_many_or_too_few_bytes_are_refused():
    pieces = [bytes(p) for p in table_image_pieces(_image(rows=10), 1 << 30)]
    reader = TableImageReader(pieces[0])
    for piece in pieces[1:]:
        reader.add(piece)
    with pytest.raises(ValueError, match="more bytes than the table image's header announced"):
        reader.add(b"\0")
    short = TableImageReader(pieces[0])
    short.add(b"".join(pieces[1:])[:-1])
    with pytest.raises(ValueError, match="fewer bytes than the table image's header announced"):
        short.finish()
