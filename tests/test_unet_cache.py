"""sip.augment.unet_cache (DeepCache): exact at zero reuse, fewer deep-block calls and close images when on,
the UNet as it was after each call, the option through a recipe."""

import numpy as np
import pytest
import torch

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.augment.run import AugmentRecipe
from sip.augment.unet_cache import cached_modules, feature_cache
from sip.config import from_dict, load_config, to_dict

BASE = {"steps": 4, "strength": 0.5, "guidance_scale": 4.0, "device": "cpu", "precision": "fp32"}
PROMPTS, SEEDS = ["a cat", "a dog"], [1, 2]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


class CallCount:
    """Counts forward calls of a module with a forward hook."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.n += 1


def test_interval_1_reuses_nothing_and_gives_the_uncached_bytes(tiny_sd_img2img, image_folder):
    from sip.data.sources import ImageFolderSource

    gen = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE))
    sources = [s.image for s in ImageFolderSource(image_folder)][:2]
    off_t, off_i = gen.text2img(PROMPTS, SEEDS), gen.img2img(sources, PROMPTS, SEEDS)
    with feature_cache(tiny_sd_img2img.unet, 1) as state:  # every module patched, every call a full one
        on_t, on_i = gen.text2img(PROMPTS, SEEDS), gen.img2img(sources, PROMPTS, SEEDS)
    assert state.calls == state.full_calls > 0 and not state.outputs
    assert [im.tobytes() for im in on_t + on_i] == [im.tobytes() for im in off_t + off_i]
    # an interval longer than the denoising loop: one full call, nothing reused either
    one_step = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**{**BASE, "steps": 1, "cache_interval": 2}))
    assert [im.tobytes() for im in one_step.text2img(PROMPTS, SEEDS)] == \
        [im.tobytes() for im in gen.text2img(PROMPTS, SEEDS, steps=1)]


def test_interval_2_calls_the_deep_blocks_half_as_often_and_stays_close(tiny_sd_img2img):
    unet = tiny_sd_img2img.unet
    deep, shallow = CallCount(unet.mid_block.resnets[0]), CallCount(unet.up_blocks[-1].resnets[-1])
    down = CallCount(unet.down_blocks[0].resnets[0])
    try:
        off = pixels(DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE)).text2img(PROMPTS, SEEDS))
        counts_off = (deep.n, down.n, shallow.n)
        cached = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE, cache_interval=2))
        on = pixels(cached.text2img(PROMPTS, SEEDS))
        counts_on = (deep.n - counts_off[0], down.n - counts_off[1], shallow.n - counts_off[2])
    finally:
        for c in (deep, shallow, down):
            c.handle.remove()
    assert counts_off == (4, 4, 4)  # 4 steps, guidance batched into one UNet call per step
    assert counts_on == (2, 2, 4)  # deep and down blocks on full steps only; the shallow branch every step
    other_seed = pixels(DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE)).text2img(PROMPTS, [7, 8]))
    change, seed_change = np.abs(on - off).mean(), np.abs(other_seed - off).mean()
    assert 0 < change < 0.1 * seed_change, (change, seed_change)
    again = pixels(cached.text2img(PROMPTS, SEEDS))  # no state carried from one call to the next
    assert np.array_equal(again, on)
    assert cached.settings()["cache_interval"] == 2 and "cache_interval" not in \
        DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE)).settings()


def test_the_unet_is_as_it_was_after_the_block_even_on_error(tiny_sd_img2img):
    unet = tiny_sd_img2img.unet
    modules = cached_modules(unet)
    assert unet.mid_block in modules and unet.up_blocks[-1].resnets[-1] not in modules
    with pytest.raises(RuntimeError, match="boom"), feature_cache(unet, 3):
        assert all("forward" in m.__dict__ for m in modules)
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in modules)
    assert not unet._forward_pre_hooks


def test_a_changed_input_gets_a_full_call(tiny_sd_img2img):
    unet = tiny_sd_img2img.unet
    text = torch.zeros(1, 77, 32)
    with torch.inference_mode(), feature_cache(unet, 4) as state:
        for size in (16, 16, 8, 8):
            unet(torch.randn(1, 4, size, size), 10, encoder_hidden_states=text)
    assert (state.calls, state.full_calls) == (4, 2)


def test_cache_interval_round_trips_through_a_recipe_and_bad_values_fail_early():
    recipe = load_config(AugmentRecipe, overrides=["generate.cache_interval=3"])
    assert recipe.generate.cache_interval == 3 and recipe.generate.token_merge_ratio == 0.0
    assert from_dict(AugmentRecipe, to_dict(recipe)) == recipe
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
            GenerateConfig(cache_interval=bad)
    with pytest.raises(ValueError, match="compile cannot be combined"):
        GenerateConfig(cache_interval=2, compile=True)
    with pytest.raises(ValueError, match="needs a UNet with down_blocks"):
        with feature_cache(torch.nn.Linear(2, 2), 2):
            pass
