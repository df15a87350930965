"""Running one sip command for scripts/bench_scale.py and watching it: the child's environment, a ``/proc``
poller that counts the processes that did the work and their CPU seconds, and the wall-to-monotonic clock
mapping used for file times."""

from __future__ import annotations

import bisect
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# launcher variables a parent launch may have left in this environment: a child must not think it is a rank
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "PMI_RANK", "PMI_SIZE", "RAY_ADDRESS")


def child_env() -> dict[str, str]:
    """This environment for a launched sip: one thread per process, offline, no inherited launch."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def _first_module(args: list[str]) -> str | None:
    """The module of ``python -m MODULE ...`` (the first ``-m``), or None."""
    return args[args.index("-m") + 1] if "-m" in args[:-1] else None


class ProcessWatch(threading.Thread):
    """Polls ``/proc`` while a launch runs: every process under it, its command line and its CPU seconds at
    the last poll (a process's last half second is missed). Ray's processes (GCS, raylet, actors) are
    children of the driver, so they are under it too. Each poll also pairs the wall clock with the monotonic
    one: on this VM the wall clock has been seen to jump ahead by seconds (a paused VM set right again), so
    file times (wall clock) are mapped onto the monotonic clock through these pairs (:func:`to_monotonic`)."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.cpu: dict[int, float] = {}
        self.cmd: dict[int, list[str]] = {}
        self.clock: list[tuple[float, float]] = [(time.time(), time.monotonic())]
        self._halt = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        self.sample()
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.clock.append((time.time(), time.monotonic()))

    def sample(self) -> None:
        self.clock.append((time.time(), time.monotonic()))
        parent, cpu = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime stime
            parent[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / self._tick
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid not in cpu:
                continue
            self.cpu[pid] = cpu[pid]
            try:  # read at every poll: Ray renames a worker when it becomes an actor (ray::IDLE → ray::MapWorker…)
                args = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            except OSError:
                args = []
            if args:
                self.cmd[pid] = args
            todo += children.get(pid, [])

    def total_cpu(self) -> float:
        return sum(self.cpu.values())

    def workers(self, kind: str) -> dict[int, float]:
        """CPU seconds of the processes that did the work: sip processes (not torchrun's agent) for "local",
        Ray's generator actors for "ray"."""
        if kind == "ray":
            return {p: c for p, c in self.cpu.items() if any("_Generate" in a for a in self.cmd.get(p, []))}
        return {p: c for p, c in self.cpu.items() if _first_module(self.cmd.get(p, [])) == "sip"}


def to_monotonic(wall: float, clock: list[tuple[float, float]]) -> float:
    """A wall-clock time (a file's mtime) on the monotonic clock, through the (wall, monotonic) pair taken
    last before it."""
    k = max(bisect.bisect_right([w for w, _ in clock], wall) - 1, 0)
    return wall - (clock[k][0] - clock[k][1])


def clock_step(clock: list[tuple[float, float]]) -> float:
    """How far the wall clock moved against the monotonic one over the pairs (0 on a steady clock)."""
    offsets = [w - m for w, m in clock]
    return max(offsets) - min(offsets)


@dataclass
class Launch:
    """One launched command and what was seen of it (times on the monotonic clock)."""

    name: str
    argv: list[str]
    wall_s: float = 0.0
    returncode: int | None = None
    output: str = ""
    started: float = 0.0  # time.monotonic() at launch
    cpu_s: float = 0.0
    workers: dict[int, float] = field(default_factory=dict)
    clock: list[tuple[float, float]] = field(default_factory=list)  # (time.time(), time.monotonic()) pairs


def short_argv(argv: list[str]) -> str:
    """The command as a reader would type it in the repository (paths inside it made relative)."""
    shown = [("python" if a == sys.executable else a) for a in argv]
    return shlex.join(shown).replace(str(REPO) + "/", "")


def launch(name: str, argv: list[str], log: Path, kind: str, timeout: float) -> Launch:
    """Run ``argv`` in the repository with :func:`child_env`, its output into ``log``; fail loudly.

    Args:
        name: the configuration's name in the tables.
        argv: the command.
        log: file for its stdout and stderr.
        kind: "local" (workers are sip processes) or "ray" (workers are Ray generator actors).
        timeout: seconds before the launch's process group is stopped.
    """
    print(f"\n$ {short_argv(argv)}", flush=True)
    run = Launch(name, argv, started=time.monotonic())
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: stopped whole on a timeout
        watch = ProcessWatch(proc.pid)
        watch.start()
        try:
            run.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # the group this script started, by its id
            run.returncode = proc.wait()
        finally:
            watch.stop()
    run.wall_s = time.monotonic() - run.started
    run.output = log.read_text(errors="replace")
    run.cpu_s, run.workers, run.clock = watch.total_cpu(), watch.workers(kind), watch.clock
    if run.returncode != 0:
        tail = "\n".join(run.output.splitlines()[-40:])
        raise SystemExit(f"{name} failed (exit {run.returncode}, log {log}):\n{tail}")
    print(f"  {name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} CPU s, {len(run.workers)} worker processes "
          f"({', '.join(f'{c:.1f}' for c in sorted(run.workers.values(), reverse=True))} CPU s)", flush=True)
    if (step := clock_step(run.clock)) > 1.0:
        print(f"  note: the wall clock moved {step:.1f} s against the monotonic clock during this run (the VM was "
              "paused or its clock set); durations here use the monotonic clock", flush=True)
    return run


def fresh(folder: Path) -> Path:
    """An empty configuration folder (sip resumes a folder it wrote: a leftover one would write nothing)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def cell(x: float | None, digits: int = 2) -> str:
    """A table cell: ``x`` to ``digits`` decimals, or "n/a"."""
    return "n/a" if x is None else f"{x:.{digits}f}"
