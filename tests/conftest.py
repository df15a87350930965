"""Shared, offline, seeded fixtures: tiny real models built from configs and small image folders.

Nothing here touches the network or a model hub. The environment is pinned at import time, before any
test module imports ``huggingface_hub`` / ``transformers`` / ``datasets`` (they read these variables
once, at import): offline mode everywhere, and a throw-away ``HF_HOME`` so a developer's own cache can
neither satisfy nor be written by a test. pytest-socket (``--disable-socket`` in pyproject's addopts)
turns any network attempt into an immediate error instead of a hang.

Fixtures (see each docstring for details):

==========================  =======  ===============================================================
name                        scope    returns
==========================  =======  ===============================================================
``tiny_sd_dir``             session  ``Path`` of a tiny Stable Diffusion in ``save_pretrained`` layout
``tiny_sd_img2img``         session  ``StableDiffusionImg2ImgPipeline`` loaded from ``tiny_sd_dir``
``tiny_sd_txt2img``         session  ``StableDiffusionPipeline`` loaded from ``tiny_sd_dir``
``tiny_blip_dir``           session  ``Path`` of a tiny BLIP captioner (model + processor)
``tiny_blip``               session  ``TinyBlip(processor, model)`` loaded from ``tiny_blip_dir``
``make_tiny_classifier``    session  ``(name="test_resnet", num_classes=10, seed=0, **kw) -> nn.Module``
``tiny_classifier``         function a fresh seeded ``timm`` ``test_resnet`` with 10 classes, eval mode
``image_folder``            function ``ImageFolderFixture``: ``root/<label>/*`` in varied formats + bad files
``photo_folder``            session  ``Path``: real photos (skimage / sklearn) in ``root/<label>/``
``fixed_captioner``         function a captioner that answers "a small picture" (identity ``fixed:v1``)
``teachers``                session  ``{key: Path}``: run folders of three tiny trained teachers (distillation)
``store``                   session  ``Path`` of a teacher-logits store built from two of ``teachers``
==========================  =======  ===============================================================

Helpers imported by test modules (``from conftest import ...``): the bank fakes (``bank_writer``,
``bank_write``, ...; tests/test_bank_*.py) and the distillation recipes (``DISTILL_DATA``,
``logits_recipe``, ``distill_recipe``; tests/test_distill*.py), the tiny training recipe (``TRAIN_TINY``,
``tiny_train_recipe``; tests/test_train*.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

# --------------------------------------------------------------------------------------------------
# Environment: set (not setdefault) before anything imports the HF libraries.
# --------------------------------------------------------------------------------------------------
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_name] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
_HF_HOME = tempfile.mkdtemp(prefix="sip-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")

# urllib3 probes IPv6 support with a local socket at import time; importing it here, before
# pytest-socket blocks sockets for each test, keeps that probe from showing up as a network attempt.
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import urllib3  # noqa: E402, F401
from PIL import Image  # noqa: E402

# The models here are tiny: thread start-up and synchronisation cost more than the arithmetic, and on a
# 2-core machine with the other core busy, 2 threads made a 2-step img2img call ~10x slower (1 s vs 0.1 s).
torch.set_num_threads(1)

# Geometry of the tiny Stable Diffusion: VAE with 2 blocks = one 2x downsampling, so a 32x32 image is a
# 16x16x4 latent; the UNet's sample_size 16 makes 32x32 the txt2img default.
TINY_SD_IMAGE_SIZE = 32
TINY_SD_LATENT_SIZE = 16
TINY_BLIP_IMAGE_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Tiny Stable Diffusion
# --------------------------------------------------------------------------------------------------

def build_tiny_sd(save_dir: Path, seed: int = 0) -> Path:
    """Build a random, seeded, ~0.5 M-parameter Stable Diffusion and ``save_pretrained`` it to ``save_dir``.

    Components: ``UNet2DConditionModel`` (32/64 channels, 1 layer per block, cross-attention dim 32),
    ``AutoencoderKL`` (32/64 channels, 4 latent channels, 2x downsampling), ``CLIPTextModel``
    (hidden 32, 2 layers) with the offline CLIP tokenizer (1,000 merges), ``DDIMScheduler``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sip.models.diffusion import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer(save_dir.parent / f"{save_dir.name}-tokenizer-src", num_merges=1000)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
        layers_per_block=1, norm_num_groups=32, sample_size=TINY_SD_IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir, safe_serialization=True)
    return save_dir


