"""The small CNN that judges generated images and that the few-shot arms train, its augmentations and its
seeded training loop (grey 32×32 uint8 in, class logits out)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

MEAN, STD = 0.2860, 0.3530     # Fashion-MNIST grey pixel statistics in [0, 1]
ARCH = "SmallCNN-v1"           # bump when SmallCNN changes: it is part of the judge cache key


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Grey 32×32 → class logits: conv-BN-ReLU at 32/16/8/4 px, global average pool, linear head.

    Args:
        width (int): channels at 32 px (×2 at 16 px, ×4 at 8 and 4 px).
        num_classes (int, optional): Defaults to 10.

    ``features(x)`` is the penultimate 4·width vector (used for feature-space distances).
    """

    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(1, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), nn.MaxPool2d(2),
            *_conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def prepare(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, 32, 32] → normalised float, channels-last (faster convolutions on CPU)."""
    return ((x.float() / 255.0 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per image: random crop after zero padding by ``pad`` pixels, and a random horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
    flip = (torch.rand(b, generator=g) < 0.5).tolist()
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def crop_flip_randaugment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """crop + flip, then torchvision's RandAugment (2 ops, magnitude 9) per image (PIL path: 3× faster
    than the tensor path on 32 px images). RandAugment draws from torch's global RNG, which
    :func:`train_classifier` seeds."""
    from torchvision import transforms

    randaugment = transforms.RandAugment(num_ops=2, magnitude=9)
    x = crop_flip(x, g)
    images = [randaugment(Image.fromarray(im[0].numpy(), mode="L")) for im in x]
    return torch.from_numpy(np.stack([np.asarray(im) for im in images]))[:, None]


def train_classifier(x: torch.Tensor, y: torch.Tensor, width: int, steps: int, batch: int, lr: float,
                     augment: Augment | None, seed: int, desc: str, progress: bool) -> SmallCNN:
    """Train a :class:`SmallCNN` for ``steps`` AdamW steps (one-cycle schedule, label smoothing 0.1) on
    batches drawn with replacement from (x uint8 [N, 1, 32, 32], y). Seeded: same inputs, same weights."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(width).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx] if augment is None else augment(x[idx], g)
        loss = F.cross_entropy(model(prepare(xb)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.inference_mode()
def classify(model: SmallCNN, grey: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and penultimate features of grey uint8 images [N, 32, 32]."""
    preds, feats = [], []
    for start in range(0, len(grey), batch):
        x = prepare(torch.from_numpy(np.ascontiguousarray(grey[start : start + batch]))[:, None])
        f = model.features(x)
        preds.append(model.head(f).argmax(-1).numpy())
        feats.append(f.numpy())
    return np.concatenate(preds), np.concatenate(feats)
