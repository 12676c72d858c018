"""Training data: examples read from .jsonl/.csv, every problem reported with its line; the held-out split."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest


@dataclass(frozen=True)
class Example:
    input: str
    target: str


def read_examples(path: str | Path) -> list[Example]:
    """Examples of a .jsonl or .csv file; every problem is reported with its line, before any training."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"data file {str(path)!r} does not exist")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InvalidRequest(f"data file {path.name!r} must end in .jsonl or .csv")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"data file {path.name!r} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    examples = reader(text, path.name)
    if not examples:
        raise InvalidRequest(f"data file {path.name!r} holds no examples")
    return examples


def _read_jsonl(text: str, name: str) -> list[Example]:
    examples = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InvalidRequest(f"{name} line {lineno} is not JSON: {e}") from e
        if not isinstance(row, dict):
            raise InvalidRequest(f'{name} line {lineno} must be an object {{"input": ..., "target": ...}}')
        examples.append(_example(row, f"{name} line {lineno}"))
    return examples


def _read_csv(text: str, name: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
    columns = reader.fieldnames or []
    missing = [c for c in ("input", "target") if c not in columns]
    if missing:
        raise InvalidRequest(f"{name} needs a header with columns input,target; missing {missing} in {columns}")
    return [_example(row, f"{name} line {reader.line_num}") for row in reader]


def _example(row: dict[str, Any], where: str) -> Example:
    for key in ("input", "target"):
        if key not in row or row[key] is None:
            raise InvalidRequest(f"{where} has no {key!r}")
        if not isinstance(row[key], str):
            raise InvalidRequest(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    return Example(row["input"], row["target"])


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, so a rerun holds out the same rows; at least one of each."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction)) if eval_fraction > 0 else 0
    if len(order) - n_eval < 1:
        raise InvalidRequest(
            f"{len(order)} examples leave none to train on after holding out {n_eval} (eval fraction {eval_fraction})"
        )
    return order[n_eval:], order[:n_eval]


def chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
