"""``sip adapt`` over several processes (``torchrun`` / ``accelerate launch`` / ``mpirun``): data parallel.

Every process draws the same step batch (the draws are seeded by (seed, step)), computes the loss of its share of
the rows (rows ``rank``, ``rank + world``, …) scaled so that the shares' losses add up to the whole batch's mean,
and the gradients are summed over processes before clipping and the optimiser step. Every process therefore makes
the update a single process makes on the whole batch (up to float summation order), and their weights stay equal
without any broadcast. Process 0 alone writes checkpoints, grids, ``run.json`` and the final files.

The process group comes from accelerate's :class:`~accelerate.PartialState` (gloo for CPU processes, NCCL for GPUs,
from the launcher's environment), as ``sip train`` and ``sip distill`` get theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

BUCKET_ELEMENTS = 1 << 24  # gradients are summed in flat buckets of up to 16 M values (64 MiB in fp32)


@dataclass(frozen=True)
class Share:
    """This process's share of each step's batch."""

    rank: int = 0
    world: int = 1

    def rows(self, batch_size: int) -> torch.Tensor:
        """The batch rows this process computes."""
        return torch.arange(self.rank, batch_size, self.world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(launch: Any, cpu: bool) -> tuple[Share, Any]:
    """The share of this process and its accelerate state (None for a single process, where nothing starts);
    ``cpu``: CPU processes (gloo) rather than one GPU each."""
    if launch.world == 1:
        return Share(), None
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes != launch.world or state.process_index != launch.rank:
        raise RuntimeError(f"accelerate sees process {state.process_index} of {state.num_processes}, the launcher "
                           f"{launch.describe()}: launch every process the same way")
    return Share(launch.rank, launch.world), state


def sum_gradients(params: Sequence[torch.nn.Parameter], share: Share) -> None:
    """Add every process's gradients together, in place (no-op for one process). Every process holds the same
    parameters with the same graph, so the same ones have gradients everywhere."""
    if share.world == 1:
        return
    import torch.distributed as dist

    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in (p.grad for p in params if p.grad is not None):
        last = buckets[-1] if buckets else None
        if last is None or size + g.numel() > BUCKET_ELEMENTS or (g.dtype, g.device) != (last[0].dtype, last[0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    for bucket in buckets:
        flat = torch.cat([b.reshape(-1) for b in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for b in bucket:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def sum_value(value: float, share: Share, device: torch.device | str = "cpu") -> float:
    """``value`` summed over processes (the whole batch's loss from the shares')."""
    if share.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier(share: Share) -> None:
    if share.world > 1:
        import torch.distributed as dist

        dist.barrier()
