"""sip.distill.mixup: reproducible batch mixup / CutMix for consistent distillation."""

from __future__ import annotations

import pytest
import torch

from sip.distill.mixup import BatchMixConfig, draw_batch_mix


def test_same_seed_epoch_step_gives_the_same_mix_and_another_step_another():
    cfg = BatchMixConfig(mixup_alpha=1.0, cutmix_alpha=1.0)
    a = draw_batch_mix(cfg, 16, (28, 28), seed=3, epoch=2, step=5)
    b = draw_batch_mix(cfg, 16, (28, 28), seed=3, epoch=2, step=5)
    assert torch.equal(a.perm, b.perm) and a.lam == b.lam and a.box == b.box
    others = [draw_batch_mix(cfg, 16, (28, 28), seed=3, epoch=2, step=s) for s in range(6, 12)]
    assert any(o.lam != a.lam or not torch.equal(o.perm, a.perm) for o in others)


def test_mixup_is_a_convex_combination_with_the_partner():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 6, 6)
    mix = draw_batch_mix(BatchMixConfig(mixup_alpha=0.4), 8, (6, 6), seed=0, epoch=0, step=0)
    assert mix.box is None and 0 < mix.lam < 1
    assert torch.allclose(mix.apply(x), mix.lam * x + (1 - mix.lam) * x[mix.perm])
    t = mix.mix_targets(torch.arange(8) % 3, 3)
    assert torch.allclose(t.sum(1), torch.ones(8))


def test_cutmix_pastes_a_box_and_lambda_is_the_kept_area():
    x = torch.zeros(4, 1, 10, 10)
    x[1] = 1.0
    for step in range(20):
        mix = draw_batch_mix(BatchMixConfig(cutmix_alpha=1.0), 4, (10, 10), seed=1, epoch=0, step=step)
        out = mix.apply(x)
        top, left, h, w = mix.box
        assert mix.lam == pytest.approx(1 - h * w / 100)
        i = int((mix.perm == 1).nonzero()[0])  # the sample whose partner is image 1
        if i != 1:
            assert out[i].sum().item() == pytest.approx(h * w)
        assert torch.equal(x, torch.zeros_like(x).index_fill_(0, torch.tensor([1]), 1.0))  # input untouched


def test_disabled_or_prob_zero_is_the_identity():
    x = torch.rand(4, 3, 5, 5)
    for cfg in (BatchMixConfig(), BatchMixConfig(mixup_alpha=1.0, prob=0.0)):
        mix = draw_batch_mix(cfg, 4, (5, 5), seed=0, epoch=0, step=0)
        assert mix.lam == 1.0 and torch.equal(mix.apply(x), x)


@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=-1), dict(prob=1.5), dict(switch_prob=-0.1)])
def test_bad_settings_are_clear_errors(kwargs):
    with pytest.raises(ValueError):
        BatchMixConfig(**kwargs)
