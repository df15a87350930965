"""sip.augment.token_merge (ToMe for SD): exact at ratio 0, fewer attention tokens and close, reproducible
images at 0.5, lossless merging of duplicate tokens, the option through a recipe."""

import numpy as np
import pytest
import torch

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe
from sip.augment.token_merge import bipartite_soft_matching, merge_targets, token_merging
from sip.config import load_config

BASE = {"steps": 4, "strength": 0.5, "guidance_scale": 4.0, "device": "cpu", "precision": "fp32"}
PROMPTS, SEEDS = ["a cat", "a dog"], [1, 2]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def test_targets_are_the_highest_resolution_self_attentions(tiny_sd_img2img):
    unet = tiny_sd_img2img.unet
    level, targets = merge_targets(unet)
    # the tiny UNet's first level has no attention (like SDXL's): the next one, which for this two-level
    # UNet is also the mid block's (down block 1: 1 layer, mid block: 1, up block 0: 2)
    assert level == 1 and len(targets) == 4
    assert targets[0] is unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert all(not t.is_cross_attention for t in targets)


def test_ratio_0_is_exact_and_0_5_merges_half_the_tokens(tiny_sd_img2img):
    unet = tiny_sd_img2img.unet
    gen = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE))
    off = gen.text2img(PROMPTS, SEEDS)
    with token_merging(unet, 0.0) as state:
        zero = gen.text2img(PROMPTS, SEEDS)
    assert state.merged == 0 and [im.tobytes() for im in zero] == [im.tobytes() for im in off]

    tokens: list[int] = []
    query = merge_targets(unet)[1][0].to_q
    handle = query.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1]))
    try:
        gen.text2img(PROMPTS, SEEDS)
        seen_off = set(tokens)
        tokens.clear()
        merged_gen = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE, token_merge_ratio=0.5))
        merged = merged_gen.text2img(PROMPTS, SEEDS)
    finally:
        handle.remove()
    assert seen_off == {64} and set(tokens) == {32}  # 16x16 latent -> 8x8 tokens at level 1, half merged
    other_seed = pixels(gen.text2img(PROMPTS, [7, 8]))
    change, seed_change = np.abs(pixels(merged) - pixels(off)).mean(), np.abs(other_seed - pixels(off)).mean()
    assert 0 < change < 0.1 * seed_change, (change, seed_change)
    # the destination picks are seeded, not drawn from a global generator: same seed, same bytes
    assert [im.tobytes() for im in merged_gen.text2img(PROMPTS, SEEDS)] == [im.tobytes() for im in merged]
    assert merged_gen.settings()["token_merge_ratio"] == 0.5
    assert not any("forward" in t.__dict__ for t in merge_targets(unet)[1]) and not unet._forward_pre_hooks


def test_merging_duplicate_tokens_loses_nothing():
    torch.manual_seed(0)
    h, w, c = 6, 5, 8  # an odd width: the last column has no whole cell and stays unmerged
    cells = torch.randn(2, h // 2 + 1, w // 2 + 1, c)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w].reshape(2, h * w, c)
    r = (h // 2) * (w // 2) * 3  # every source of every whole cell, each into its own cell's copy
    merge, unmerge = bipartite_soft_matching(x, h, w, r, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (2, h * w - r, c)
    torch.testing.assert_close(unmerge(merged), x)
    merge, _ = bipartite_soft_matching(x, h, w, 10 * h * w, torch.Generator().manual_seed(0))
    assert merge(x).shape[1] == (h // 2) * (w // 2)  # capped: every source merged, the destinations left


def test_token_merge_ratio_round_trips_and_bad_values_fail_early():
    recipe = load_config(AugmentRecipe, overrides=["generate.token_merge_ratio=0.5"])
    assert recipe.generate.token_merge_ratio == 0.5
    for bad in (-0.1, 0.8, 1.0):
        with pytest.raises(ValueError, match=r"token_merge_ratio must be in \[0, 0.75\]"):
            GenerateConfig(token_merge_ratio=bad)
    with pytest.raises(ValueError, match="compile cannot be combined"):
        GenerateConfig(token_merge_ratio=0.5, compile=True)
    with pytest.raises(ValueError, match=r"token merge ratio must be in \[0, 0.75\]"), \
            token_merging(torch.nn.Linear(2, 2), 0.9):
        pass


def test_token_merging_and_feature_caching_do_not_import_each_other_in_a_loop():
    import subprocess
    import sys

    code = ("import sys, sip.augment.token_merge; "
            "print('sip.augment.unet_cache' in sys.modules, 'sip.augment.unet_patch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # the shared forward-patching lives in unet_patch; unet_cache imports the other two