def build_tiny_taesd(blocks: int = 2, latent_channels: int = 4, seed: int = 0):
    """A seeded random ``AutoencoderTiny`` (TAESD layout) with ``blocks - 1`` 2x up/down-samplings (2 fits the tiny
    SD's 2x, 4-channel latents), in eval mode."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
                           num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks,
                           latent_channels=latent_channels).eval()


def build_tiny_lora(sd_dir: Path, out: Path) -> Path:
    """A seeded rank-4 LoRA of the tiny SD's attention in diffusers' ``save_lora_weights`` layout (lora_B non-zero:
    a LoRA that changes nothing would test nothing)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(pipe.unet)), safe_serialization=True)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random Stable Diffusion in diffusers' ``save_pretrained`` layout (safetensors).

    Loads with ``AutoPipelineForImage2Image/Text2Image.from_pretrained`` and
    ``sip.models.diffusion.load_diffusion_pipeline``; images are 32x32 (latents 16x16x4). Read-only: copy it
    (``shutil.copytree``) before changing files in it.
    """
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_img2img(tiny_sd_dir):
    """``StableDiffusionImg2ImgPipeline`` on CPU, fp32, progress bar off, loaded through
    ``sip.models.diffusion.load_diffusion_pipeline``. Shared by the session: do not change its scheduler or
    modules in place (load your own from ``tiny_sd_dir`` for that)."""
    from sip.models.diffusion import load_diffusion_pipeline

    return load_diffusion_pipeline(str(tiny_sd_dir), mode="img2img", device="cpu")


@pytest.fixture(scope="session")
def tiny_sd_txt2img(tiny_sd_dir):
    """``StableDiffusionPipeline`` (txt2img), otherwise as :func:`tiny_sd_img2img`."""
    from sip.models.diffusion import load_diffusion_pipeline

    return load_diffusion_pipeline(str(tiny_sd_dir), mode="txt2img", device="cpu")


# --------------------------------------------------------------------------------------------------
# Tiny BLIP captioner
# --------------------------------------------------------------------------------------------------

# A small WordPiece vocabulary: BERT's five specials, BLIP's decoder start token, and some words.
TINY_BLIP_VOCAB = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]",
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "close", "up",
    "cat", "dog", "cup", "coffee", "table", "person", "man", "woman", "rocket", "flower", "building",
    "shirt", "sneaker", "bag", "dress", "coat", "trouser", "boot", "white", "black", "red", "small",
    "##s", "##ing",
)


class TinyBlip(NamedTuple):
    """A loaded tiny BLIP: ``processor(images=..., return_tensors="pt")`` then ``model.generate``."""

    processor: object
    model: object


def build_tiny_blip(save_dir: Path, seed: int = 0) -> Path:
    """Build a random, seeded BLIP captioner (vision + text hidden 32, 2 layers, 32x32 input) and a
    ``BlipProcessor`` with an offline WordPiece tokenizer; ``save_pretrained`` both to ``save_dir``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )
    from transformers.models.bert.tokenization_bert import load_vocab

    save_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = save_dir / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_BLIP_VOCAB) + "\n", encoding="utf-8")
    # [DEC] is the decoder's start token (BLIP's bos); as a special token it is dropped when decoding.
    tokenizer = BertTokenizer(vocab=load_vocab(str(vocab_file)), bos_token="[DEC]", model_max_length=40)
    image_processor = BlipImageProcessor(size={"height": TINY_BLIP_IMAGE_SIZE, "width": TINY_BLIP_IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
            projection_dim=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
            bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=4, image_size=TINY_BLIP_IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32, image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return save_dir


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random BLIP captioner + processor (``save_pretrained`` layout). Loads offline
    with ``AutoProcessor`` and ``AutoModelForImageTextToText`` / ``BlipForConditionalGeneration``;
    ``generate`` returns ids that decode to (meaningless) words of the tiny vocabulary."""
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip") / "model")


@pytest.fixture(scope="session")
def tiny_blip(tiny_blip_dir) -> TinyBlip:
    """``TinyBlip(processor, model)`` loaded from :func:`tiny_blip_dir` (model in eval mode, CPU)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_blip_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_blip_dir)).eval()
    return TinyBlip(processor, model)


# --------------------------------------------------------------------------------------------------
# Tiny timm classifiers
# --------------------------------------------------------------------------------------------------

# timm's own tiny test architectures (0.1-0.4 M parameters; any input size from 32 px up works).
TINY_TIMM_MODELS = ("test_resnet", "test_vit", "test_efficientnet", "test_convnext")


