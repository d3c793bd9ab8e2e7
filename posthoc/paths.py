"""Output locations: checked before any work, written atomically, file-system errors as one line.

Every command checks the places it will write (artifact directory, results file, statistics file)
before it loads data or trains, so an hour of compute is never lost to a read-only directory; writes go
to a temporary sibling renamed into place, so a full disk or a kill leaves the previous file intact;
temporary files carry the writing process's id, so the next write to the same place removes those of
processes that no longer run.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PosthocError, first_line

FILE_MODE = 0o666  # less the umask, as open() gives


def ensure_writable(path: str | Path, what: str) -> None:
    """One line now, rather than a traceback after the work, when ``path`` cannot be written."""
    path = Path(path)
    if path.exists():
        kind = "file" if path.is_file() else "directory"
        if not os.access(path, os.W_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            raise PosthocError(f"cannot write the {what} {path}: the {kind} is not writable; choose another location")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PosthocError(f"cannot write the {what} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PosthocError(f"cannot write the {what} {path}: {existing} is not writable; choose another location")


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """A full disk or a permission problem inside the block becomes one line naming ``what``."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PosthocError(
                f"no space left on the device while {what}; free some space or choose another location (nothing was replaced)"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PosthocError(
                f"permission denied while {what} ({e.filename or first_line(e)}); choose a location you can write to"
            ) from None
        raise


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name next to ``path`` that records this process: ``.NAME.tmp-<pid>-<random>``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by posthoc processes that no longer run (a ``kill -9``)."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for candidate in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = candidate.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(candidate, ignore_errors=True) if candidate.is_dir() else candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def public_mode(path: Path) -> None:
    """Give a written file the mode ``open()`` would (0666 less the umask), as safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, FILE_MODE & ~umask)


def write_text_atomically(path: Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling; a failure leaves the old file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with os_errors(f"writing the {what} {path}"):
            tmp.write_text(text)
            public_mode(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def size_mb(path: str | Path) -> float:
    """Size of a directory (an artifact) on disk, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
