"""A small generated image-classification dataset, so demos and tests need no download."""

from __future__ import annotations

import math

import torch

__all__ = ["synthetic_images"]


def synthetic_images(
    n: int,
    num_classes: int = 10,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, channels, size, size)`` and labels, drawn from ``num_classes`` smooth patterns.

    Each class is a fixed sum of low-frequency sinusoids per channel; a sample is its class pattern,
    randomly shifted and rescaled, plus Gaussian noise. Deterministic for a given ``seed``; learnable
    by a small CNN, but not in one step.

    >>> x, y = synthetic_images(64)
    >>> x.shape, y.shape
    (torch.Size([64, 3, 16, 16]), torch.Size([64]))
    """
    if n < 1 or num_classes < 2 or size < 4:
        raise ValueError("need n >= 1, num_classes >= 2 and size >= 4")
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32) * (2 * math.pi / size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = torch.randint(1, 4, (num_classes, channels, 3, 2), generator=g).float()
    phase = torch.rand(num_classes, channels, 3, generator=g) * 2 * math.pi
    templates = torch.zeros(num_classes, channels, size, size)
    for k in range(3):
        arg = freq[..., k, 0, None, None] * xx + freq[..., k, 1, None, None] * yy + phase[..., k, None, None]
        templates += torch.sin(arg)
    templates /= templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = templates[labels]
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack([torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(images, shifts)])
    images = images * (0.75 + 0.5 * torch.rand(n, 1, 1, 1, generator=g))
    images += noise * torch.randn(images.shape, generator=g)
    return images, labels