@pytest.fixture(scope="session")
def make_tiny_classifier():
    """Factory ``make(name="test_resnet", num_classes=10, seed=0, **kwargs) -> torch.nn.Module``: a fresh
    randomly initialised (``pretrained=False``), seeded ``timm`` model in eval mode. Any
    ``timm.list_models("test_*")`` name works (see ``TINY_TIMM_MODELS``)."""
    import timm

    def make(name: str = "test_resnet", num_classes: int = 10, seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()

    return make


@pytest.fixture
def tiny_classifier(make_tiny_classifier):
    """A fresh seeded ``timm`` ``test_resnet`` with 10 classes (eval mode); safe to train in a test."""
    return make_tiny_classifier("test_resnet", num_classes=10, seed=0)


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageFolderFixture:
    """A tiny labelled folder ``root/<label>/<file>`` and what a reader should make of it.

    Usable wherever a path is (``os.fspath``/``str`` give ``root``).

    Attributes:
        root: the folder.
        classes: sorted label names (the sub-folders).
        good: relative path -> (label name, PIL mode as written, (width, height)) of every readable image.
        corrupt: relative paths of files with an image extension that cannot be decoded.
        non_images: relative paths of files without an image extension (to be ignored).
    """

    root: Path
    classes: tuple[str, ...]
    good: dict[str, tuple[str, str, tuple[int, int]]] = field(default_factory=dict)
    corrupt: tuple[str, ...] = ()
    non_images: tuple[str, ...] = ()

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)


def _pattern(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth, seeded RGB pattern (JPEG/WebP compress it without surprises)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 2 * np.pi, 3)
    chans = [127.5 + 127.5 * np.sin(x / w * 6.3 * (c + 1) + y / h * 3.1 + phase[c]) for c in range(3)]
    return np.stack(chans, axis=-1).round().astype(np.uint8)


def make_image_folder(root: Path) -> ImageFolderFixture:
    """Write the varied-format labelled folder described by :class:`ImageFolderFixture`."""
    good: dict[str, tuple[str, str, tuple[int, int]]] = {}

    def save(rel: str, image: Image.Image, **kwargs) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        good[rel] = (rel.split("/")[0], image.mode, image.size)

    # cat: RGB PNG (odd size), RGBA PNG, palette PNG with a transparent index, WebP
    save("cat/rgb_17x31.png", Image.fromarray(_pattern((17, 31), 1)))
    rgba = np.dstack([_pattern((64, 48), 2), np.linspace(0, 255, 64 * 48).reshape(48, 64).astype(np.uint8)])
    save("cat/rgba_64x48.png", Image.fromarray(rgba))
    palette = Image.fromarray(_pattern((40, 24), 3)).quantize(colors=16)
    palette.info["transparency"] = 0
    save("cat/palette_transparent.png", palette, transparency=0)
    save("cat/photo.webp", Image.fromarray(_pattern((33, 20), 4)), quality=90)
    # dog: greyscale JPEG, CMYK JPEG, RGBA WebP, uppercase extension
    save("dog/grey.jpg", Image.fromarray(_pattern((31, 17), 5)[..., 0]), quality=90)
    save("dog/cmyk.jpg", Image.fromarray(_pattern((48, 64), 6)).convert("CMYK"), quality=90)
    save("dog/rgba.webp", Image.fromarray(rgba), lossless=True)
    save("dog/UPPER.JPEG", Image.fromarray(_pattern((20, 20), 7)), quality=90)
    # bird: 16-bit greyscale PNG (full 0..65535 range), palette PNG without transparency
    deep = (np.linspace(0, 65535, 29 * 23).reshape(23, 29)).astype(np.uint16)
    save("bird/deep_16bit.png", Image.fromarray(deep))
    save("bird/palette.png", Image.fromarray(_pattern((25, 19), 8)).quantize(colors=8))

    # Bad files: a PNG signature followed by garbage (opens as "PNG", fails to decode); a text file.
    corrupt = "bird/broken.png"
    (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(9).bytes(200))
    notes = "dog/notes.txt"
    (root / notes).write_text("not an image\n", encoding="utf-8")

    return ImageFolderFixture(root=root, classes=("bird", "cat", "dog"), good=good, corrupt=(corrupt,),
                              non_images=(notes,))


@pytest.fixture
def image_folder(tmp_path_factory) -> ImageFolderFixture:
    """A fresh tiny labelled folder (3 classes: bird, cat, dog; 10 readable images in RGB, RGBA, P with
    and without transparency, L, CMYK, I;16; PNG/JPEG/WebP; odd sizes) plus ``bird/broken.png``
    (corrupt) and ``dog/notes.txt`` (not an image). Returns an :class:`ImageFolderFixture`
    (``.root`` is the folder; ``os.fspath(image_folder)`` works too)."""
    return make_image_folder(tmp_path_factory.mktemp("image_folder"))


