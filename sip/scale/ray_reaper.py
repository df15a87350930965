"""No Ray process outlives the sip run that started it.

A Ray that ``sip … --engine ray`` starts for one run (no ``ray.address``) is stopped by ``ray.shutdown()`` when
the run ends, fails, or gets SIGINT / SIGTERM / SIGHUP (:func:`sip.scale.ray_engine._ray_session`). A driver
killed outright (SIGKILL, the OOM killer) runs no code: Ray's GCS and raylet fate-share with it, but the
raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and idle workers notice only after their
own retries, tens of seconds or more later. So the driver starts this watchdog (``python -m
sip.scale.ray_reaper``) in its own session, holding the write end of a pipe to it:

- while the driver lives, the watchdog notes the driver's Ray descendants (pid and start time) every
  :data:`POLL_S` seconds;
- when the pipe reaches end-of-file without the word ``stop`` (the driver died), it kills every noted process
  still alive with the same start time (never a reused pid) and exits;
- ``stop`` (sent after ``ray.shutdown()``) makes it exit without killing anything.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable

__all__ = ["POLL_S", "watch_local_ray"]

POLL_S = 0.5
_RAY_MARKERS = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private", "runtime_env", "default_worker")


def watch_local_ray() -> Callable[[], None]:
    """Start the watchdog of this driver's local Ray; returns the call that stops it (after ``ray.shutdown()``)."""
    proc = subprocess.Popen([sys.executable, "-m", "sip.scale.ray_reaper", str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop() -> None:
        try:
            proc.stdin.write(b"stop\n")
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()

    return stop


def _ray_descendants(driver: int) -> dict[int, float]:
    import psutil

    try:
        children = psutil.Process(driver).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            line = " ".join(child.cmdline())
            if child.pid != os.getpid() and any(m in line for m in _RAY_MARKERS):
                found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return found


def _kill(noted: dict[int, float]) -> None:
    import psutil

    for pid, created in noted.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.kill()
        except psutil.Error:
            continue


def main(driver: int) -> None:
    """Watch ``driver`` (its pipe on stdin); kill its noted Ray processes if it dies without saying ``stop``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the driver's terminal is the driver's business
    noted: dict[int, float] = {}
    received = b""
    while True:
        noted.update(_ray_descendants(driver))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready:
            data = os.read(sys.stdin.buffer.fileno(), 64)
            received += data
            if not data:  # end of file: the driver is gone (or closed the pipe)
                break
    if b"stop" not in received:
        _kill(noted)


if __name__ == "__main__":
    main(int(sys.argv[1]))
