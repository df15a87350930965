"""Which process of a multi-process launch this one is, read from the launcher's environment, and the share
of the generation work it takes.

``torchrun --nproc_per_node N -m sip synth …`` and ``accelerate launch --num_processes N -m sip synth …``
(and ``augment``) start N copies of sip with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set (``mpirun``,
accelerate's multi-CPU path, sets ``OMPI_COMM_WORLD_*`` or ``PMI_*``). Process ``rank`` of ``world`` takes
shard ``rank + 1`` of ``world`` (:func:`sip.ids.in_shard`: membership by a hash of the item id), writes its
own ``metadata.shard-i-of-n.jsonl``, and the last process to finish merges every shard under a file lock
(:func:`sip.data.merge.merge_shards`). No process ever waits on another, so no collective can time out
while one rank works alone, and ``torch.distributed`` is not used at all. A relaunch with any process
count resumes: every process reads the done ids of every shard file, whatever count wrote it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sip.ids import parse_shard

__all__ = ["LAUNCHERS", "Launch", "detect_launch", "generation_shard", "process_device", "warn_if_alone"]

logger = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "accelerate", "mpirun", "none")
# (rank, world, local rank) variables, first found wins: torchrun and accelerate's multi-process launchers
# set the first; Open MPI, MPICH / Intel MPI and MVAPICH set the others (accelerate reads the same ones).
_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
# `accelerate launch` sets these in every process it starts, on each of its paths (one process, torchrun, mpirun).
_ACCELERATE = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND")
_NUM_PROCESSES_FLAGS = ("--num_processes", "--num-processes")


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch.

    Attributes:
        rank: 0-based index of this process among all processes of all machines.
        world: number of processes that came up.
        local_rank: index of this process on its machine (picks its GPU).
        launcher: "torchrun", "accelerate", "mpirun" or "none" (a plain ``sip`` / ``python -m sip``).
        shortfall: set when the launcher was asked for more processes than came up (e.g. ``accelerate launch
            --cpu --num_processes 2`` starts one process unless through mpirun): what was asked and what came up.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"
    shortfall: str | None = None

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world) and world >= 1, got rank {self.rank} of world {self.world}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")

    @property
    def shard(self) -> tuple[int, int] | None:
        """The (i, n) shard of this process (1-based, as ``--shard i/n``); None for a single process."""
        return None if self.world == 1 else (self.rank + 1, self.world)

    def record(self) -> dict[str, int | str]:
        """The ``run.json`` keys that say how the run was launched (never compared on resume)."""
        return {"processes": self.world, "launcher": self.launcher}

    def describe(self) -> str:
        """``"rank 2/4 (torchrun)"``: how logs and summary lines name this process."""
        return f"rank {self.rank + 1}/{self.world} ({self.launcher})"


def _int_of(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, int] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return name, int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} in the environment is not an integer; the launcher sets it "
                                 "(unset it when not under torchrun / accelerate launch / mpirun)") from None
    return None


def parent_command_line() -> list[str] | None:
    """The parent process's argument list (Linux ``/proc``), or None when it cannot be read."""
    try:
        data = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in data.split(b"\0") if a]


