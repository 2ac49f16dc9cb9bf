"""The output folder of `apply`: what may be replaced, one run at a time, and atomic replacement.

`--out` is the one place `apply` writes to, and it may hold the user's files, so:
- it must name a folder (not `.`, `..` or an empty path) that is a real folder or does not exist (a
  file, a device node or a symbolic link is never replaced);
- it may not contain the model or the recipe the run reads;
- `--force` replaces only a previous output of this tool: a folder holding the marker file this
  tool writes and nothing but the files `apply` writes. Anything else in it is named in the error
  and left alone;
- a lock file beside it (`.<name>.lock`) makes a second run into the same `--out` fail at once.

Everything this tool makes beside `--out` (the lock, `.<name>.partial-<pid>-<token>` work folders,
`.<name>.old-<pid>-<token>`, the resume state) is created exclusively and never through a symbolic
link (`O_NOFOLLOW`, `O_EXCL`, `mkdtemp`), and removed only when its exact name says this run, or a
dead run into the same `--out`, made it: never by a glob built from the user's path, so sibling
outputs (`out/svd`, `out/svd.v2`) and their work are never touched.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError
from .hf import TOKENIZER_FILES

MARKER = ".compress-output"
OUTPUT_FILES = frozenset({MARKER, "model.pt", "model.safetensors", "compression.json", "model.onnx",
                          "model.float.onnx", "report.json", "report.md", *TOKENIZER_FILES})  # a text model's tokenizer


def check_name(out: Path, what: str = "--out") -> None:
    """An output path must name something: `.`, `..` and an empty path would write into (or
    replace) the folder the user is in."""
    if str(out) in ("", ".") or out.name in ("", ".", ".."):
        raise UserError(f"{what} {str(out)!r}: name an output folder or file (not the current or a parent folder)")


def check_out(out: Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an --out that is not ours to write (see the module doc); nothing is touched."""
    check_name(out)
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
    foreign = [name for name in entries if name not in OUTPUT_FILES or not _regular(out / name)]
    if foreign or MARKER not in entries:
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        what = (f"it holds files compress did not write: {shown}" if foreign
                else f"it has no {MARKER} marker, so it is not an output of compress apply")
        raise UserError(f"{out}: --force replaces only a previous compress output, and {what}; "
                        "nothing was touched: choose another --out or move them")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_not_holding(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output folder that is, or holds, one of the run's inputs (replacing it would delete it)."""
    resolved = out.resolve()
    for path, source in _resolved(inputs):
        if source == resolved or resolved in source.parents:
            raise UserError(f"{out}: holds the input {path}; write the output to another folder")


def _resolved(paths: Iterable[str | Path | None]) -> Iterator[tuple[str | Path, Path]]:
    """(as given, resolved) for each path given (None skipped)."""
    for path in paths:
        if path is not None:
            yield path, Path(path).resolve()


def check_file_out(path: Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """A single output file (`export --out`, `example PATH`): only a regular file is ever overwritten,
    never one of the command's inputs, and never a file inside an output folder of `apply` (replacing
    its model.onnx or model.safetensors would break what compression.json and report.json describe)."""
    check_name(path)
    resolved = path.resolve()
    for _, source in _resolved(inputs):
        if source == resolved or source in resolved.parents:
            raise UserError(f"{path}: is the input {source}; write the output to another path")
    for folder in resolved.parents:
        if _regular(folder / MARKER):
            raise UserError(f"{path}: lies inside {folder}, an output folder of compress apply, which writing it "
                            "would break; write the output elsewhere")
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


LOCK_CONTENT = re.compile(rb"\d{0,12}")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `.<out>.lock` beside `out` for the whole run; a second run fails at once naming the first.
    The lock is never opened through a symbolic link, and a file there that is not a lock (another
    kind of file, a hard link, contents other than a pid) is refused, never truncated."""
    check_name(out)
    path = out.with_name(f".{out.name}.lock")
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{path}: is a symbolic link, not a lock file of compress; remove it") from None
            raise UserError(f"{out}: cannot write the outputs ({exc.strerror}); nothing was written") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise UserError(f"{path}: is not a lock file of compress (a {_kind(info)}); remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{path}: cannot lock ({exc.strerror})") from None
                holder = os.pread(fd, 16, 0).decode("ascii", "replace").strip() or "?"
                raise UserError(f"{out}: another compress apply or sweep (pid {holder}) is writing this output folder; "
                                "wait for it to finish or choose another --out") from None
            if info.st_size > 12 or not LOCK_CONTENT.fullmatch(os.pread(fd, 16, 0)):
                raise UserError(f"{path}: exists and is not a lock file of compress; remove it")
        except BaseException:
            os.close(fd)
            raise
        try:  # the file we locked may have been removed by a run that just finished: lock the new one
            if info.st_ino == os.lstat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            if os.lstat(path).st_ino == info.st_ino:
                path.unlink()
        except OSError:
            pass
        os.close(fd)


def _kind(info: os.stat_result) -> str:
    if stat.S_ISREG(info.st_mode):
        return "file with other names (a hard link)"
    return {stat.S_IFIFO: "FIFO", stat.S_IFDIR: "folder", stat.S_IFCHR: "device", stat.S_IFBLK: "device",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(info.st_mode), "special file")


def make_work_dir(out: Path, kind: str = "partial") -> Path:
    """A new private folder `.<out>.<kind>-<pid>-<token>` beside `out`, created exclusively; stale ones of
    the same exact `out` and kind, left by a dead run (their pid is gone), are removed first. The
    caller holds the lock for `out`, so no live run can own one of them."""
    remove_stale(out, kind)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"{out}: cannot write the outputs ({exc.strerror or exc}); nothing was written") from None
    return work


def remove_stale(out: Path, kind: str) -> None:
    """Remove `.<out>.<kind>-<pid>-<token>` folders whose run is dead; exact names only, real folders
    owned by this user only."""
    pattern = re.compile(re.escape(f".{out.name}.{kind}-") + r"(\d+)-[A-Za-z0-9_]+")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if not match or _alive(int(match.group(1))):
            continue
        path = out.parent / name
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is the one cleaning up: what it left is from an earlier run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_own_dir(path: Path) -> None:
    """Remove a folder this tool made (resume state, work folder): a real folder only, never a
    symbolic link's target."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(work: Path, out: Path) -> None:
    """Move the finished `work` folder to `out`, replacing a previous output (checked by check_out)."""
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old)  # onto the empty folder just made: a name no one else holds
        os.replace(work, out)
        remove_own_dir(old)
    else:
        os.replace(work, out)


def own_dir(path: Path) -> Path:
    """`path` as a folder this tool may write into: made now, or already a real folder of this user
    (never a symbolic link, which would send the writes elsewhere)."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise UserError(f"{path}: exists and is not a folder compress made (a symbolic link or another "
                            "kind of file); remove it") from None
    return path


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write, public: bool = False) -> None:
    """Call `write(file)` on a new, exclusively created temporary file beside `path`, then rename it
    over `path`: a crash or a full disk leaves the old file or the new one, never half of one, and
    never writes through a symbolic link (a link at `path` is replaced, not followed). `public`: the
    file gets the umask's permissions (mkstemp makes it private), as an ordinary output should."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if public:
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, UserError):
            reason = getattr(exc, "strerror", None) or _disk_reason(path) or str(exc).splitlines()[0][:120]
            raise WriteFailed(f"{path}: cannot write ({reason}); nothing was left half-written", reason) from None
        raise


