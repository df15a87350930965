"""CLIPFilter end to end on a tiny random CLIP (transformers ``CLIPModel`` from a small config + the offline
``CLIPTokenizer``), loaded from a save_pretrained folder through ``filter.kind: clip`` as a user's hub model is:
scores are CLIPScore's 100 · cos(image, prompt) whatever the batching, the threshold drops exactly the images
below it (through ``sip augment``, into rejected.jsonl), and bad settings name their key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sip.augment.filter import CLIPFilter, FilterConfig, build_filter


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sip.models.diffusion import offline_clip_tokenizer

    root = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = offline_clip_tokenizer(root / "tokenizer-src", num_merges=1000)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    folder = root / "clip"
    CLIPModel(config).eval().save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def pictures(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car on a road", "a shirt", "two birds", "a bag"]


def test_scores_are_clipscore_whatever_the_batching(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = pictures(len(PROMPTS))
    f = build_filter(FilterConfig(kind="clip", model=str(tiny_clip_dir), threshold=-100.0, device="cpu"))
    assert isinstance(f, CLIPFilter)
    batched = f(images, ["x"] * len(images), PROMPTS)
    f.batch_size = 1
    single = f(images, ["x"] * len(images), PROMPTS)
    scores = [s["clip_score"] for _, s in batched]
    assert scores == pytest.approx([s["clip_score"] for _, s in single], abs=1e-2)
    assert all(keep for keep, _ in batched) and len(set(scores)) == len(scores)
    # an independent computation: the saved model's projected embeddings, cosine × 100
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.inference_mode():
        out = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    expected = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert scores == pytest.approx(expected.tolist(), abs=1e-2)
    # the prompt matters: the same image scored against another prompt gets another score
    other = f(images[:1], ["x"], PROMPTS[1:2])[0][1]["clip_score"]
    assert other != pytest.approx(scores[0], abs=1e-3)


def test_threshold_drops_exactly_the_images_below_it_through_sip_augment(tiny_clip_dir, image_folder, tmp_path,
                                                                         tiny_sd_img2img, fixed_captioner):
    from sip.augment.generate import DiffusionGenerator, GenerateConfig
    from sip.augment.run import AugmentRecipe, run_augment
    from sip.data.bank import read_metadata
    from sip.data.sources import SourceConfig

    gen = GenerateConfig(steps=4, per_image=2, batch_size=4, strength=0.5, device="cpu")

    def augment(out: Path, threshold: float):
        recipe = AugmentRecipe(source=SourceConfig(kind="folder", path=str(image_folder)), generate=gen,
                               output=str(out), progress=False, chunk=4,
                               filter=FilterConfig(kind="clip", model=str(tiny_clip_dir), threshold=threshold,
                                                   device="cpu"))
        return run_augment(recipe, DiffusionGenerator(tiny_sd_img2img, gen, model_id="tiny"), fixed_captioner)

    s = augment(tmp_path / "all", -100.0)
    scores = sorted(r["scores"]["clip_score"] for r in read_metadata(tmp_path / "all"))
    assert s.filtered == 0 and len(scores) == s.written > 2
    cut = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # half above, half below
    s = augment(tmp_path / "half", cut)
    kept = [r["scores"]["clip_score"] for r in read_metadata(tmp_path / "half")]
    rejected = [json.loads(line)["scores"]["clip_score"]
                for line in (tmp_path / "half" / "rejected.jsonl").read_text().splitlines()]
    assert s.written == len(kept) == sum(x >= cut for x in scores)
    assert s.filtered == len(rejected) == sum(x < cut for x in scores) > 0
    assert min(kept) >= cut > max(rejected)


def test_bad_clip_settings_name_the_key(tmp_path, tiny_clip_dir):
    with pytest.raises(ValueError, match="filter.model"):
        FilterConfig(kind="clip")
    with pytest.raises(ValueError, match=r"filter\.threshold.*-100, 100.*0\.5"):
        FilterConfig(kind="clip", model=str(tiny_clip_dir), threshold=150.0)
    with pytest.raises(FileNotFoundError, match="CLIP model folder .*missing-clip"):
        build_filter(FilterConfig(kind="clip", model=str(tmp_path / "missing-clip"), device="cpu"))
