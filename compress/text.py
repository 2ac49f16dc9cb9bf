"""Text as data: `.txt` (one example a line), `.jsonl` and `.csv` (a `text` key, or two keys for
pairs, and an optional label key), tokenized by the model's own tokenizer into the tensors the
model takes (`input_ids`, `attention_mask`, and `token_type_ids` where the tokenizer makes them).

Read line by line and only as far as needed: at most `data.max_examples` examples per file (a
corpus larger than memory is read up to that many), each line at most MAX_LINE bytes. The set is
padded to its longest example (at most `data.max_length` tokens; longer ones are truncated);
training and calibration batches are cut to their own longest example (`Dataset.batches(trim=True)`).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterator

import torch

from .data import Dataset
from .errors import UserError, first_line
from .files import FileRefused, loads_json, open_regular

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
MAX_LINE = 1 << 20  # bytes in one line (one example)


def is_text(source: str) -> bool:
    return Path(source).suffix.lower() in TEXT_SUFFIXES


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-empty line, each read with a bound (a file without newlines
    is refused, not read whole)."""
    try:
        fd = open_regular(path)
    except FileRefused as exc:
        raise UserError(f"{path}: {exc}") from None
    with os.fdopen(fd, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), start=1):
            if len(raw) > MAX_LINE:
                raise UserError(f"{path}:{number}: a line of more than {MAX_LINE:,} bytes; one example a line")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: not UTF-8 text") from None
            if line.strip():
                yield number, line


def read_examples(path: Path, keys: list[str], label: str, limit: int) -> tuple[list[list[str]], list | None]:
    """The texts (one list per key) and the labels (None when the file has none) of at most
    `limit` examples."""
    suffix = path.suffix.lower()
    columns: list[list[str]] = [[] for _ in keys]
    labels: list = []
    rows = _records(path, suffix, keys)
    for number, record in rows:
        for i, key in enumerate(keys):
            value = record.get(key)
            if not isinstance(value, str):
                have = ", ".join(sorted(record)[:8]) or "none"
                raise UserError(f"{path}:{number}: no text under {key!r} (keys: {have}); name the text keys in "
                                "data.text_keys")
            columns[i].append(value)
        if label in record and suffix != ".txt":
            labels.append((number, record[label]))
        if len(columns[0]) >= limit:
            break  # the rest of the file is not read
    if not columns[0]:
        raise UserError(f"{path}: holds no examples")
    if labels and len(labels) != len(columns[0]):
        raise UserError(f"{path}: {len(labels)} of {len(columns[0])} examples have a {label!r}; label all or none")
    return columns, [_label(path, n, v) for n, v in labels] if labels else None


def _records(path: Path, suffix: str, keys: list[str]) -> Iterator[tuple[int, dict]]:
    if suffix == ".txt":
        if len(keys) != 1:
            raise UserError(f"{path}: a .txt file holds one text an example; pairs need .jsonl or .csv")
        for number, line in _lines(path):
            yield number, {keys[0]: line}
    elif suffix == ".jsonl":
        for number, line in _lines(path):
            try:
                record = loads_json(line)
            except (FileRefused, ValueError) as exc:
                raise UserError(f"{path}:{number}: not a JSON object ({first_line(exc, 80)})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            yield number, record
    else:
        lines = _lines(path)
        try:
            number, header = next(lines)
        except StopIteration:
            raise UserError(f"{path}: holds no examples") from None
        names = next(csv.reader(io.StringIO(header)))
        for number, line in lines:
            values = next(csv.reader(io.StringIO(line)), [])
            yield number, dict(zip(names, values))


def _label(path: Path, number: int, value) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{path}:{number}: a label must be a number, not {type(value).__name__}")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise UserError(f"{path}:{number}: label {value[:40]!r} is not a number; store class labels as "
                            "integers") from None
    if isinstance(value, int) and abs(value) >= 2**31:
        raise UserError(f"{path}:{number}: label {value} is out of range")
    return value


def _check_padded_size(path: Path, ids: list[list[int]], tensors: int) -> None:
    """Refuse a set whose padded tensors would take more than half the memory (one long line
    among many short ones pads them all to its length)."""
    from .system import available_memory

    longest = max((len(x) for x in ids), default=0)
    need = len(ids) * longest * 8 * tensors
    budget = available_memory() // 2
    if need > budget:
        raise UserError(f"{path}: {len(ids):,} examples padded to {longest:,} tokens take {need / 2**30:.1f} GiB, more "
                        f"than half the {budget * 2 / 2**30:.1f} GiB available; lower data.max_length or "
                        "data.max_examples")


def load_text(path: str | Path, tokenizer, keys: list[str], label: str, target: str, max_length: int,
              limit: int) -> Dataset:
    """A text file as the tensors the model takes, tokenized by `tokenizer`; labels under `target`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    columns, labels = read_examples(path, keys, label, limit)
    try:
        encoded = tokenizer(*columns, truncation=True, max_length=max_length)
        _check_padded_size(path, encoded["input_ids"], len(encoded))
        encoded = tokenizer.pad(encoded, padding="longest", return_tensors="pt")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizer's own complaint, in one line
        raise UserError(f"{path}: the tokenizer cannot encode it ({first_line(exc, 150)})") from None
    order = ["input_ids", "attention_mask", "token_type_ids"]
    tensors = {k: encoded[k].to(torch.int64) for k in order if k in encoded}
    if labels is not None:
        if target in tensors:
            raise UserError(f"data.target {target!r} is also one of the tokenizer's outputs; choose another name")
        kind = torch.int64 if all(isinstance(v, int) for v in labels) else torch.float32
        tensors[target] = torch.tensor(labels, dtype=kind)
    return Dataset(tensors, str(path)).padded(getattr(tokenizer, "padding_side", "right"))