def _asked_processes(argv: Sequence[str] | None) -> int | None:
    """The ``--num_processes`` of an ``accelerate launch`` command line, or None."""
    if not argv or not any(Path(a).name.startswith("accelerate") for a in argv[:3]):
        return None
    for k, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in _NUM_PROCESSES_FLAGS:
            value = value or (argv[k + 1] if k + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def detect_launch(env: Mapping[str, str] | None = None, parent_argv: Sequence[str] | None = None) -> Launch:
    """Read rank, world and launcher from the environment a launcher set.

    Args:
        env (Mapping[str, str], optional): the environment. Defaults to ``os.environ``.
        parent_argv (Sequence[str], optional): the launcher's command line (to see what ``accelerate launch``
            was asked for when it started only this process). Defaults to the parent process's, read from
            ``/proc`` only when the environment says accelerate started a single process.

    Returns:
        Launch: rank 0 of 1 with launcher "none" outside any launcher.

    Raises:
        ValueError: a rank or world variable is not an integer, or the rank is outside the world.
    """
    env = os.environ if env is None else env
    rank, world, local = _int_of(env, _RANK), _int_of(env, _WORLD), _int_of(env, _LOCAL)
    if (rank is None) != (world is None):
        have, lack = (rank, "WORLD_SIZE") if world is None else (world, "RANK")
        raise ValueError(f"{have[0]} is set but {lack} is not: a launcher sets both (unset {have[0]}, or launch "
                         "through torchrun / accelerate launch / mpirun)")
    accelerate = any(name in env for name in _ACCELERATE)
    if accelerate:
        launcher = "accelerate"
    elif rank is None:
        launcher = "none"
    else:
        launcher = "torchrun" if rank[0] == "RANK" else "mpirun"
    r, w = (rank[1], world[1]) if rank else (0, 1)
    if not 0 <= r < w:
        raise ValueError(f"{rank[0]}={r} is outside {world[0]}={w}: a launcher sets 0 <= rank < world size")
    shortfall = None
    if accelerate and w == 1:
        # accelerate's one-process path (e.g. --cpu without mpirun) sets MASTER_ADDR when asked for more than one
        asked = _asked_processes(parent_argv if parent_argv is not None else parent_command_line())
        if asked and asked > 1:
            shortfall = f"accelerate launch was asked for {asked} processes (--num_processes {asked})"
        elif "MASTER_ADDR" in env and rank is None:
            shortfall = "accelerate launch was asked for more than one process (it set MASTER_ADDR)"
    return Launch(r, w, local[1] if local else 0, launcher, shortfall)


def warn_if_alone(launch: Launch) -> str | None:
    """Log one warning line when the launcher asked for more processes than came up; returns it (or None)."""
    if launch.shortfall is None:
        return None
    message = (f"{launch.shortfall} but only this one came up, so it does all the work. On CPUs accelerate "
               "starts several processes only through mpirun (--mpirun_hostfile) or its torchrun path "
               "(--multi_gpu); `torchrun --nproc_per_node N -m sip ...` starts N.")
    logger.warning(message)
    return message


def generation_shard(shard: str | None, launch: Launch) -> tuple[int, int] | None:
    """The shard this process generates: the recipe's ``--shard i/n`` under a single process, else the launch's.

    Args:
        shard (str | None): the recipe's ``shard`` (``"i/n"`` or None).
        launch (Launch): this process's place in the launch (:func:`detect_launch`).

    Raises:
        ValueError: both a ``--shard`` and a multi-process launch split the work (the message names both).
    """
    manual = parse_shard(shard)
    if launch.world == 1:
        return manual
    if manual is not None:
        raise ValueError(f"--shard {shard} (recipe key shard) and a {launch.world}-process {launch.launcher} "
                         f"launch (WORLD_SIZE={launch.world}) both split the work: under torchrun / accelerate "
                         "launch each process takes its share by rank, so drop --shard; or run one plain process "
                         "per --shard i/n by hand.")
    return launch.shard


def process_device(device: str, launch: Launch, cuda_devices: int | None = None) -> str:
    """The device this process generates on: under a multi-process launch, ``"auto"`` / ``"cuda"`` become the
    GPU of the process's local rank (``cuda:<local_rank>``), so N processes on a machine use N GPUs, not one.

    Args:
        device (str): the recipe's ``generate.device``; an explicit index (``cuda:1``) or ``cpu`` is kept.
        launch (Launch): this process's place in the launch.
        cuda_devices (int, optional): GPUs visible to this process. Defaults to ``torch.cuda.device_count()``.
    """
    if launch.world == 1 or device not in ("auto", "cuda"):
        return device
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_devices == 0:
        return device
    return f"cuda:{launch.local_rank % cuda_devices}"
