"""TOML text from Python values: the one writer behind every embps dumper (tomllib only reads).

    document([assignments({"job": 'a "quoted" name'}), table(("tables", "user"), {"dim": 16})])
    ->  job = "a \\"quoted\\" name"

        [tables.user]
        dim = 16

Values: str (a basic string, escaped per TOML 1.0: backslash, quote and every control character;
other characters as they are, UTF-8), bool, int, float (inf and nan included), lists and tuples
(arrays), mappings (inline tables). Keys are bare when they are [A-Za-z0-9_-]+, quoted otherwise,
so a dot in a name never nests a table. A None value is left out: TOML has no null, and every embps
reader takes a missing field as its default. Anything else is a TypeError naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    **{code: f"\\u{code:04X}" for code in (*range(0x20), 0x7F)},
    ord("\b"): "\\b",
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\f"): "\\f",
    ord("\r"): "\\r",
    ord('"'): '\\"',
    ord("\\"): "\\\\",
}


def string(text: str, where: str = "value") -> str:
    """`text` as a TOML basic string; ValueError for a lone surrogate (not a Unicode scalar value,
    so no TOML string can hold it: e.g. an undecodable file name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: TOML strings hold Unicode text only, got {text!r} ({exc.reason})") from None
    return '"' + text.translate(_ESCAPES) + '"'


def key(name: str) -> str:
    """One key: bare when it can be, else a quoted string."""
    if not isinstance(name, str):
        raise TypeError(f"TOML keys are strings, got {type(name).__name__} {name!r}")
    return name if _BARE_KEY.fullmatch(name) else string(name, "key")


def value(item: object, where: str = "value") -> str:
    """One TOML value (see the module docstring); `where` names the field in errors."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(int(item))
    if isinstance(item, float):
        return repr(float(item))  # Python's inf, -inf, nan and exponents (1e-06, 1e+16) are TOML floats too
    if isinstance(item, str):
        return string(str(item), where)
    if isinstance(item, Mapping):
        pairs = assignments(item, where)
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(item, list | tuple):
        return "[" + ", ".join(value(v, f"{where}[{i}]") for i, v in enumerate(item)) + "]"
    raise TypeError(f"{where}: cannot be written as TOML: {type(item).__name__} {item!r}")


def assignments(fields: Mapping[str, object], where: str = "") -> list[str]:
    """`key = value` lines, in order, None values left out; `where` is the table's path in errors."""
    lines = []
    for name, item in fields.items():
        if item is not None:
            lines.append(f"{key(name)} = {value(item, f'{where}.{name}' if where else name)}")
    return lines


def table(path: str | Sequence[str], fields: Mapping[str, object], array: bool = False) -> list[str]:
    """`[a.b]` (or `[[a.b]]` with array) and its assignments. A str path is one key, not split on dots."""
    parts = (path,) if isinstance(path, str) else tuple(path)
    if not parts:
        raise ValueError("table: a table needs a name")
    name = ".".join(key(p) for p in parts)
    header = f"[[{name}]]" if array else f"[{name}]"
    return [header, *assignments(fields, ".".join(parts))]


def document(blocks: Iterable[list[str]]) -> str:
    """Blocks of lines (top-level assignments first, then tables), a blank line between them."""
    return "\n\n".join("\n".join(block) for block in blocks if block) + "\n"
