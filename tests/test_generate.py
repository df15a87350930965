"""sip.augment.generate: sampling settings per call, a pipeline used as given, the fast path by capability."""

import pytest
import torch

from sip.augment.generate import DiffusionGenerator, GenerateConfig, prepare_pipeline, supports_fast_path
from sip.data.sources import ImageFolderSource

BASE = {"steps": 4, "strength": 0.5, "device": "cpu", "precision": "fp32"}


def test_sampling_settings_per_call_equal_a_generator_built_with_them(image_folder, tiny_sd_img2img):
    sources = [s.image for s in ImageFolderSource(image_folder)][:2]
    one = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE), model_id="tiny")
    for strength, guidance, steps in [(0.4, 2.0, 5), (0.8, 5.0, 3)]:
        swept = one.img2img(sources, ["a", "b"], [1, 2], strength=strength, guidance_scale=guidance, steps=steps)
        built = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**{**BASE, "strength": strength,
                                                                      "guidance_scale": guidance, "steps": steps}))
        assert [im.tobytes() for im in swept] == [im.tobytes() for im in built.img2img(sources, ["a", "b"], [1, 2])]
        t_swept = one.text2img(["a"], [3], guidance_scale=guidance, steps=steps)
        assert t_swept[0].tobytes() == built.text2img(["a"], [3])[0].tobytes()
    assert one.settings(guidance_scale=2.0, steps=3)["steps"] == 3 and one.settings()["steps"] == 4
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 1.7"):
        one.img2img(sources[:1], ["a"], [1], strength=1.7)


def test_the_generator_leaves_the_callers_pipeline_as_it_was(tiny_sd_img2img):
    conv = next(m for m in tiny_sd_img2img.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    before = conv.weight.is_contiguous()
    DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE, channels_last=True))
    assert conv.weight.is_contiguous() == before and tiny_sd_img2img.unet._compiled_call_impl is None


def test_prepare_pipeline_is_the_explicit_step(tiny_sd_dir):
    from sip.models.diffusion import load_diffusion_pipeline

    pipe = load_diffusion_pipeline(str(tiny_sd_dir), device="cpu")
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert prepare_pipeline(pipe, GenerateConfig(**BASE, channels_last=True)) is pipe
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def test_fast_path_is_chosen_by_capability_not_class_name(tiny_sd_img2img):
    renamed = type("MyImg2ImgPipeline", (type(tiny_sd_img2img),), {})
    pipe = renamed(**tiny_sd_img2img.components)
    assert supports_fast_path(pipe) and DiffusionGenerator(tiny_sd_img2img, GenerateConfig(**BASE))._fast

    class NoEmbeds:
        vae = tiny_sd_img2img.vae
        image_processor = tiny_sd_img2img.image_processor

        def __call__(self, prompt, image, strength):
            pass

        def encode_prompt(self, prompt):
            pass
    assert not supports_fast_path(NoEmbeds())


def test_compile_freezes_the_weights_once(tiny_sd_dir, monkeypatch):
    """generate.compile compiles with inductor freezing (weights as constants: casts folded, oneDNN-prepacked;
    1.08-1.22x eager in bf16 on SD 1.5, scripts/bench_unet_peak.py --compile), and a compiled UNet is not
    compiled again; that the frozen UNet gives the eager images is the slow test in test_augment.py."""
    from sip.models.diffusion import load_diffusion_pipeline

    calls = []
    original = torch.nn.Module.compile

    def spy(module, *args, **kwargs):
        calls.append((type(module).__name__, args, kwargs))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    pipe = load_diffusion_pipeline(str(tiny_sd_dir), device="cpu")
    prepare_pipeline(pipe, GenerateConfig(**BASE, compile=True))
    prepare_pipeline(pipe, GenerateConfig(**BASE, compile=True))
    assert calls == [("UNet2DConditionModel", (), {"options": {"freezing": True}})]
    assert pipe.unet._compiled_call_impl is not None
