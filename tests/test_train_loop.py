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


KILL_AFTER_FIRST_CHECKPOINT = """
import sys
import sip.train.loop as loop
real = loop.save_checkpoint
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    raise KeyboardInterrupt("simulated kill after the first checkpoint")
loop.save_checkpoint = save_then_die
from sip.cli import app
app(prog_name="sip", args=sys.argv[1:])
"""


@pytest.mark.slow  # two processes under torchrun, then one in-process resume: ~1 min here
def test_a_two_process_run_killed_mid_epoch_resumes_under_one_process(tmp_path, caplog):
    """Killed after its first checkpoint (2 steps of each of 2 ranks = 40 of the epoch's 60 items), a DDP run
    resumes in one process at that global offset: the epoch's last 20 items take 2 one-process steps, the
    learning-rate schedule continues from the same point, and the run ends as a one-process run would: 18
    steps, epochs 1-3 logged once, the same learning rate at each epoch's end."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from sip.train.run import run_training

    from conftest import TRAIN_TINY, tiny_train_recipe

    out, script = tmp_path / "ddp", tmp_path / "kill.py"
    script.write_text(KILL_AFTER_FIRST_CHECKPOINT)
    flags = [x for s in [*TRAIN_TINY, "run.checkpoint_every_steps=2"] for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), "train", "-o", str(out), *flags], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0, proc.stderr[-3000:]  # rank 0 died (click reports the interrupt as "Aborted!")
    counters = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["counters"]
    assert {k: int(counters[k]) for k in ("epoch", "step_in_epoch", "epoch_items", "world")} == {
        "epoch": 0, "step_in_epoch": 2, "epoch_items": 40, "world": 2}

    recipe = tiny_train_recipe("run.checkpoint_every_steps=2")
    with caplog.at_level("WARNING", logger="sip"):
        resumed = run_training(recipe, out)
    assert "made by 2 processes with 1" in caplog.text
    one = run_training(recipe, tmp_path / "one")
    assert resumed["processes"] == 1 and resumed["steps"] == one["steps"] == 18
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    assert [x["step"] for x in lines] == [x["step"] for x in reference] == [6, 12, 18]
    assert [x["lr"] for x in lines] == pytest.approx([x["lr"] for x in reference])
