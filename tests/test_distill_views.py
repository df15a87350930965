"""sip.distill.views: replayable views drawn like timm's RandomResizedCrop + flip."""

from __future__ import annotations

from sip.distill.views import sample_view


def test_views_follow_timm_random_resized_crop():
    import random

    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w, flip = sample_view(rng, 28, 28, (0.35, 1.0), (0.75, 1.333), 0.5)
        assert 0 <= top and top + h <= 28 and 0 <= left and left + w <= 28 and flip in (0, 1)
        assert 0.3 * 784 <= h * w <= 784
