"""The building blocks of the wire's field checks (pure): a `Check` is a predicate with a name a person can
read in an error ("an integer in [1, 4096]"); `nsd.protocol` builds every message's schema from these."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

SHA256 = re.compile(r"[0-9a-f]{64}")  # blob names: nothing a peer sends becomes a path otherwise
SQL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")  # a table or column of the state database (replication)


@dataclass(frozen=True)
class Check:
    what: str  # for the error message: "an int in [1, 4096]"
    ok: Callable[[Any], bool]


def integer(lo: int, hi: int) -> Check:
    return Check(f"an integer in [{lo}, {hi}]",
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)


def text(max_len: int, pattern: re.Pattern | None = None) -> Check:
    if pattern is SHA256:
        return Check("a sha256 (64 lowercase hex characters)",
                     lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None)
    if pattern is None:
        return Check(f"a string of at most {max_len} characters", lambda v: isinstance(v, str) and len(v) <= max_len)
    return Check(f"a string matching {pattern.pattern}",
                 lambda v: isinstance(v, str) and len(v) <= max_len and pattern.fullmatch(v) is not None)


def listof(max_len: int, item: Check) -> Check:
    return Check(f"a list of at most {max_len} of {item.what}",
                 lambda v: isinstance(v, list) and len(v) <= max_len and all(item.ok(x) for x in v))


def of_type(kind: type | tuple[type, ...], what: str) -> Check:
    return Check(what, lambda v: isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool))


def is_json(value: Any, depth: int = 0) -> bool:
    """Plain JSON data (what SQLite's JSON columns and the clients' JSON output hold): maps with string
    keys, lists, strings, finite numbers, booleans, null; nested at most 32 deep; no raw bytes."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, str, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json(v, depth + 1) for k, v in value.items())
    return False


NUMBER = Check("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v))
OPT_NUMBER = Check("a finite number or null", lambda v: v is None or NUMBER.ok(v))
BOOL = of_type(bool, "a boolean")
MAP = of_type(dict, "a map")
JSON_MAP = Check("a map of plain JSON data", lambda v: isinstance(v, dict) and is_json(v))


# ---- a broker pair's replicated rows (nsd/broker/replication.py) ------------------------------------

def sql_value(v: Any) -> bool:
    return v is None or isinstance(v, (str, bytes)) or (isinstance(v, int) and not isinstance(v, bool)
                                                         and -(1 << 63) <= v < (1 << 63)) or isinstance(v, float)


def sql_row(v: Any) -> bool:
    """A replicated row: [table, rowid, values or null (deleted)]; values are what SQLite stores."""
    return (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and SQL_NAME.fullmatch(v[0]) is not None
            and integer(-(1 << 63), (1 << 63) - 1).ok(v[1])
            and (v[2] is None or (isinstance(v[2], list) and len(v[2]) <= 256 and all(sql_value(x) for x in v[2]))))


def sql_tables(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 256 and all(
        isinstance(k, str) and SQL_NAME.fullmatch(k) and isinstance(cols, list) and 0 < len(cols) <= 256
        and all(isinstance(c, str) and SQL_NAME.fullmatch(c) for c in cols) for k, cols in v.items())
