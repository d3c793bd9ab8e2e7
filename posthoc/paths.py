"""Files posthoc reads and writes: inputs checked to be what their users mean, outputs checked before any
work and written atomically, file-system errors as one line.

Every text or JSON file a user names (a class map, a model list, label files, a ``config.json``) is read
through :func:`read_text_file` / :func:`read_json_file`: a missing path, a directory, a FIFO or device, a
file too large to be what it claims, bytes that are not UTF-8, and JSON holding ``NaN`` or ``Infinity``
each get their own line instead of a traceback or a misleading "does not exist".

Every command checks the places it will write (artifact directory, results file, statistics file)
before it loads data or trains, so an hour of compute is never lost to a read-only directory; writes go
to a temporary sibling renamed into place, so a full disk or a kill leaves the previous file intact;
temporary files carry the writing process's id, so the next write to the same place removes those of
processes that no longer run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import PosthocError, first_line

FILE_MODE = 0o666  # less the umask, as open() gives
TEXT_LIMIT = 256 << 20  # a class map, model list, label file or config.json larger than this is not one


# ------------------------------------------------------------------------------------------ inputs
def check_input_file(path: str | Path, what: str, hint: str = "check the path") -> Path:
    """``path`` as a regular, readable file, or one line saying what it is instead (missing, a directory,
    a FIFO, a socket or device, unreadable); ``hint`` ends the line for a missing file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise PosthocError(f"{what} {path} does not exist; {hint}") from None
    except OSError as e:
        raise PosthocError(f"cannot open the {what} {path} ({e.strerror or first_line(e)}); {hint}") from None
    if stat.S_ISDIR(mode):
        raise PosthocError(f"{what} {path} is a directory; name the file itself")
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise PosthocError(f"{what} {path} is a {kind}, not a regular file; give a file")
    if not os.access(path, os.R_OK):
        raise PosthocError(f"{what} {path} is not readable; check its permissions")
    return path


def read_text_file(path: str | Path, what: str, hint: str = "check the path", limit: int = TEXT_LIMIT) -> str:
    """The UTF-8 text of the file ``path`` (a byte-order mark dropped), checked by :func:`check_input_file`,
    not larger than ``limit`` bytes and holding no NUL bytes; one line naming ``what`` otherwise."""
    path = check_input_file(path, what, hint)
    size = path.stat().st_size
    if size > limit:
        raise PosthocError(f"{what} {path} holds {size} bytes, more than a {what} can ({limit}); check the path")
    with os_errors(f"reading the {what} {path}"):
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PosthocError(
            f"{what} {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    if "\0" in text:
        raise PosthocError(f"{what} {path} holds NUL bytes: it is a binary file, not text; check the path")
    return text


def read_json_file(path: str | Path, what: str, hint: str = "check the path") -> Any:
    """The JSON value in the file ``path`` (read by :func:`read_text_file`); ``NaN`` and ``Infinity``, which
    are not JSON, are refused, so no non-finite number enters posthoc through a file."""
    text = read_text_file(path, what, hint)
    return parse_json(text, f"{what} {path}")


def parse_json(text: str, what: str) -> Any:
    """``json.loads`` with one-line errors naming ``what``, refusing ``NaN`` / ``Infinity``."""

    def refuse(constant: str) -> Any:
        raise PosthocError(f"{what} holds {constant}, which is not a number JSON can hold; fix or regenerate it")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise PosthocError(f"{what} is not valid JSON ({first_line(e)}); fix or regenerate it") from None
    except RecursionError:
        raise PosthocError(f"{what} nests its JSON too deeply to be a posthoc or timm file; fix or regenerate it") from None


# ----------------------------------------------------------------------------------------- outputs


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
