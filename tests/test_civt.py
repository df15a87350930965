"""sip.models.civt: one distillation token and head per teacher, checked against the contract of timm's
distilled DeiT that it extends (two heads in distilled training, their mean in eval)."""

from __future__ import annotations

import timm
import torch

from sip.models.classifiers import create_model


def test_timm_distilled_deit_returns_two_heads_in_distilled_training():
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, img_size=16, patch_size=4, depth=1,
                              embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    model.set_distilled_training(True)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert model.eval()(x).shape == (2, 4)


def test_civt_has_one_token_and_head_per_teacher():
    model = create_model("sip_civt_tiny", dict(num_classes=5, img_size=16, patch_size=4, depth=1, embed_dim=32,
                                               num_heads=2, num_distill_tokens=3))
    x = torch.randn(2, 3, 16, 16)
    model.set_distilled_training(True)
    outs = model.train()(x)
    assert len(outs) == 4 and all(o.shape == (2, 5) for o in outs)
    model.eval()
    with torch.no_grad():
        merged = model(x)
        tokens = model.forward_features(x)
        heads = [model.head(tokens[:, 0])] + [h(tokens[:, i + 1]) for i, h in enumerate(model.heads_dist)]
        expected = torch.stack(heads).mean(0)
    torch.testing.assert_close(merged, expected)
    assert model.pos_embed.shape[1] == 16 + 4
    assert {"dist_tokens", "cls_token", "pos_embed"} <= model.no_weight_decay()
