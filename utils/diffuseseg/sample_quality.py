"""Sample quality without a downloaded network.

* ``two_sample_accuracy``: a classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017). A small CNN learns to
  tell real images from generated ones on half of each set; its accuracy on the other half is the figure.
  0.5 = it cannot tell them apart, 1.0 = every generated image is recognisably fake. Strict: it saturates at
  1.0 until samples are close to real.
* ``random_feature_distance``: the Fréchet distance (the formula of FID) between Gaussian fits of real and
  generated images in the pooled activations of a fixed, randomly initialised CNN instead of Inception.
  Continuous where the two-sample test saturates; lower is better; comparable only between runs with the
  same image size, sample count and seed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _critic(channels: int = 3, width: int = 32) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.AvgPool2d(2)]
    return nn.Sequential(*block(channels, width), *block(width, 2 * width), *block(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))


def _pooled_random_features(images: np.ndarray, seed: int, width: int = 32) -> np.ndarray:
    """Channel means and standard deviations after each block of a seeded random ``_critic`` (float64)."""
    torch.manual_seed(seed)
    blocks = list(_critic(images.shape[-1], width).children())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    stats = []
    with torch.no_grad():
        for i, layer in enumerate(blocks[:12]):  # three conv blocks of four layers each
            x = layer(x)
            if i % 4 == 2:  # after the activation
                stats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
    return torch.cat(stats, dim=1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussian fits to the rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr((S_a S_b)^1/2) = Tr((S_a^1/2 S_b S_a^1/2)^1/2): the latter is symmetric, so eigvalsh is stable.
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def random_feature_distance(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    """Fréchet distance between ``real`` and ``fake`` (uint8 (N, H, W, 3)) in a seeded random CNN's
    pooled activations; 0 for identical distributions."""
    if real.shape[1:] != fake.shape[1:] or real.ndim != 4 or min(len(real), len(fake)) < 2:
        raise ValueError(f"real and fake must be (N>=2, H, W, C) stacks of one image shape, got {real.shape} "
                         f"and {fake.shape}")
    return frechet_distance(_pooled_random_features(real, seed), _pooled_random_features(fake, seed))


def two_sample_accuracy(real: np.ndarray, fake: np.ndarray, *, steps: int = 400, batch_size: int = 64,
                        lr: float = 1e-3, seed: int = 0) -> float:
    """Held-out accuracy of a CNN trained to separate ``real`` from ``fake`` (uint8 (N, H, W, 3) each,
    the same N): trained on the first half of each, scored on the second half."""
    if real.shape != fake.shape or real.ndim != 4 or len(real) < 4:
        raise ValueError(f"real and fake must be equal-shaped (N>=4, H, W, C) uint8 stacks, got "
                         f"{real.shape} and {fake.shape}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([real, fake])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
    half = len(real) // 2
    train = torch.cat([torch.arange(half), len(real) + torch.arange(half)])
    held_out = torch.cat([torch.arange(half, len(real)), len(real) + torch.arange(half, len(fake))])
    critic = _critic(real.shape[-1])
    optimizer = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    critic.train()
    for _ in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=generator)]
        batch = x[idx]
        flip = torch.rand(len(idx), generator=generator) < 0.5  # mirrored faces are faces: no shortcut there
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = loss_fn(critic(batch).squeeze(1), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    critic.eval()
    with torch.no_grad():
        logits = torch.cat([critic(x[held_out[i:i + 256]]).squeeze(1) for i in range(0, len(held_out), 256)])
    return float(((logits > 0).float() == y[held_out]).float().mean())
