"""Few-step generation: sip's latent consistency distillation (scripts/train_tiny_lcm.py) and hub-style few-step
checkpoints (an LCM with a guidance embedding, an SD-Turbo-style Euler-ancestral trailing model) through
``--model`` / ``generate.scheduler``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.train_tiny_lcm import DDIMSolver, boundary_scalings, consistency, distill, parse_args  # noqa: E402
from sip.augment.generate import DiffusionGenerator, GenerateConfig  # noqa: E402
from tests.conftest import TINY_SD_IMAGE_SIZE, build_tiny_lora  # noqa: E402


class UNetCalls:
    """Counts the UNet's forward calls and the batch size of each."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda _m, args: self.batches.append(int(args[0].shape[0])))

    def close(self):
        self.handle.remove()


def variant_of(tiny_sd_dir: Path, out: Path, scheduler, unet_extra: dict | None = None) -> Path:
    """A copy of the tiny SD with another scheduler and, optionally, a UNet with extra config (random init)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    if unet_extra:
        torch.manual_seed(1)
        pipe.unet = type(pipe.unet).from_config({**pipe.unet.config, **unet_extra})
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def source_image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


# --------------------------------------------------------------------------------------------------
# the distillation's pieces equal what diffusers' schedulers do at inference
# --------------------------------------------------------------------------------------------------

def test_boundary_scalings_are_lcm_schedulers_and_identity_at_zero():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    t = torch.tensor([0, 19, 259, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        want = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(want[0], rel=1e-6)
        assert c_out[i].item() == pytest.approx(want[1], rel=1e-6, abs=1e-9)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, 0) = x


def test_ddim_solver_is_one_ddim_step_on_the_lcm_grid():
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    solver = DDIMSolver(ddim.alphas_cumprod, 1000, 50)
    assert solver.timesteps.flip(0).tolist() == ddim.timesteps.tolist()  # 999, 979, …, 19
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for index in (49, 20, 0):
        t = int(solver.timesteps[index])
        a = ddim.alphas_cumprod[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        ours = solver.step(x0, eps, torch.tensor([index]))
        theirs = ddim.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_trained_consistency_function_is_what_lcm_scheduler_denoises(tiny_sd_txt2img):
    from diffusers import LCMScheduler

    unet = tiny_sd_txt2img.unet
    sched = LCMScheduler.from_config(tiny_sd_txt2img.scheduler.config, original_inference_steps=50)
    sched.set_timesteps(2)
    t = int(sched.timesteps[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size, generator=g)
    emb = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ours = consistency(unet, x, torch.tensor([t, t]), emb, sched.alphas_cumprod)
        sched._init_step_index(t)
        theirs = sched.step(unet(x, t, emb).sample, t, x, generator=g).denoised
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the distillation itself: resumable, and its output runs under LCMScheduler through sip's generator
# --------------------------------------------------------------------------------------------------

def test_distilled_tiny_sd_resumes_and_generates_in_few_steps(tiny_sd_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_sd_dir, teacher)
    common = ["--teacher", str(teacher), "--out", str(tmp_path / "lcm"), "--work", str(tmp_path / "work"),
              "--images", "40", "--batch", "4", "--prompts", "label", "--threads", "1"]
    distill(parse_args(common + ["--steps", "2"]))
    state = json.loads((tmp_path / "work" / "lcm" / "state.json").read_text())
    assert state["step"] == 2 and state["loss"] > 0
    distill(parse_args(common + ["--steps", "3"]))  # resumes at step 2: one more step
    assert json.loads((tmp_path / "work" / "lcm" / "state.json").read_text())["step"] == 3
    assert not (tmp_path / "lcm.tmp").exists()
    record = json.loads((tmp_path / "lcm" / "training_args.json").read_text())
    assert record["baked_guidance"] == 4.0 and record["steps"] == 3

    gen = DiffusionGenerator.from_config(GenerateConfig(model=str(tmp_path / "lcm"), steps=4, guidance_scale=1,
                                                        device="cpu", batch_size=2))
    assert type(gen.pipe.scheduler).__name__ == "LCMScheduler"
    calls = UNetCalls(gen.pipe.unet)
    src = source_image()
    out = gen.img2img([src, src], ["a photo of a coat"] * 2, [1, 2], strength=0.5)
    assert calls.batches == [2, 2]  # 4 steps at strength 0.5: two UNet evaluations, no guidance branch
    calls.batches.clear()
    txt = gen.text2img(["a photo of a coat"], [3], steps=1)
    calls.close()
    assert calls.batches == [1]
    assert [im.size for im in out + txt] == [(TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE)] * 3
    # the teacher's UNet is left as it was; the student moved
    from safetensors.torch import load_file

    before = load_file(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "lcm" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_lcm_distillation_refuses_the_few_shot_pool():
    with pytest.raises(SystemExit):
        parse_args(["--images", "60000"])


# --------------------------------------------------------------------------------------------------
# hub-style few-step checkpoints through --model and generate.scheduler
# --------------------------------------------------------------------------------------------------

def test_an_lcm_checkpoint_with_a_guidance_embedding_runs_one_branch(tiny_sd_dir, tmp_path):
    from diffusers import LCMScheduler

    model = variant_of(tiny_sd_dir, tmp_path / "lcm-hub", LCMScheduler, {"time_cond_proj_dim": 32})
    images = {}
    for w in (2.0, 8.0):
        gen = DiffusionGenerator.from_config(GenerateConfig(model=str(model), steps=4, guidance_scale=w,
                                                            device="cpu"))
        calls = UNetCalls(gen.pipe.unet)
        images[w] = gen.text2img(["a photo of a coat", "a photo of a bag"], [0, 1])
        calls.close()
        assert calls.batches == [2] * 4  # the scale goes in as an embedding: no doubled CFG batch
    assert images[2.0][0].tobytes() != images[8.0][0].tobytes()  # and the embedding is used


def test_a_turbo_style_checkpoint_runs_in_one_step(tiny_sd_dir, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler

    class Trailing(EulerAncestralDiscreteScheduler):
        @classmethod
        def from_config(cls, config, **kw):
            return EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing", **kw)

    model = variant_of(tiny_sd_dir, tmp_path / "turbo", Trailing)
    gen = DiffusionGenerator.from_config(GenerateConfig(model=str(model), steps=1, guidance_scale=0.0,
                                                        device="cpu"))
    assert gen.pipe.scheduler.config.timestep_spacing == "trailing"
    calls = UNetCalls(gen.pipe.unet)
    txt = gen.text2img(["a photo of a coat"], [0])
    img = gen.img2img([source_image()], ["a photo of a coat"], [0], strength=0.5, steps=2)
    calls.close()
    assert calls.batches == [1, 1]  # txt2img: 1 step; img2img: 2 steps × strength 0.5
    assert txt[0].size == img[0].size == (TINY_SD_IMAGE_SIZE, TINY_SD_IMAGE_SIZE)


def test_scheduler_by_name_round_trips_through_save(tiny_sd_dir, tmp_path):
    gen = DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), scheduler="LCMScheduler", steps=4,
                                                        guidance_scale=1, device="cpu"))
    sched = gen.pipe.scheduler
    assert type(sched).__name__ == "LCMScheduler"
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.beta_end == 0.012
    gen.pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    again = DiffusionGenerator.from_config(GenerateConfig(model=str(tmp_path / "saved"), steps=4, guidance_scale=1,
                                                          device="cpu"))
    assert type(again.pipe.scheduler).__name__ == "LCMScheduler"
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(again.pipe.scheduler.config) == public(sched.config)


def test_a_few_step_model_run_like_a_30_step_one_gets_a_hint(tiny_sd_dir):
    with pytest.warns(UserWarning, match="generate.steps: 4, generate.guidance_scale: 1"):
        DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), scheduler="LCMScheduler", steps=30,
                                                      guidance_scale=4, device="cpu"))
    with pytest.warns(UserWarning, match="set generate.cache_interval: 1"):
        DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), scheduler="LCMScheduler", steps=8,
                                                      guidance_scale=1, cache_interval=2, device="cpu"))


def test_img2img_with_no_denoising_step_is_a_clear_error(tiny_sd_img2img):
    gen = DiffusionGenerator(tiny_sd_img2img, GenerateConfig(model="tiny", steps=1, guidance_scale=1, device="cpu"))
    with pytest.raises(ValueError, match=r"none at steps=1, strength=0.5; set generate.steps >= 2"):
        gen.img2img([source_image()], ["a photo of a coat"], [0], strength=0.5)
    assert len(gen.img2img([source_image()], ["a photo of a coat"], [0], strength=0.5, steps=2)) == 1


# --------------------------------------------------------------------------------------------------
# LoRAs (an LCM-LoRA on a hub SD checkpoint; here a tiny random LoRA of the tiny SD's attention)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lora(tiny_sd_dir, tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    return build_tiny_lora(tiny_sd_dir, tmp_path_factory.mktemp("tiny-lora"))


def test_a_lora_is_fused_at_its_scale_and_recorded(tiny_sd_dir, tiny_lora):
    from sip.models.diffusion import load_diffusion_pipeline

    base = dict(model=str(tiny_sd_dir), steps=4, guidance_scale=1, device="cpu")
    args = ([source_image()], ["a photo of a coat"], [7])
    plain = DiffusionGenerator.from_config(GenerateConfig(**base)).img2img(*args)[0]
    fused_gen = DiffusionGenerator.from_config(GenerateConfig(**base, lora=str(tiny_lora)))
    fused = fused_gen.img2img(*args)[0]
    assert fused.tobytes() != plain.tobytes()
    assert fused_gen.settings()["lora"] == str(tiny_lora) and "lora" not in DiffusionGenerator.from_config(
        GenerateConfig(**base)).settings()
    # the same LoRA as live adapter layers (diffusers' unfused path) gives the same image
    pipe = load_diffusion_pipeline(str(tiny_sd_dir), "img2img", device="cpu")
    pipe.load_lora_weights(str(tiny_lora))
    live = DiffusionGenerator(pipe, GenerateConfig(**base)).img2img(*args)[0]
    diff = np.abs(np.asarray(live, dtype=int) - np.asarray(fused, dtype=int))
    assert diff.max() <= 2
    # scale 0 fuses nothing: the base model's bytes
    zero = DiffusionGenerator.from_config(GenerateConfig(**base, lora=str(tiny_lora), lora_scale=0.0)).img2img(*args)
    assert zero[0].tobytes() == plain.tobytes()


def test_a_missing_lora_names_the_path(tiny_sd_dir, tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), lora=str(tmp_path / "nope"),
                                                      device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds 0 .safetensors files"):
        DiffusionGenerator.from_config(GenerateConfig(model=str(tiny_sd_dir), lora=str(tmp_path / "empty"),
                                                      device="cpu"))
