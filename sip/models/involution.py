"""Involution (Li et al., CVPR 2021) and RedNet-style networks registered in timm's model registry.

Involution inverts the two properties of convolution: its kernel is *spatial-specific* (generated from
the feature vector at each output pixel) and *channel-agnostic* (shared by the ``group_channels``
channels of a group). For an input X with C channels, kernel size K and G = C / group_channels groups:

    H_ij = W_1 · σ(W_0 · X_ij)                      kernel generator, H_ij ∈ R^{K·K·G}
    Y_ij,k = Σ_{(u,v) ∈ Δ_K} H_ij,u+⌊K/2⌋,v+⌊K/2⌋,⌈kG/C⌉ · X_{i+u, j+v, k}

where W_0 (1×1 conv, C → C/r, with BatchNorm and ReLU as σ) and W_1 (1×1 conv, C/r → K·K·G) form the
kernel generation function, and a stride s > 1 average-pools X before generating the kernels.

Paper: Duo Li, Jie Hu, Changhu Wang, Xiangtai Li, Qi She, Lei Zhu, Tong Zhang, Qifeng Chen,
"Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021.

``import sip.models.involution`` registers ``sip_rednet_tiny`` (for 28–64 px inputs such as Fashion-MNIST or
CIFAR) and ``sip_rednet26`` (the paper's RedNet-26 layout, for 224 px) with timm, so
``timm.create_model("sip_rednet_tiny", num_classes=10)`` works like any timm model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["Involution2d", "InvolutionBottleneck", "RedNet", "sip_rednet26", "sip_rednet_tiny"]


class Involution2d(nn.Module):
    """The involution operator (see the module docstring for the formula).

    Args:
        channels (int): input = output channels C.
        kernel_size (int, optional): K, the spatial extent of each generated kernel. Defaults to 7 (the
            paper's choice: involution makes a large kernel cheap).
        stride (int, optional): output stride; the kernel generator sees an average-pooled input.
            Defaults to 1.
        group_channels (int, optional): channels sharing one kernel (C / G). Defaults to 16.
        reduction (int, optional): r, the bottleneck ratio of the kernel generator. Defaults to 4.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16,
                 reduction: int = 4):
        super().__init__()
        if channels % group_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of group_channels ({group_channels})")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = channels // group_channels
        hidden = max(channels // reduction, 1)
        # ceil_mode: the pooled grid then matches the unfold grid, ceil(H / stride), for odd sizes too
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.ReLU(inplace=True))
        self.span = nn.Conv2d(hidden, kernel_size * kernel_size * self.groups, 1)
        self.unfold = nn.Unfold(kernel_size, padding=(kernel_size - 1) // 2, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _h, _w = x.shape
        kk = self.kernel_size * self.kernel_size
        # 1. one kernel per output pixel and group, generated from the (pooled) feature at that pixel
        kernel = self.span(self.reduce(self.pool(x)))                       # B, K*K*G, H', W'
        ho, wo = kernel.shape[-2:]
        kernel = kernel.view(b, self.groups, 1, kk, ho, wo)
        # 2. the K×K neighbourhood of every output pixel
        patches = self.unfold(x).view(b, self.groups, c // self.groups, kk, ho, wo)
        # 3. multiply-add over the neighbourhood; the kernel is shared by the channels of a group
        return (kernel * patches).sum(dim=3).view(b, c, ho, wo)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"


class InvolutionBottleneck(nn.Module):
    """RedNet's residual block: ResNet's bottleneck with its 3×3 convolution replaced by an involution.

    Args:
        in_chs (int): input channels.
        mid_chs (int): bottleneck width (the involution's channels).
        out_chs (int): output channels.
        stride (int, optional): Defaults to 1.
        kernel_size (int, optional): involution kernel. Defaults to 7.
        group_channels (int, optional): Defaults to 16.
        drop_path (float, optional): stochastic depth rate. Defaults to 0.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1, kernel_size: int = 7,
                 group_channels: int = 16, drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        self.conv1 = nn.Sequential(nn.Conv2d(in_chs, mid_chs, 1, bias=False), nn.BatchNorm2d(mid_chs),
                                   nn.ReLU(inplace=True))
        self.inv = nn.Sequential(Involution2d(mid_chs, kernel_size, stride, min(group_channels, mid_chs)),
                                 nn.BatchNorm2d(mid_chs), nn.ReLU(inplace=True))
        self.conv3 = nn.Sequential(nn.Conv2d(mid_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        nn.init.zeros_(self.conv3[1].weight)  # each block starts as the identity (as timm's zero_init_last)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity(),
                                          nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.conv3(self.inv(self.conv1(x)))))


class RedNet(nn.Module):
    """A residual network of involution bottlenecks (RedNet, Li et al. CVPR 2021), timm-style.

    Args:
        depths (Sequence[int]): blocks per stage.
        widths (Sequence[int]): output channels per stage (bottleneck width = width / 4).
        num_classes (int, optional): Defaults to 1000.
        in_chans (int, optional): Defaults to 3.
        stem_width (int, optional): channels after the stem. Defaults to 32.
        stem_stride (int, optional): 2 for small images (28–64 px), 4 for ImageNet-sized ones (adds a
            max-pool, as ResNet). Defaults to 2.
        kernel_size (int, optional): involution kernel. Defaults to 7.
        group_channels (int, optional): Defaults to 16.
        drop_rate (float, optional): dropout before the classifier. Defaults to 0.
        drop_path_rate (float, optional): stochastic depth, linearly increasing over blocks. Defaults to 0.
        global_pool (str, optional): timm pooling type. Defaults to "avg".
    """

    def __init__(self, depths: Sequence[int] = (1, 1, 1), widths: Sequence[int] = (64, 128, 256),
                 num_classes: int = 1000, in_chans: int = 3, stem_width: int = 32, stem_stride: int = 2,
                 kernel_size: int = 7, group_channels: int = 16, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {tuple(depths)} and widths {tuple(widths)} need the same length")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        stem = [nn.Conv2d(in_chans, stem_width, 3, stride=min(stem_stride, 2), padding=1, bias=False),
                nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)]
        if stem_stride == 4:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        total, done = sum(depths), 0
        stages, in_chs, reduction = [], stem_width, stem_stride
        self.feature_info = [{"num_chs": stem_width, "reduction": reduction, "module": "stem"}]
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(InvolutionBottleneck(in_chs, max(width // 4, group_channels), width, stride,
                                                   kernel_size, group_channels,
                                                   drop_path_rate * done / max(total - 1, 1)))
                in_chs, done = width, done + 1
            reduction *= 2 if i > 0 else 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.0", "classifier": "fc", **kwargs}


# register_model reads this module attribute, so it must exist before the entry points below.
default_cfgs = generate_default_cfgs({
    "sip_rednet_tiny": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
    "sip_rednet26": _cfg(),
})


def _create_rednet(variant: str, pretrained: bool = False, **kwargs) -> RedNet:
    return build_model_with_cfg(RedNet, variant, pretrained, feature_cfg={"flatten_sequential": True},
                                **kwargs)


@register_model
def sip_rednet_tiny(pretrained: bool = False, **kwargs) -> RedNet:
    """A small RedNet for 28–64 px images: stride-2 conv stem, three stages of one involution bottleneck
    (widths 64/128/256, 7×7 involution kernels), ~0.2 M parameters."""
    args = {"depths": (1, 1, 1), "widths": (64, 128, 256), "stem_width": 32, "stem_stride": 2}
    return _create_rednet("sip_rednet_tiny", pretrained, **dict(args, **kwargs))


@register_model
def sip_rednet26(pretrained: bool = False, **kwargs) -> RedNet:
    """RedNet-26 of the paper (blocks 1/2/4/1, widths 256/512/1024/2048) for 224 px inputs."""
    args = {"depths": (1, 2, 4, 1), "widths": (256, 512, 1024, 2048), "stem_width": 64, "stem_stride": 4}
    return _create_rednet("sip_rednet26", pretrained, **dict(args, **kwargs))