class WriteFailed(UserError):
    """A file could not be written (the reason as the OS gives it); nothing half-written remains."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@contextmanager
def writing(out: Path, where: Path | None = None, what: str = "the outputs") -> Iterator[None]:
    """Turn a failure to write into one line naming `out`: any OSError (disk full, permissions), a
    file write_atomic could not finish, and any other error raised while the disk under the folder
    `where` (default: the folder `out` is written into) is full, which is how torch.save
    (RuntimeError), safetensors and the ONNX exporter report a full disk. The caller removes what it
    had written; the message says so."""
    try:
        yield
    except WriteFailed as exc:  # a file inside the work folder: the user knows the output's name only
        raise UserError(f"{out}: cannot write {what} ({exc.reason}); nothing was written") from exc
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"{out}: cannot write {what} ({exc.strerror or exc}); nothing was written") from exc
    except Exception as exc:  # noqa: BLE001 - re-raised unless the disk is full
        reason = _disk_reason(Path(where) / "x" if where else Path(out))  # _disk_reason looks at a path's folder
        if reason is None:
            raise
        raise UserError(f"{out}: cannot write {what} ({reason}); nothing was written") from exc


def disk_full(path: Path) -> bool:
    """Whether the disk that `path` is (to be) written on has under 1 MiB free."""
    return _disk_reason(path) is not None


def _disk_reason(path: Path) -> str | None:
    """'No space left on device' when the disk is full (torch.save reports it as a RuntimeError)."""
    try:
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return None
