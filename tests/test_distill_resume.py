"""A distillation killed inside an epoch and resumed reports that epoch's metrics over the whole epoch (issue 31,
finding 5: the resumed line used to hold only the steps after the resume)."""

from __future__ import annotations

import json

import pytest

import sip.train.loop as loop
from sip.distill.run import run_distillation

from conftest import distill_recipe


def test_an_epoch_resumed_from_a_mid_epoch_checkpoint_reports_the_whole_epoch(teachers, tmp_path, monkeypatch):
    recipe = distill_recipe([teachers["test_resnet"]], "run.checkpoint_every_steps=2", "optim.epochs=1",
                            "run.eval_max_samples=5")
    run_distillation(recipe, tmp_path / "whole")
    real_save, calls = loop.save_checkpoint, {"n": 0}

    def kill_after_the_mid_epoch_save(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # step 2 of 6
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(loop, "save_checkpoint", kill_after_the_mid_epoch_save)
    with pytest.raises(KeyboardInterrupt):
        run_distillation(recipe, tmp_path / "resumed")
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    run_distillation(recipe, tmp_path / "resumed")

    whole, resumed = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                      for d in ("whole", "resumed"))
    assert len(whole) == len(resumed) == 1
    a, b = whole[0], resumed[0]
    for key in ("train_loss", "train_kd", "train_ce", "train_top1", "val_top1", "step", "nonfinite_steps"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    # the epoch's time adds both parts: at least the time of the part after the resume
    assert b["epoch_time_s"] > 0 and b["data_time_s"] >= 0
    assert b["train_images_per_s"] == pytest.approx(60 / b["epoch_time_s"], rel=0.02)


def test_the_epoch_time_is_the_sum_of_the_parts():
    tally = loop.EpochTally(seen=20.0, steps=2.0, time_s=1.5, data_s=0.25, terms={"kd": 4.0})
    saved = tally.to_counters(elapsed_s=2.0, data_s=0.5)
    back = loop.EpochTally.from_counters({"epoch": 0.0, **saved})
    assert back.time_s == 3.5 and back.data_s == 0.75 and back.terms == {"kd": 4.0} and back.seen == 20.0
