"""sip.train.loop: the precision ``auto`` picks on a CPU (make_accelerator), and DDP under torchrun (slow)."""

from __future__ import annotations

import pytest
import torch


def test_precision_auto_on_an_amx_cpu_takes_bf16_only_for_large_inputs(monkeypatch):
    from sip.train.loop import make_accelerator
    from sip.train.recipe import RunSection

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    run = RunSection(device="cpu")
    assert make_accelerator(run, img_size=28).mixed_precision == "no"  # 28 px: fp32 is faster here
    assert make_accelerator(run, img_size=224).mixed_precision == "bf16"
    assert make_accelerator(RunSection(device="cpu", precision="bf16"), img_size=28).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert make_accelerator(run, img_size=224).mixed_precision == "no"


@pytest.mark.slow  # two processes under torchrun, each importing torch and timm: ~1 min here
def test_two_processes_train_half_the_steps_each_and_evaluate_every_sample_once(tmp_path):
    """DDP under torchrun (gloo, CPU processes standing in for GPUs): each rank takes half of every epoch, the
    evaluation covers each test sample once (not once per process), and one process evaluating the saved
    weights (a resume after the last epoch) reports the same accuracy on the same sample count."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from sip.train.run import run_training

    from conftest import TRAIN_TINY, tiny_train_recipe

    out = tmp_path / "ddp"
    flags = [x for s in TRAIN_TINY for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sip", "train", "-o", str(out), *flags], capture_output=True, text=True, timeout=600,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "final_metrics.json").read_text())
    assert ddp["processes"] == 2 and ddp["eval_samples"] == 50  # data.eval.shots=5 x 10 classes, once each
    one = run_training(tiny_train_recipe(), tmp_path / "one")
    assert ddp["steps"] * 2 == one["steps"]  # each rank takes half of every epoch
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "final_metrics.json").unlink()
    resumed = run_training(tiny_train_recipe(), again)  # finished run: one process evaluates the saved weights
    assert resumed["processes"] == 1 and resumed["eval_samples"] == 50
    assert resumed["top1"] == pytest.approx(ddp["top1"]) and resumed["eval_loss"] == pytest.approx(ddp["eval_loss"],
                                                                                                    rel=1e-4)
