"""The output folder of `apply`: what may be replaced, one run at a time, and atomic replacement.

`--out` is the one place `apply` writes to, and it may hold the user's files, so:
- it must be a folder or not exist (a file, a device node or a symbolic link is never replaced);
- it may not contain the model or the recipe the run reads;
- `--force` replaces only a previous output of this tool: a folder holding the marker file this
  tool writes (or, from older versions, `report.json` and `compression.json`) and nothing but the
  files `apply` writes. Anything else in it is named in the error and left alone;
- a lock file beside it (`.<name>.lock`) makes a second run into the same `--out` fail at once.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

MARKER = ".compress-output"
OUTPUT_FILES = frozenset({MARKER, "model.pt", "model.safetensors", "compression.json", "model.onnx",
                          "model.float.onnx", "report.json", "report.md"})


def check_out(out: Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an --out that is not ours to write (see the module doc); nothing is touched."""
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise UserError(f"{out}: cannot use as output folder ({exc.strerror})") from None
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise UserError(f"{out}: is a symbolic link; give --out a real folder path")
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{out}: exists and is not a folder; refusing to replace it, with or without --force")
    check_not_holding(out, inputs)
    if info is None:
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return  # an empty folder holds nothing to lose
    if not force:
        raise UserError(f"{out}: output folder exists; pass --force to replace it")
    foreign = [name for name in entries if name not in OUTPUT_FILES or (out / name).is_dir()]
    ours = MARKER in entries or {"report.json", "compression.json"} <= set(entries)
    if foreign or not ours:
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        what = f"it holds files compress did not write: {shown}" if foreign else "it is not an output of compress apply"
        raise UserError(f"{out}: --force replaces only a previous compress output, and {what}; "
                        "nothing was touched: choose another --out or move them")


def check_not_holding(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output folder that is, or holds, one of the run's inputs (replacing it would delete it)."""
    resolved = out.resolve()
    for path in inputs:
        if path is None:
            continue
        source = Path(path).resolve()
        if source == resolved or resolved in source.parents:
            raise UserError(f"{out}: holds the input {path}; write the output to another folder")


def check_file_out(path: Path, force: bool) -> None:
    """A single output file (`export --out`, `example PATH`): only a regular file is ever overwritten."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{path}: cannot use as output file ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: exists and is not a regular file; refusing to replace it, with or without --force")
    if not force:
        raise UserError(f"{path}: file exists; pass --force to overwrite it")


def write_marker(folder: Path) -> None:
    (folder / MARKER).write_text("written by compress apply; --force may replace this folder\n")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `.<out>.lock` beside `out` for the whole run; a second run fails at once naming the first."""
    path = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{out}: cannot write the outputs ({exc.strerror}); nothing was written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = path.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise UserError(f"{out}: another compress apply (pid {holder}) is writing this output folder; "
                            "wait for it to finish or choose another --out") from None
        try:  # the file we locked may have been removed by a run that just finished: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def replace_dir(work: Path, out: Path) -> None:
    """Move the finished `work` folder to `out`, replacing a previous output (checked by check_out)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)
