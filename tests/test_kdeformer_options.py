"""KDEformer as a recipe option: ``generate.attention`` for diffusion UNets, ``model.attention`` for timm ViTs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sip.augment.generate import DiffusionGenerator, GenerateConfig
from sip.models.kdeformer import KDEformerConfig, kdeformer_config
from sip.train.recipe import ModelSection

SOURCE = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))).convert("RGB")


def _variant(model_dir, **settings) -> tuple[np.ndarray, DiffusionGenerator]:
    config = GenerateConfig(model=str(model_dir), steps=4, strength=0.5, device="cpu", precision="fp32", **settings)
    gen = DiffusionGenerator.from_config(config)
    return np.asarray(gen.img2img([SOURCE], ["a shirt"], [7])[0], dtype=np.int16), gen


def test_generate_attention_kdeformer_sets_the_unet_self_attention_processors(tiny_sd_dir):
    exact, _ = _variant(tiny_sd_dir)
    # the tiny UNet's attention level has 8 x 8 = 64 tokens: a budget of 8 + 8 keys is an estimate
    approx, gen = _variant(tiny_sd_dir, attention="kdeformer",
                           kdeformer={"num_samples": 8, "block_size": 8, "min_tokens": 0})
    kinds = {k: type(p).__name__ for k, p in gen.pipe.unet.attn_processors.items()}
    assert kinds and all((v == "KDEformerAttnProcessor") == k.endswith("attn1.processor") for k, v in kinds.items())
    assert approx.shape == exact.shape and np.abs(approx - exact).max() > 0
    # default threshold (1,024 tokens) leaves a 64-token attention exact: the same bytes as exact attention
    same, _ = _variant(tiny_sd_dir, attention="kdeformer")
    assert np.array_equal(same, exact)


@pytest.mark.parametrize("settings, message", [
    ({"attention": "fast"}, "generate.attention must be one of exact, kdeformer"),
    ({"attention": "kdeformer", "kdeformer": {"samples": 8}}, "generate.kdeformer has unknown keys ['samples']"),
    ({"kdeformer": {"num_samples": 8}}, "generate.kdeformer is set but generate.attention is exact"),
    ({"attention": "kdeformer", "kdeformer": {"num_samples": 0}}, "kdeformer.num_samples must be >= 1"),
])
def test_generate_attention_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GenerateConfig(device="cpu", **settings)


def test_model_attention_kdeformer_swaps_timm_vit_attention_with_the_same_weights():
    from sip.models.kdeformer_layers import KDEformerAttention
    from sip.train.inputs import build_model

    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    exact, _ = build_model(ModelSection(name="vit_tiny_patch16_224", patch_size=2, kwargs=kw), 5, 32)
    torch.manual_seed(0)
    section = ModelSection(name="vit_tiny_patch16_224", patch_size=2, kwargs=kw, attention="kdeformer",
                           kdeformer={"num_samples": 32, "block_size": 32, "min_tokens": 0})
    kde, create_kwargs = build_model(section, 5, 32)
    assert sum(isinstance(m, KDEformerAttention) for m in kde.modules()) == 2
    assert "attention" not in create_kwargs  # the checkpoint rebuilds the plain architecture
    a, b = exact.state_dict(), kde.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 32, 32)  # 16 x 16 patches + 1 class token = 257 tokens: the estimate runs
    with torch.no_grad():
        out, ref = kde.eval()(x), exact.eval()(x)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_model_attention_kdeformer_swaps_sip_lsa_attention_and_keeps_its_outputs_below_the_threshold():
    from sip.models.kdeformer_layers import KDEformerLocalitySelfAttention
    from sip.train.inputs import build_model

    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    exact, _ = build_model(ModelSection(name="sip_vit_spt_lsa_tiny", patch_size=2, kwargs=kw), 5, 32)
    with torch.no_grad():  # a trained-looking temperature (not the initial timm scale)
        for m in exact.modules():
            if hasattr(m, "log_temperature"):
                m.log_temperature.fill_(-1.0)
    state = exact.state_dict()
    x = torch.randn(2, 3, 32, 32)  # 16 x 16 patches + 1 class token = 257 tokens
    outputs = {}
    for name, settings in (("below", {"min_tokens": 1024}), ("above", {"num_samples": 32, "block_size": 32,
                                                                      "min_tokens": 0})):
        section = ModelSection(name="sip_vit_spt_lsa_tiny", patch_size=2, kwargs=kw, attention="kdeformer",
                               kdeformer=settings)
        kde, _ = build_model(section, 5, 32)
        kde.load_state_dict(state)
        assert sum(isinstance(m, KDEformerLocalitySelfAttention) for m in kde.modules()) == 2
        with torch.no_grad():
            outputs[name] = kde.eval()(x)
    with torch.no_grad():
        ref = exact.eval()(x)
    assert torch.allclose(outputs["below"], ref, atol=1e-5)  # exact path keeps LSA's mask and temperature
    assert torch.isfinite(outputs["above"]).all() and not torch.allclose(outputs["above"], ref)


def test_model_attention_kdeformer_on_a_model_without_attention_is_a_clear_error():
    from sip.train.inputs import build_model

    section = ModelSection(name="resnet10t", attention="kdeformer")
    with pytest.raises(ValueError, match="has no attention layer to swap"):
        build_model(section, 10, 28)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        ModelSection(attention="kde")


def test_kdeformer_config_reads_the_recipe_keys():
    assert kdeformer_config("exact", None, "model") is None
    assert kdeformer_config("kdeformer", {}, "model") == KDEformerConfig()
    assert kdeformer_config("kdeformer", {"num_samples": 64, "seed": 3}, "generate") == KDEformerConfig(
        num_samples=64, seed=3)


def test_eval_script_compares_on_copies_and_leaves_the_trained_model_exact():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scripts.eval_kdeformer_vit import compare, token_count
    from sip.models.classifiers import create_model
    from sip.models.vit_small_data import LocalitySelfAttention

    torch.manual_seed(0)
    model = create_model("sip_vit_spt_lsa_tiny", {"num_classes": 4, "img_size": 16, "patch_size": 2,
                                                  "embed_dim": 32, "depth": 1, "num_heads": 2}).eval()
    assert token_count(model) == 65
    batches = [{"image": torch.randn(8, 3, 16, 16), "label": torch.randint(0, 4, (8,))} for _ in range(2)]
    rows = compare(model, batches, [(16, 8)])
    with torch.no_grad():
        logits = torch.cat([model(b["image"]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert rows[0]["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert rows[1]["logit_rel_diff"] > 0 and rows[1]["drop"] == pytest.approx(rows[0]["top1"] - rows[1]["top1"])
    assert sum(type(m) is LocalitySelfAttention for m in model.modules()) == 1  # the swap happened on a copy
