"""ps/toml_writer.py: what it writes, tomllib reads back as the same values; escapes per TOML 1.0."""

from __future__ import annotations

import math
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import toml_writer

# What broke the hand-written dumpers: quotes, backslashes, control characters; and non-ASCII text.
AWKWARD = ['a "quoted" name', "C:\\dir\\", "two\nlines\r\n", "tab\there", "\x00\x1f\x7f\b\f", "é ✓ 日本 😀", "", "'"]


def read_back(item: object) -> object:
    return tomllib.loads(f"v = {toml_writer.value(item)}\n")["v"]


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_strings_read_back_equal(text: str) -> None:
    assert read_back(text) == text


def test_escapes_are_the_spec_short_forms_and_u_escapes() -> None:
    assert toml_writer.value('"\\\b\t\n\f\r') == '"\\"\\\\\\b\\t\\n\\f\\r"'
    assert toml_writer.value("\x00\x1f\x7f") == '"\\u0000\\u001F\\u007F"'
    assert toml_writer.value("é") == '"é"'


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_reads_back_equal(text: str) -> None:
    assert read_back(text) == text


def test_numbers_and_bools_read_back_equal() -> None:
    values = [0, -1, 2**63 - 1, -(2**63), 0.1, 1e-8, 1e16, 1e300, -0.0, math.inf, -math.inf, True, False]
    for item in values:
        got = read_back(item)
        assert got == item and type(got) is type(item), (item, got)
    assert math.isnan(read_back(math.nan))


scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, max_size=5))
def test_nested_arrays_and_inline_tables_read_back_equal(document: dict) -> None:
    assert tomllib.loads(toml_writer.document([toml_writer.assignments(document)])) == document


def test_tables_arrays_of_tables_and_keys_that_are_not_bare() -> None:
    text = toml_writer.document(
        [
            toml_writer.assignments({"job": "j", "skipped": None}),
            toml_writer.table("shards", {"address": "a:1"}, array=True),
            toml_writer.table("shards", {"address": "b:2"}, array=True),
            toml_writer.table(("tables", "user.v2"), {"dim": 4, "optimizer": {"kind": "sgd", "l1": None}}),
            toml_writer.table(("tables", "usér"), {"odd key = x": [1, 2.5, "x"], "empty": {}}),
        ]
    )
    assert tomllib.loads(text) == {
        "job": "j",
        "shards": [{"address": "a:1"}, {"address": "b:2"}],
        "tables": {
            "user.v2": {"dim": 4, "optimizer": {"kind": "sgd"}},
            "usér": {"odd key = x": [1, 2.5, "x"], "empty": {}},
        },
    }
    assert '[tables."user.v2"]' in text and "[[shards]]" in text


def test_errors_name_the_field() -> None:
    with pytest.raises(TypeError, match=r"^tables\.user\.optimizer\.lr: cannot be written as TOML: object"):
        toml_writer.table(("tables", "user"), {"optimizer": {"lr": object()}})
    with pytest.raises(TypeError, match=r"^tables\[1\]: cannot be written as TOML: NoneType"):
        toml_writer.assignments({"tables": ["a", None]})
    with pytest.raises(ValueError, match=r"^uri: TOML strings hold Unicode text only"):
        toml_writer.assignments({"uri": "/tmp/\udcff"})
