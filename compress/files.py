"""Reading files that other people made: regular files only, size-capped before reading, and JSON
with bounded nesting and integer size.

A recipe, a `compression.json` or the op-latency cache may be a FIFO (reading it hangs), a link to
`/dev/zero` (reading it never ends) or a document nested 200,000 deep (the parser overflows the
stack). Each is refused here, before it is read, with the reason.
"""
from __future__ import annotations

import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 30
_STRUCTURE = re.compile(r'\\.|["\[\]{}]')  # an escape pair, a quote, or a bracket


class FileRefused(ValueError):
    """The file is not one to read (not a regular file, too large, too deep); the message says why."""


def open_regular(path: str | Path) -> int:
    """A descriptor of `path` if it is a regular file, else FileRefused. Opened without blocking (a
    FIFO never hangs the reader) and checked with fstat on what was opened, so the file cannot be
    swapped between the check and the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileRefused("not a regular file (a FIFO, a device or a folder)")
    return fd


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (see open_regular)."""
    fd = open_regular(path)
    try:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise FileRefused(f"{info.st_size:,} bytes, more than the {limit:,} bytes such a file may have")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileRefused(f"more than the {limit:,} bytes such a file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise FileRefused(f"holds an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _reject_constant(name: str):
    raise FileRefused(f"holds {name}, which is not JSON")


def loads_json(raw: bytes | str) -> Any:
    """JSON as data: nesting at most MAX_JSON_DEPTH, integers of at most MAX_INT_DIGITS digits, no
    NaN or Infinity. Raises FileRefused (or ValueError for malformed text)."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    depth, in_string = 0, False
    for match in _STRUCTURE.finditer(text):  # the depth before parsing: the parser itself recurses
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string:
            continue  # an escape or a bracket inside a string
        elif token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise FileRefused(f"is nested deeper than {MAX_JSON_DEPTH} levels")
        elif token in "]}":
            depth -= 1
    return json.loads(text, parse_int=_bounded_int, parse_constant=_reject_constant)


MAX_ZIP_MEMBERS = 1 << 16


def zip_names(path: str | Path, limit: int = MAX_ZIP_MEMBERS) -> list[str]:
    """The first `limit` member names of a zip archive, read from its directory only ([] for a
    file that is not a readable archive)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [m.filename for m in archive.infolist()[:limit]]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError):
        return []


def check_zip(path: str | Path, compressed_ok: bool = False) -> None:
    """Refuse a zip archive (what torch.save and numpy.savez write) unless it is safe to read: at most MAX_ZIP_MEMBERS members, no compressed member unless `compressed_ok`
    (torch.save never compresses, so one that does is a zip bomb until proven otherwise), a declared
    inflated size within half the memory available, and every member passing its CRC check: torch
    reads the members it needs without checking, so a file with 4 KB flipped in the middle loaded
    and scored 0.086. Files that are not zip archives (legacy torch.save) pass through."""
    from .system import available_memory

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                raise FileRefused(f"is an archive of {len(members):,} members, more than {MAX_ZIP_MEMBERS:,}")
            packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
            if packed and not compressed_ok:
                raise FileRefused(f"holds compressed members (e.g. {packed[0]!r}); torch.save never compresses, "
                                  "and inflating them is not bounded")
            inflated = sum(m.file_size for m in members)
            if inflated > available_memory() // 2:
                raise FileRefused(f"declares {inflated / 2**30:.1f} GiB of contents, more than half the memory "
                                  "available")
            bad = archive.testzip()
    except FileRefused:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise FileRefused(f"is a damaged archive ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") \
            from None
    if bad is not None:
        raise FileRefused(f"is damaged: its member {bad!r} fails its CRC check (a truncated or corrupted copy)")
