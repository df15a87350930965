"""sip adapt over several processes (sip.adapt.collective): each process computes its share of every step's batch,
the shares' losses and gradients add up to the whole batch's, and a 2-process torchrun run (gloo, CPU processes
standing in for GPUs) ends with the weights of a one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sip.adapt.collective import Share

from test_adapt import _recipe, _shots

pytest.importorskip("peft")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return _shots(tmp_path_factory.mktemp("shots") / "train")


def test_the_shares_of_a_batch_add_up_to_the_whole_batch_loss_and_gradient(tiny_sd_dir, shots):
    from diffusers import DDPMScheduler

    from sip.adapt.loop import denoising_loss, encode_shots
    from sip.adapt.methods import build_method
    from sip.adapt.run import load_shots
    from sip.adapt.steps import tokenize
    from sip.models.diffusion import load_diffusion_pipeline

    recipe = _recipe("textual_inversion", tiny_sd_dir, shots, Path("unused"), batch_size=5)
    pipe = load_diffusion_pipeline(str(tiny_sd_dir), "txt2img", device="cpu")
    classes, images, labels, _ = load_shots(recipe, 32)
    method = build_method(recipe, pipe, classes)
    encoded = encode_shots(pipe, images, labels)
    ids = tokenize(pipe, [recipe.template.format(label=method.names[c]) for c in classes])
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.eval()

    def loss_and_grad(rows):
        method.vectors.grad = None
        loss = denoising_loss(pipe, noise, method.encode, encoded, ids, 5, seed=0, step=3, rows=rows)
        loss.backward()
        return loss.item(), method.vectors.grad.clone()

    whole, g_whole = loss_and_grad(None)
    parts = [loss_and_grad(Share(r, 2).rows(5)) for r in range(2)]  # rows 0, 2, 4 and 1, 3
    assert Share(1, 2).rows(5).tolist() == [1, 3]
    assert sum(p[0] for p in parts) == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(parts[0][1] + parts[1][1], g_whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(parts[0][1], g_whole)  # a share alone is not the whole batch


def _sip_adapt(recipe_file: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([*launcher, "-m", "sip", "adapt", str(recipe_file)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


@pytest.mark.slow  # three processes importing torch and diffusers: ~1 min here
def test_two_torchrun_processes_end_with_the_weights_of_one(tiny_sd_dir, shots, tmp_path):
    from dataclasses import asdict

    from sip.adapt.loop import CHECKPOINT_FILE, load_checkpoint

    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        recipe = asdict(_recipe("lora", tiny_sd_dir, shots, out, steps=3, checkpoint_every=3))
        recipe["validation"]["every"] = 0
        recipe["source"] = {"kind": "folder", "path": str(shots)}
        recipe_file = tmp_path / f"adapt{processes}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        result = _sip_adapt(recipe_file, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[processes] = out
    info = json.loads((outs[2] / "run.json").read_text())
    assert info["finished"] and (info["processes"], info["launcher"]) == (2, "torchrun")
    one, two = (json.loads((outs[p] / "run.json").read_text())["losses"] for p in (1, 2))
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-4)  # the whole batch's loss
    a, _, _, _ = load_checkpoint(outs[1] / CHECKPOINT_FILE)
    b, _, _, _ = load_checkpoint(outs[2] / CHECKPOINT_FILE)
    # Adam's first steps move each weight by about lr whatever its gradient's size, so a gradient near 0 that float
    # summation order changes can move it differently: 1e-3 is 3 % of the 3 steps' largest move (lr 1e-2)
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-3) for k in a)
    assert (outs[2] / "pytorch_lora_weights.safetensors").is_file() and not list(outs[2].glob("*.tmp"))
