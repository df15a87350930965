"""sip.train.loop: the precision ``auto`` picks on a CPU (make_accelerator)."""

from __future__ import annotations

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
