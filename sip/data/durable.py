"""Durable files for sip's on-disk dataset: whole-or-nothing writes, appends that never leave half a line,
repair of a torn JSON-lines file, and a clear error when the disk is full.

Used by :mod:`sip.data.bank` (which re-exports the public names) and by the caption cache. Test hook: with
``SIP_TEST_ENOSPC_AFTER=<k>`` the process's k-th write (counted from 1) fails with ENOSPC half-way through.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:  # advisory locks (POSIX); without them concurrent merges and repairs are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)


class DiskFullError(OSError):
    """The disk holding a sip dataset is full. Nothing half-written is left; rerunning resumes."""

    def __init__(self, folder: Path, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on the device holding {folder} (while writing {path.name}); "
                                       "free some space (or pick another --output) and rerun the same command: "
                                       "it resumes where it stopped, nothing written so far is lost", str(path))
        self.folder = folder

    def __str__(self) -> str:
        return self.strerror


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A JSON object from one line, or None. A line glued onto a torn fragment (``…"labe{"file_name": …}``,
    as sip < 0.2 wrote) yields the whole object at its end."""
    try:
        row = json.loads(line)
        return row if isinstance(row, dict) else None
    except ValueError:
        pass
    text = line.decode("utf-8", errors="replace").rstrip()
    decoder = json.JSONDecoder()
    start = text.find("{", 1)
    while start != -1:
        try:
            row, end = decoder.raw_decode(text, start)
            if end == len(text) and isinstance(row, dict):
                return row
        except ValueError:
            pass
        start = text.find("{", start + 1)
    return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file ([] when it does not exist); torn or foreign lines are skipped
    (the file is not changed: only its writer repairs it, see :func:`repair_jsonl`)."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [row for line in data.splitlines() if line.strip() and (row := parse_line(line)) is not None]


_writes = 0


def _write(f, data: bytes, folder: Path, path: Path) -> None:
    """Write ``data``, flush and fsync; a full disk becomes :class:`DiskFullError` (the caller cleans up)."""
    global _writes
    _writes += 1
    fault = os.environ.get("SIP_TEST_ENOSPC_AFTER")
    try:
        if fault and _writes >= int(fault):
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device (SIP_TEST_ENOSPC_AFTER)")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(folder, path) from e
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, folder: Path | None = None) -> None:
    """Write ``path`` through a temp file in its folder and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            _write(f, data, folder or path.parent, path)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]], folder: Path | None = None) -> None:
    """Append rows as JSON lines and fsync; on a failure the file is cut back to its previous length, so no
    half line is ever left (a full disk raises :class:`DiskFullError`)."""
    path = Path(path)
    data = jsonl_bytes(rows)
    with path.open("ab") as f:
        start = f.tell()
        try:
            _write(f, data, folder or path.parent, path)
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on ``path`` (created) for the duration of the block."""
    with path.open("a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def repair_jsonl(path: str | Path) -> int:
    """Repair a JSON-lines file before appending to it: a torn last line (or any line that is not a JSON
    object) is moved to ``.<name>.torn`` beside it with a warning naming the file, so the next row starts on
    a line of its own; a row glued onto a fragment by an older sip is kept as a row of its own. Call it only
    on a file this process appends to.

    Args:
        path (str | Path): the file (nothing happens when it does not exist).

    Returns:
        int: the number of lines moved aside.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with locked(path.with_name(f".{path.name}.lock")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        good, bad = [], []
        for line in lines:
            if line.strip() and not _is_json(line):
                bad.append(line)
                row = parse_line(line)  # a row glued onto a fragment
                if row is not None:
                    good.append(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            elif line.strip():
                good.append(line)
        if not tail.strip() and not bad:
            return 0
        if _is_json(tail):  # a whole row that lost only its newline
            with path.open("ab") as f:
                _write(f, b"\n", path.parent, path)
            return 0
        salvaged = parse_line(tail) if tail.strip() else None
        if tail.strip():
            bad.append(tail)
            if salvaged is not None:
                good.append(json.dumps(salvaged, ensure_ascii=False).encode("utf-8"))
        aside = path.with_name(f".{path.name}.torn")
        with aside.open("ab") as f:
            _write(f, b"".join(b + b"\n" for b in bad), path.parent, aside)
        if len(bad) == 1 and tail.strip() and salvaged is None:
            os.truncate(path, len(data) - len(tail))  # in place: an appender's open file stays valid
        else:
            atomic_write(path, b"".join(g + b"\n" for g in good))
        logger.warning("%s: moved %d torn line(s) to %s (a run killed mid-write); their images are checked "
                       "and redone", path, len(bad), aside.name)
        return len(bad)


def _is_json(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
