import json

import numpy as np
import pytest
from PIL import Image

from sip.augment.caption import (
    CAPTIONERS,
    CaptionCache,
    CaptionConfig,
    ImageNetTopKCaptioner,
    TransformersCaptioner,
    build_captioner,
    caption_images,
)
from sip.ids import image_hash


class Counting:
    """Wraps a real captioner and counts the images it is asked to caption."""

    def __init__(self, inner):
        self.inner, self.identity, self.calls = inner, inner.identity, 0

    def __call__(self, images):
        self.calls += len(images)
        return self.inner(images)


@pytest.fixture(scope="module")
def topk():
    return ImageNetTopKCaptioner.from_config(CaptionConfig(image_size=64, device="cpu"))


def _images(n, size=40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_image_hash_depends_on_pixels_not_object():
    a, b = _images(2)
    assert image_hash(a) == image_hash(a.copy())
    assert image_hash(a) != image_hash(b)


def test_imagenet_topk_captions_a_real_photo():
    from skimage import data

    captioner = ImageNetTopKCaptioner.from_config(CaptionConfig(device="cpu"))
    caption = captioner([Image.fromarray(data.chelsea())])[0]
    assert "cat" in caption, caption


def test_cache_hits_on_rerun_and_across_processes(tmp_path, topk):
    images = _images(5)
    path = tmp_path / "captions.jsonl"
    first = Counting(topk)
    cache = CaptionCache(path)
    out1 = caption_images(images, first, cache, batch_size=2)
    assert first.calls == 5 and cache.misses == 5 and cache.hits == 0
    # same images again in a new cache object (as a rerun would): nothing is captioned
    second = Counting(topk)
    cache2 = CaptionCache(path)
    out2 = caption_images(images[::-1], second, cache2, batch_size=2)
    assert second.calls == 0 and cache2.hits == 5
    assert out2 == out1[::-1]
    # other settings = other identity = a miss
    other = ImageNetTopKCaptioner(topk.model, topk.class_names, top_k=1, image_size=64)
    third = Counting(other)
    caption_images(images[:1], third, CaptionCache(path))
    assert third.calls == 1


def test_cache_ignores_a_torn_last_line(tmp_path, topk):
    path = tmp_path / "captions.jsonl"
    caption_images(_images(2), topk, CaptionCache(path))
    with path.open("a") as f:
        f.write('{"hash": "abc", "capt')
    cache = CaptionCache(path)
    assert len(cache.entries) == 2
    assert all(json.loads(line) for line in path.read_text().splitlines()[:2])


def test_transformers_captioner_on_tiny_blip(tiny_blip_dir):
    captioner = TransformersCaptioner.from_config(
        CaptionConfig(kind="transformers", model=str(tiny_blip_dir), max_new_tokens=5, device="cpu"))
    captions = captioner(_images(3, size=32))
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    with_prefix = TransformersCaptioner(captioner.model, captioner.processor, str(tiny_blip_dir), prefix="a photo of",
                                        max_new_tokens=5)
    assert with_prefix.identity != captioner.identity
    assert len(with_prefix(_images(2, size=32))) == 2


def test_captioner_weight_dtype_is_part_of_the_cache_key(tiny_blip_dir):
    def identity(dtype):
        return TransformersCaptioner.from_config(CaptionConfig(
            kind="transformers", model=str(tiny_blip_dir), max_new_tokens=5, device="cpu", dtype=dtype)).identity

    fp32, bf16 = identity("float32"), identity("bfloat16")
    assert fp32 != bf16 and "bfloat16" in bf16  # a cache written with bf16 weights is not read by an fp32 run


def test_transformers_captioner_passes_generate_kwargs(tiny_blip_dir):
    base = TransformersCaptioner.from_config(
        CaptionConfig(kind="transformers", model=str(tiny_blip_dir), max_new_tokens=6, device="cpu"))
    fixed = TransformersCaptioner(base.model, base.processor, str(tiny_blip_dir), max_new_tokens=6,
                                  generate_kwargs={"min_new_tokens": 6})
    assert fixed.identity != base.identity  # other generation settings, other cache key
    lengths = []
    generate = fixed.model.generate

    def spy(**kwargs):
        ids = generate(**kwargs)
        lengths.append(ids.shape[1])
        return ids

    fixed.model.generate = spy
    assert len(fixed(_images(2, size=32))) == 2
    assert lengths == [1 + 6]  # the decoder's start token, then exactly 6 new tokens (no early stop)


def test_missing_captioner_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="captioner folder .*does-not-exist"):
        build_captioner(CaptionConfig(kind="transformers", model=str(tmp_path / "does-not-exist")))


def test_registry_plugs_in_a_user_captioner_and_lists_names():
    class Shape:
        identity = "shape:v1"

        def __call__(self, images):
            return [f"a {im.width}x{im.height} picture" for im in images]

    CAPTIONERS.register("shape-test", lambda cfg: Shape(), overwrite=True)
    captioner = build_captioner(CaptionConfig(kind="shape-test"))
    assert caption_images(_images(1, 8), captioner) == ["a 8x8 picture"]
    with pytest.raises(ValueError, match="imagenet-topk"):
        build_captioner(CaptionConfig(kind="imagenet-topks"))


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"max_new_tokens": 0}, {"top_k": 0}, {"image_size": 8}])
def test_bad_caption_config(bad):
    with pytest.raises(ValueError):
        CaptionConfig(**bad)
