"""Involution (Li et al., CVPR 2021): the operator against its formula, and the timm-registered RedNets."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from sip.models.classifiers import create_model
from sip.models.involution import Involution2d


def _naive_involution(inv: Involution2d, x: torch.Tensor) -> torch.Tensor:
    """Y[b, c, i, j] = Σ_{u,v} H[b, g(c), u, v, i, j] · X[b, c, s·i + u − K//2, s·j + v − K//2] by loops."""
    k, s, groups = inv.kernel_size, inv.stride, inv.groups
    kernels = inv.span(inv.reduce(inv.pool(x)))  # [B, K*K*G, Ho, Wo]
    b, c, _h, _w = x.shape
    ho, wo = kernels.shape[-2:]
    kernels = kernels.view(b, groups, k, k, ho, wo)
    pad = k // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    out = torch.zeros(b, c, ho, wo)
    per_group = c // groups
    for ch in range(c):
        g = ch // per_group
        for i in range(ho):
            for j in range(wo):
                window = xp[:, ch, s * i : s * i + k, s * j : s * j + k]
                out[:, ch, i, j] = (kernels[:, g, :, :, i, j] * window).sum(dim=(1, 2))
    return out


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 6), (2, 7)])
def test_involution_matches_its_formula(stride, size):
    torch.manual_seed(0)
    inv = Involution2d(channels=8, kernel_size=3, stride=stride, group_channels=4, reduction=2).eval()
    x = torch.randn(2, 8, size, size)
    with torch.no_grad():
        fast, slow = inv(x), _naive_involution(inv, x)
    assert fast.shape == (2, 8, -(-size // stride), -(-size // stride))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_a_constant_kernel_makes_involution_a_shared_depthwise_convolution():
    """With the generator forced to one fixed K×K kernel and one group, every channel is convolved with
    that same kernel (channel-agnostic), i.e. a depthwise convolution with the kernel repeated."""
    torch.manual_seed(0)
    c, k = 4, 3
    inv = Involution2d(channels=c, kernel_size=k, group_channels=c).eval()
    kernel = torch.randn(k, k)
    with torch.no_grad():
        inv.span.weight.zero_()
        inv.span.bias.copy_(kernel.flatten())
    x = torch.randn(1, c, 5, 5)
    with torch.no_grad():
        expected = F.conv2d(x, kernel.expand(c, 1, k, k), padding=k // 2, groups=c)
        torch.testing.assert_close(inv(x), expected, atol=1e-5, rtol=1e-5)


def test_involution_argument_checks():
    with pytest.raises(ValueError, match="multiple of group_channels"):
        Involution2d(channels=10, group_channels=4)
    with pytest.raises(ValueError, match="odd"):
        Involution2d(channels=16, kernel_size=4)


@pytest.mark.parametrize("size", [28, 32])
def test_rednet_tiny_is_a_timm_model(size):
    model = create_model("sip_rednet_tiny", {"num_classes": 10})
    assert "sip_rednet_tiny" in timm.list_models("sip_*")
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_rednet26_builds_with_the_paper_layout():
    model = create_model("sip_rednet26", {"num_classes": 3})
    assert [len(stage) for stage in model.stages] == [1, 2, 4, 1]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
