"""Measure a small Stable Diffusion with a judge classifier (``python -m scripts.eval``, see ``run.py``)."""