# label -> (loader, file name). Real photos that ship with scikit-image / scikit-learn (no download).
PHOTOS = {
    "cat": ("skimage:chelsea", "chelsea.png"),
    "coffee": ("skimage:coffee", "coffee.jpg"),
    "person": ("skimage:astronaut", "astronaut.png"),
    "rocket": ("skimage:rocket", "rocket.jpg"),
    "china": ("sklearn:china.jpg", "china.jpg"),
    "flower": ("sklearn:flower.jpg", "flower.png"),
}


def _load_photo(spec: str) -> np.ndarray:
    kind, name = spec.split(":")
    if kind == "skimage":
        import skimage.data

        return getattr(skimage.data, name)()
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def make_photo_folder(root: Path, max_side: int = 128) -> Path:
    """Write the :data:`PHOTOS` into ``root/<label>/<file>``, shrunk to ``max_side`` (aspect kept)."""
    for label, (spec, file_name) in PHOTOS.items():
        image = Image.fromarray(_load_photo(spec)).convert("RGB")
        image.thumbnail((max_side, max_side), Image.BICUBIC)
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / file_name, **({"quality": 92} if file_name.endswith(".jpg") else {}))
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """``Path`` of a folder of six real photos, one per class, in ``root/<label>/``: cat (chelsea.png),
    coffee (coffee.jpg), person (astronaut.png), rocket (rocket.jpg), china (china.jpg), flower
    (flower.png); longest side 128 px, aspect kept (e.g. 128x85). Shared by the session: read-only."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"))


# --------------------------------------------------------------------------------------------------
# A fake captioner (real captioners are tested in test_caption.py)
# --------------------------------------------------------------------------------------------------
class FixedCaptioner:
    """A captioner with a fixed answer, for tests of the stages after captioning."""

    identity = "fixed:v1"

    def __call__(self, images):
        return ["a small picture" for _ in images]


@pytest.fixture
def fixed_captioner() -> FixedCaptioner:
    """A captioner that answers "a small picture" for every image (identity ``fixed:v1``)."""
    return FixedCaptioner()


# --------------------------------------------------------------------------------------------------
# The on-disk bank: a DatasetWriter driven directly with small PIL images (tests/test_bank_*.py)
# --------------------------------------------------------------------------------------------------
BANK_LABELS = ["Coat", "Bag"]
BANK_CONFIG = {"source": {"kind": "folder", "path": "IN"}, "generate": {"steps": 4, "seed": 0, "batch_size": 8},
               "output": "out"}


def bank_image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i * 20 % 256, 7, 200))


def bank_writer(out: Path, shard=None, config=BANK_CONFIG, **kw):
    """A ``DatasetWriter`` on ``out`` for :data:`BANK_LABELS` with ``config`` (default :data:`BANK_CONFIG`)."""
    from sip.data.bank import DatasetWriter

    return DatasetWriter(out, {"sip_version": "test", "config": config}, BANK_LABELS, shard, **kw)


def bank_write(w, ids, offset: int = 0) -> None:
    """Write image ``img<i>`` (label alternating over :data:`BANK_LABELS`) for each i in ``ids``."""
    for i in ids:
        w.write(f"img{i}", bank_image(i + offset), BANK_LABELS[i % 2], {"seed": i, "prompt": f"p{i}"})


def bank_meta(out: Path) -> Path:
    return out / "train" / "metadata.jsonl"


def bank_load_counts(out: Path) -> tuple[int, int, int]:
    """Rows in metadata.jsonl, rows datasets' imagefolder loads, images torchvision's ImageFolder finds."""
    import json

    import datasets
    from torchvision.datasets import ImageFolder

    rows = [json.loads(line) for line in bank_meta(out).read_text().splitlines()]  # strict: a torn line fails here
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    return len(rows), len(ds), len(ImageFolder(str(out / "train")))


def bank_sharded(out: Path) -> None:
    """Shards 1/2 (images 0, 2, 4, 6 and a rejected img99; finished) and 2/2 (1, 3, 5, 7; not finished)."""
    for i in (1, 2):
        w = bank_writer(out, shard=(i, 2))
        bank_write(w, range(i - 1, 8, 2))
        if i == 1:
            w.reject("img99", "Coat", {"scores": {}})
            assert not w.finish()


# --------------------------------------------------------------------------------------------------
# Distillation: tiny teachers trained once per session, and a logits store built from two of them
# --------------------------------------------------------------------------------------------------
# fp32: at 16 px the ResNets' last stride-2 conv sees a 1x1 map, where torch 2.14's bf16 (AMX) weight gradient
# is intermittently NaN (see sip.train.loop.fit); these tests are about distillation, not about that upstream bug.
DISTILL_DATA = ["data.real.shots=3", "data.real.start=50000", "data.eval.shots=5", "data.val.size=20",
                "data.img_size=16", "data.batch_size=10", "data.repeat=2", "run.progress=false", "run.threads=1",
                "run.device=cpu", "run.precision=fp32"]
DISTILL_STUDENT = ["student.name=test_vit", "student.patch_size=4", "student.kwargs={depth: 2}", "optim.epochs=2"]


def logits_recipe(teacher_dirs, *extra):
    """A ``LogitsRecipe`` on :data:`DISTILL_DATA` for the teachers in ``teacher_dirs`` (3 views), plus ``extra``."""
    from sip.config import load_config
    from sip.distill.run import LogitsRecipe

    ts = ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs)
    return load_config(LogitsRecipe, overrides=[*DISTILL_DATA, f"teachers=[{ts}]", "store.views=3", *extra])


def distill_recipe(teacher_dirs, *extra):
    """A ``DistillRecipe``: :data:`DISTILL_STUDENT` on :data:`DISTILL_DATA` from ``teacher_dirs``, plus ``extra``."""
    from sip.config import load_config
    from sip.distill.run import DistillRecipe

    ts = ", ".join(f"{{checkpoint: {d}}}" for d in teacher_dirs)
    return load_config(DistillRecipe, overrides=[*DISTILL_DATA, *DISTILL_STUDENT, f"teachers=[{ts}]", *extra])


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Run folders of three teachers trained one epoch on :data:`DISTILL_DATA`: ``test_resnet`` (seed 0),
    ``sip_rednet_tiny`` (seed 0) and ``other_resnet`` (``test_resnet``, seed 1: the same architecture with
    other weights)."""
    from sip.config import load_config
    from sip.train.recipe import TrainRecipe
    from sip.train.run import run_training

    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for key, name, seed in (("test_resnet", "test_resnet", 0), ("sip_rednet_tiny", "sip_rednet_tiny", 0),
                            ("other_resnet", "test_resnet", 1)):
        # test_resnet halves 16 px five times; output_stride 16 keeps its last stage on a 2x2 map (sip refuses
        # a last stage that would get less than its stride: sip.models.input_checks)
        stride = ["model.kwargs={output_stride: 16}"] if name == "test_resnet" else []
        recipe = load_config(TrainRecipe, overrides=[*DISTILL_DATA, f"model.name={name}", "optim.epochs=1",
                                                     f"run.seed={seed}", *stride])
        run_training(recipe, root / key)
        out[key] = root / key
    return out


