"""The built-in recipes' file readers: CSV/TSV/JSON Lines tables, text files, and the evaluation /
calibration split. Errors name the file, the row and what the spec can change."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def is_table(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV (header line first) or JSON Lines file (or a JSON array of objects)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(file, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    text = file.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {n}: expected an object with named fields, got {type(row).__name__}")
    return rows


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def column(rows: Sequence[dict], name: str, path: str, what: str = "text") -> list[Any]:
    """One column of every row; a clear error naming the file, the row and the columns there are."""
    if not rows:
        raise ValueError(f"{path} has no rows")
    out = []
    for n, row in enumerate(rows, 1):
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            known = ", ".join(map(str, row)) or "none"
            raise ValueError(f"{path} row {n}: no {what} in column {name!r} (its columns: {known}); "
                             f"name the column in the spec's recipe section")
        out.append(value.strip() if isinstance(value, str) else value)
    return out


def split(n: int, eval_samples: int, calibration_samples: int) -> tuple[list[int], list[int]]:
    """Indices for evaluation (the first eval_samples) and calibration (those after them, topped up from the
    start where there are not enough)."""
    if n <= 0:
        raise ValueError("no samples")
    n_eval = min(n, eval_samples)
    calib = list(range(n_eval, n))
    if len(calib) < calibration_samples:
        calib += range(n_eval)
    return list(range(n_eval)), calib[:calibration_samples]


def batched(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]



def number(value: Any, path: str, row: int) -> float:
    """A score cell of `path` (row `row`) as a finite float, or an error naming the row."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = None
    if score is None or not math.isfinite(score):
        raise ValueError(f"{path} row {row}: score {value!r} is not " + ("a number" if score is None else "finite"))
    return score
