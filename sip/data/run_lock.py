"""One run per output folder (or per shard of it): the lock a generation run holds while it writes.

Two runs writing one folder at once would each redo the ids the other has not finished yet and append the
same rows twice. So a run takes a lock file in the output folder before it loads any model:

- ``.sip-run.lock`` for a whole-folder run (``sip augment`` / ``sip synth``, ``--engine ray``), or
  ``.sip-run.shard-i-of-n.lock`` for shard i of n (``--shard i/n``, or a rank of a torchrun / accelerate launch).
- Shards i ≠ j of the same n share the folder (the ranks of one launch); any other pair refuses: two whole-folder
  runs, a whole-folder run and any shard, one shard twice, shards of different counts (their batches overlap).
- The lock file is created atomically (``O_CREAT | O_EXCL``) and holds the owner's pid, host, start time and
  command; the refusal names them and says how to proceed. Checks and creation run under an advisory
  ``flock`` of the folder itself, so two runs starting together cannot both win.
- A lock whose owner is dead (same host, the pid gone or reused by another process) is taken over, with one
  warning naming the dead run. A lock from another host is never taken over (its pid cannot be checked here).
- The lock is removed when the run ends, also on an exception; a killed run leaves a lock the next run takes over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # advisory locks (POSIX); without them the O_EXCL creation still keeps one holder per lock name
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "OutputBusyError", "hold_output", "lock_name"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".sip-run.lock"


class OutputBusyError(FileExistsError):
    """Another live run holds the output folder (or the same shard of it)."""


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock file of a whole-folder run (``shard=None``) or of shard ``(i, n)``."""
    return LOCK_NAME if shard is None else f".sip-run.shard-{shard[0]}-of-{shard[1]}.lock"


def _shard_of(name: str) -> tuple[int, int] | None:
    if name == LOCK_NAME:
        return None
    i, _, n = name[len(".sip-run.shard-"):-len(".lock")].partition("-of-")
    return int(i), int(n)


def _conflicts(mine: tuple[int, int] | None, theirs: tuple[int, int] | None) -> bool:
    """Whether two holders would write the same ids: only distinct shards of one count do not."""
    return mine is None or theirs is None or mine[1] != theirs[1] or mine[0] == theirs[0]


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, Linux ``/proc``): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_is_dead(owner: dict[str, Any]) -> bool:
    """True only when the owner ran on this host and its process is gone (or its pid now names another one)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    if not pid_alive(pid):
        return True
    started = owner.get("proc_start")
    return started is not None and _process_start(pid) not in (None, started)


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's owner record; None when the file vanished. A torn or foreign file reads as an unknown owner."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = None
    return owner if isinstance(owner, dict) else {"pid": None, "host": "?", "started": "?", "command": "?"}


def _describe(owner: dict[str, Any]) -> str:
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
            f" ({owner.get('command') or 'unknown command'})")


def _busy(root: Path, path: Path, owner: dict[str, Any]) -> OutputBusyError:
    return OutputBusyError(
        f"output folder {root} is in use by another sip run: {_describe(owner)} holds {path.name}. Wait for that "
        f"run to finish (then rerun this command: it resumes), or pass another --output folder. If that run is no "
        f"longer running (e.g. it ran on another machine and died), delete {path} and rerun.")


def _owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _process_start(os.getpid()),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _take(root: Path, shard: tuple[int, int] | None) -> Path:
    """Remove the dead runs' conflicting locks, refuse a live one, create ours (under the folder's flock)."""
    mine = root / lock_name(shard)
    for path in sorted(root.glob(".sip-run*.lock")):
        if not _conflicts(shard, _shard_of(path.name)):
            continue
        owner = _read_owner(path)
        if owner is None:
            continue
        if not _owner_is_dead(owner):
            raise _busy(root, path, owner)
        logger.warning("%s: taking over the lock %s of a run that is no longer running (%s)", root, path.name,
                       _describe(owner))
        path.unlink(missing_ok=True)
    fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(_owner_record()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return mine


@contextlib.contextmanager
def hold_output(out_dir: str | Path, shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold ``out_dir`` (or shard ``(i, n)`` of it) for the duration of the block.

    Creates the folder when needed; a folder this call created and that is still empty at the end is removed
    again (a run refused before writing anything leaves nothing behind).

    Args:
        out_dir (str | Path): the run's output folder.
        shard (tuple[int, int], optional): (i, n) of this process; None for the whole folder.

    Yields:
        Path: the lock file.

    Raises:
        OutputBusyError: a live run holds the folder or a conflicting shard (the message names its pid, host,
            start time and command, and how to proceed).
    """
    root = Path(out_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _folder_locked(root):
            path = _take(root, shard)
    except BaseException:
        _tidy(root, created)
        raise
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        _tidy(root, created)


@contextlib.contextmanager
def _folder_locked(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder itself (no guard file is left behind)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _tidy(root: Path, created: bool) -> None:
    """Remove the folder when this run created it and left it empty."""
    with contextlib.suppress(OSError):
        if created and not any(root.iterdir()):
            root.rmdir()