@pytest.fixture(scope="session")
def store(teachers, tmp_path_factory) -> Path:
    """A float32 teacher-logits store of ``test_resnet`` and ``sip_rednet_tiny`` over the 30 real images of
    :data:`DISTILL_DATA`, 3 views each, in shards of 12 (12 + 12 + 6)."""
    from sip.distill.run import run_logits

    out = tmp_path_factory.mktemp("store")
    run_logits(logits_recipe([teachers["test_resnet"], teachers["sip_rednet_tiny"]], "store.dtype=float32",
                             "store.shard_size=12"), out)
    return out


# --------------------------------------------------------------------------------------------------
# Training: the tiny recipe (tests/test_train*.py)
# --------------------------------------------------------------------------------------------------
# A few seconds per run on one core: 3 shots × 10 classes at 16 px, a 2-block ViT, 20 validation, 50 test images.
TRAIN_TINY = [
    "data.real.shots=3", "data.real.start=50000", "data.eval.shots=5", "data.val.size=20", "data.img_size=16",
    "data.batch_size=10", "data.repeat=2", "model.name=test_vit", "model.patch_size=4", "model.kwargs={depth: 2}",
    "optim.epochs=3",
    "optim.warmup_epochs=0.5", "run.progress=false", "run.threads=1", "run.device=cpu",
]


def tiny_train_recipe(*extra: str):
    """The ``TrainRecipe`` of :data:`TRAIN_TINY` with ``extra`` overrides."""
    from sip.config import load_config
    from sip.train.recipe import TrainRecipe

    return load_config(TrainRecipe, overrides=[*TRAIN_TINY, *extra])
