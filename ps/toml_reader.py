"""Reading a job's TOML files: one place that names the file when it cannot be read as TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path


def read_toml_text(path: str | Path) -> tuple[str, dict]:
    """(the text, the parsed document) of the TOML file at `path`. ValueError naming the file when
    it is not UTF-8 text or not valid TOML; OSError, with its filename, when it cannot be read."""
    path = toml_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError:  # arrays nested thousands deep: a traceback of thousands of lines
        raise ValueError(f"{path}: not valid TOML: nested too deeply") from None
    _check_integers(path, document, "")
    return text, document


def _check_integers(path: Path, value: object, where: str) -> None:
    """ValueError naming the field of an integer outside TOML's 64 bits: Python's tomllib takes any
    size, which then reached float() and C ints as OverflowError tracebacks."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_integers(path, item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_integers(path, item, f"{where}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        digits = len(str(abs(value)))
        raise ValueError(f"{path}: {where}: TOML integers are 64-bit (-2**63 to 2**63 - 1), got one of {digits} digits")


def toml_path(path: str | Path) -> Path:
    """`path` as a Path; ValueError for an empty one, which Path() reads as "." (the command then
    said "embps ps: .: Is a directory", naming no file)."""
    if not str(path).strip():
        raise ValueError(f"the job's TOML file: must name a file, got {str(path)!r}")
    return Path(path)


def read_toml(path: str | Path) -> dict:
    """The parsed TOML document at `path` (errors as read_toml_text)."""
    return read_toml_text(path)[1]
