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

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffuseseg.io import atomic_write_text
from diffuseseg.visualize import save_grid


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


def nearest_neighbours(queries: np.ndarray, references: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the index of its nearest reference image and the distance: root-mean-square
    pixel difference in [0, 1] units, over each reference and its mirror (a DDPM trained with flips may
    reproduce a face mirrored). uint8 (N, H, W, C) stacks of one shape."""
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"queries {queries.shape} and references {references.shape} differ in image shape")
    # float64: cdist's matrix-product form loses ~1e-4 to cancellation in float32, enough to hide an exact copy
    ref = torch.from_numpy(references).double().div(255).flatten(1)
    ref_mirror = torch.from_numpy(references[:, :, ::-1].copy()).double().div(255).flatten(1)
    pixels = ref.shape[1]
    best_idx, best_dist = [], []
    for lo in range(0, len(queries), batch_size):
        q = torch.from_numpy(queries[lo:lo + batch_size]).double().div(255).flatten(1)
        d = torch.minimum(torch.cdist(q, ref), torch.cdist(q, ref_mirror)) / pixels ** 0.5
        dist, idx = d.min(dim=1)
        best_idx.append(idx)
        best_dist.append(dist)
    return torch.cat(best_idx).numpy(), torch.cat(best_dist).numpy()


def memorisation_check(samples: np.ndarray, train: np.ndarray, held_out: np.ndarray) -> dict:
    """How close samples lie to the training images, against how close unseen real images lie to them.

    ``ratio`` = median nearest-training distance of the samples / that of the held-out real images: about 1
    (or more) when the model makes new faces, well below 1 when samples copy training faces. Also the
    fraction of samples closer to their nearest training face than the closest held-out image is to its own.
    """
    sample_idx, sample_dist = nearest_neighbours(samples, train)
    _, held_dist = nearest_neighbours(held_out, train)
    return {"ratio": float(np.median(sample_dist) / np.median(held_dist)),
            "median_sample_to_train": float(np.median(sample_dist)),
            "median_held_out_to_train": float(np.median(held_dist)),
            "fraction_closer_than_any_held_out": float((sample_dist < held_dist.min()).mean()),
            "nearest_train_index": sample_idx.tolist(), "sample_to_train": sample_dist.tolist()}


def sample_report(samples: np.ndarray, train: np.ndarray, held_out: np.ndarray, out_dir: str | Path,
                  pairs: int = 16) -> dict:
    """Sample quality against held-out real images and the memorisation check, written to ``out_dir``:
    ``quality.json`` and ``nearest_train.png`` (each of the ``pairs`` samples closest to a training image
    beside that image: sample above, training face below). Returns the figures.

    The feature distance of the samples to the held-out images comes with its floor: the distance of as many
    training images to them (real against real, the best a model of this data can do)."""
    out = Path(out_dir)
    check = memorisation_check(samples, train, held_out)
    floor_set = train[np.random.default_rng(0).choice(len(train), min(len(train), len(samples)), replace=False)]
    report = {"num_samples": len(samples), "num_train": len(train), "num_held_out": len(held_out),
              "feature_distance_samples_to_held_out": random_feature_distance(held_out, samples),
              "feature_distance_train_to_held_out": random_feature_distance(held_out, floor_set), **check}
    closest = np.argsort(check["sample_to_train"])[:pairs]
    nearest = train[np.asarray(check["nearest_train_index"])[closest]]
    save_grid(np.concatenate([samples[closest], nearest]), out / "nearest_train.png", nrow=len(closest), scale=2)
    atomic_write_text(out / "quality.json", json.dumps(report, indent=1) + "\n")
    return report
