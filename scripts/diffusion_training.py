"""What scripts/train_tiny_sd.py and scripts/train_tiny_lcm.py share: resumable checkpoints of several modules
(safetensors weights + optimiser state + the step), the warm-up + cosine LR factor and one optimiser step.

These train the shipped diffusion models (outside ``sip``'s classifier loop); importable as
``scripts.diffusion_training`` with the repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def save_ckpt(path: Path, modules: dict, opt, step: int, extra: dict | None = None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, m in modules.items():
        state = m.state_dict() if hasattr(m, "state_dict") else m
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp / f"{name}.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    # state.json (the step) last: a crash part-way leaves the previous step's state with its own files, or
    # new weights under the old step (redone from there), never a new step over old weights
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "state.json"):
        f.replace(path / f.name)
    tmp.rmdir()


def load_ckpt(path: Path, modules: dict, opt) -> int:
    from safetensors.torch import load_file

    if not (path / "state.json").is_file():
        return 0
    for name, m in modules.items():
        state = load_file(path / f"{name}.safetensors")
        if hasattr(m, "load_state_dict"):
            m.load_state_dict(state)
        else:
            for k, v in state.items():
                m[k].copy_(v)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())["step"]


def warmup_cosine(opt, steps: int, warmup: int, start: int):
    """Linear warm-up then cosine decay to 0 over ``steps``, resumed at step ``start``."""
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    if start:
        for group in opt.param_groups:  # LambdaLR with last_epoch >= 0 wants the initial lr recorded
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at, last_epoch=start - 1)


def optimizer_step(loss: torch.Tensor, opt, sched, clip_params=None) -> None:
    """Backward, optional gradient clipping at norm 1, optimizer and scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
