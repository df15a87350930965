"""Supervised training of timm classifiers on real + synthetic data (``sip train``)."""
