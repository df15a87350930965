"""Setting up a diffusers pipeline for sip's generator: the explicit step that changes its modules
(:func:`prepare_pipeline`: channels-last, KDEformer attention, compile) and the check of whether sip may feed it
pre-encoded latents and prompt embeddings (:func:`supports_fast_path`). Re-exported by :mod:`sip.augment.generate`.
"""

from __future__ import annotations

from typing import Any

import torch

from sip.models.kdeformer import kdeformer_config

__all__ = ["prepare_pipeline", "supports_fast_path"]


def prepare_pipeline(pipe: Any, config: Any) -> Any:
    """Apply ``config``'s speed settings to ``pipe`` in place and return it (used by ``from_config``).

    This is the one step that changes a pipeline's modules: ``channels_last`` puts the UNet and VAE in
    NHWC memory format, ``compile`` compiles the UNet in place (``nn.Module.compile``: the pipeline keeps its
    UNet object and config). :class:`DiffusionGenerator` itself uses a pipeline as given, so a caller who
    passes their own pipeline calls this when they want those settings.

    Args:
        pipe: a diffusers Stable Diffusion family pipeline.
        config (:class:`~sip.augment.generate.GenerateConfig`): reads ``channels_last``, ``attention`` / ``kdeformer`` and ``compile``.

    Returns:
        the same pipeline.
    """
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if (kde := kdeformer_config(config.attention, config.kdeformer, "generate")) is not None:
        from sip.models.kdeformer_layers import use_kdeformer_in_unet  # imports timm: only when asked

        use_kdeformer_in_unet(pipe.unet, kde)
    if config.compile and getattr(pipe.unet, "_compiled_call_impl", None) is None:
        # freezing: the weights become constants of the compiled graph (their autocast casts folded away,
        # prepacked for oneDNN on a CPU); generation runs without grad, where freezing applies
        pipe.unet.compile(options={"freezing": True})
    return pipe


def supports_fast_path(pipe: Any) -> bool:
    """Whether sip may hand ``pipe`` pre-encoded latents and prompt embeddings (its fast path).

    Needs an img2img pipeline whose call takes ``prompt_embeds`` / ``negative_prompt_embeds`` and no pooled
    embeddings (SDXL), an ``encode_prompt`` that returns (embeds, negative), an image processor, and a
    4-channel VAE (diffusers takes a 4-channel ``image`` as latents).
    """
    import inspect

    try:
        call = inspect.signature(pipe.__call__).parameters
        encode = inspect.signature(pipe.encode_prompt).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return ("prompt_embeds" in call and "negative_prompt_embeds" in call and "strength" in call
            and "pooled_prompt_embeds" not in call and "prompt_2" not in encode
            and hasattr(pipe, "image_processor") and getattr(pipe, "vae", None) is not None
            and int(getattr(pipe.vae.config, "latent_channels", 0)) == 4)
