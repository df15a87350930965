"""Model loading and sip's own architectures.

- :mod:`sip.models.diffusion`: Stable Diffusion pipelines, tiny VAEs, schedulers, the offline CLIP tokenizer.
- :mod:`sip.models.classifiers`: the offline ImageNet classifier; the timm factory and explicit
  registration of sip's architectures.
- :mod:`sip.models.involution`, :mod:`sip.models.civt`: sip's architectures.

The shipped model folders (``fmnist-tiny-sd``) live beside these modules, where users find them.
"""
