"""Engines for many processes and machines: :mod:`sip.scale.launch` (torchrun / accelerate launch ranks)."""
