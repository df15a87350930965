"""sip.models.vit_small_data: Shifted Patch Tokenization and Locality Self-Attention (Lee, Lee & Song 2021)."""

from __future__ import annotations

import math

import pytest
import torch

from sip.models.classifiers import create_model
from sip.models.vit_small_data import LocalitySelfAttention, ShiftedPatchTokenization, shift_diagonally

SMALL = dict(num_classes=10, img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_shift_content_is_the_image_moved_half_a_patch_diagonally_with_zero_fill():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    s = 2
    out = shift_diagonally(x, s)
    assert out.shape == (2, 15, 8, 8)
    assert torch.equal(out[:, :3], x)
    left_up, right_up, left_down, right_down = out[:, 3:6], out[:, 6:9], out[:, 9:12], out[:, 12:15]
    assert torch.equal(left_up[..., :-s, :-s], x[..., s:, s:])
    assert torch.equal(right_up[..., :-s, s:], x[..., s:, :-s])
    assert torch.equal(left_down[..., s:, :-s], x[..., :-s, s:])
    assert torch.equal(right_down[..., s:, s:], x[..., :-s, :-s])
    # uncovered borders are zero
    assert left_up[..., -s:, :].abs().sum() == 0 and left_up[..., :, -s:].abs().sum() == 0
    assert right_down[..., :s, :].abs().sum() == 0 and right_down[..., :, :s].abs().sum() == 0


def test_spt_output_shape_and_patch_vector_width():
    spt = ShiftedPatchTokenization(img_size=28, patch_size=4, in_chans=3, embed_dim=48)
    assert spt.num_patches == 49 and spt.grid_size == (7, 7)
    assert spt.proj.in_features == 5 * 3 * 4 * 4
    assert spt(torch.randn(2, 3, 28, 28)).shape == (2, 49, 48)


def test_spt_token_sees_its_neighbours_border():
    # A change in the pixel just right of patch (0, 0) reaches token 0 through the shifted copies.
    spt = ShiftedPatchTokenization(img_size=8, patch_size=4, in_chans=1, embed_dim=8).eval()
    x = torch.zeros(1, 1, 8, 8)
    y = x.clone()
    y[..., 1, 4] = 1.0  # inside patch (0, 1), within half a patch of patch (0, 0)
    assert not torch.allclose(spt(x)[0, 0], spt(y)[0, 0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=3, patch_size=4), "smaller than one patch"),
    (dict(img_size=30, patch_size=4), "not a multiple"),
    (dict(img_size=28, patch_size=1), "at least 2"),
])
def test_spt_bad_sizes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShiftedPatchTokenization(in_chans=3, embed_dim=8, **kwargs)


def test_lsa_masks_the_diagonal_each_token_attends_only_to_others():
    torch.manual_seed(0)
    attn = LocalitySelfAttention(dim=8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 2, 8)
    out = attn(x)
    # With two tokens and self-attention masked, token 0's output is exactly the projection of token 1's value.
    v = attn.qkv(x)[..., 16:]
    assert torch.allclose(out[:, 0], attn.proj(v[:, 1]), atol=1e-5)
    assert torch.allclose(out[:, 1], attn.proj(v[:, 0]), atol=1e-5)


def test_lsa_temperature_is_learned_and_starts_at_the_fixed_scale():
    torch.manual_seed(0)
    attn = LocalitySelfAttention(dim=16, num_heads=2)
    assert attn.temperature.item() == pytest.approx(1 / math.sqrt(8))
    x = torch.randn(2, 5, 16)
    attn(x).pow(2).sum().backward()
    assert attn.log_temperature.grad is not None and attn.log_temperature.grad.abs() > 0
    # matches a reference softmax(mask(q kᵀ τ)) v at another temperature
    with torch.no_grad():
        attn.log_temperature.fill_(math.log(0.9))
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * 0.9
        s = s + torch.zeros(5, 5).fill_diagonal_(float("-inf"))
        ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16)
        assert torch.allclose(attn(x), attn.proj(ref), atol=1e-5)


@pytest.mark.parametrize("name", ["sip_vit_spt_lsa_tiny", "sip_deit_spt_lsa_tiny_distilled", "sip_civt_spt_lsa_tiny"])
def test_registered_models_train_as_plain_deit_and_multi_token_students(name):
    kwargs = dict(SMALL, num_distill_tokens=2) if "civt" in name else dict(SMALL)
    model = create_model(name, kwargs)
    assert isinstance(model.patch_embed, ShiftedPatchTokenization)
    assert all(isinstance(b.attn, LocalitySelfAttention) for b in model.blocks)
    x = torch.randn(2, 3, 28, 28)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
        outs = model.train()(x)
        assert isinstance(outs, tuple) and len(outs) == (3 if "civt" in name else 2)
        sum(o.sum() for o in outs).backward()
    else:
        model.train()(x).sum().backward()
    assert model.eval()(x).shape == (2, 10)


def test_spt_and_lsa_switch_off_to_the_plain_vit_of_the_same_layout():
    plain = create_model("sip_vit_spt_lsa_tiny", dict(SMALL, spt=False, lsa=False))
    both = create_model("sip_vit_spt_lsa_tiny", dict(SMALL))
    assert type(plain.patch_embed).__name__ == "PatchEmbed"
    assert type(plain.blocks[0].attn).__name__ == "Attention"
    n_plain = sum(p.numel() for p in plain.parameters())
    n_both = sum(p.numel() for p in both.parameters())
    # SPT widens the first projection 5x (+ its LayerNorm); LSA adds one temperature per block.
    assert n_both - n_plain == (5 - 1) * 48 * 32 + 2 * 5 * 48 + SMALL["depth"]


def test_pretrained_weights_are_refused_clearly():
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("sip_vit_spt_lsa_tiny", dict(SMALL), pretrained=True)
