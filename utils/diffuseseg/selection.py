"""Choosing which images to label: a diverse set under a budget, from the frozen DDPM's own features.

With 5-20 labels, *which* images are labeled matters as much as how many: a random draw of 20 toy
faces may hold 2 hats or none, and a class never labeled is never predicted. ``kcenter`` picks the
images that cover the pool best in the DDPM's feature space (greedy k-center: each new image is the
one farthest from everything chosen so far), so rare looks (hats, glasses, unusual hair) get in early.

Image descriptors: each image's per-pixel features average-pooled to a ``grid`` x ``grid`` layout
(where things are matters for faces), standardised per column, reduced by PCA to at most ``dims``
dimensions (distances in thousands of raw dimensions are dominated by noise).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffuseseg.datasets import to_model_range

SELECTION_METHODS = ("random", "kcenter", "first")


@torch.no_grad()
def image_descriptors(extractor, images: np.ndarray, *, grid: int = 4, dims: int = 64, batch_size: int = 16,
                      seed: int = 0) -> np.ndarray:
    """(N, <= dims) float32 descriptors of uint8 images (N, S, S, 3) from the extractor's features."""
    pooled = []
    for lo in range(0, len(images), batch_size):
        maps = extractor(to_model_range(images[lo:lo + batch_size]), keys=range(lo, min(lo + batch_size, len(images))))
        pooled.append(F.adaptive_avg_pool2d(maps.float(), grid).flatten(1).cpu().numpy())
    x = np.concatenate(pooled)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    k = min(dims, len(x), x.shape[1])
    if k < x.shape[1]:
        from sklearn.decomposition import PCA
        x = PCA(n_components=k, random_state=seed).fit_transform(x)
    return x.astype(np.float32)


def kcenter_greedy(descriptors: np.ndarray, k: int, first: int | None = None) -> list[int]:
    """Greedy k-center: start at ``first`` (default: the image nearest the mean, a typical one), then
    repeatedly add the image farthest from its nearest chosen image. Returns k distinct positions in
    the order chosen."""
    n = len(descriptors)
    if not 1 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} images")
    x = np.asarray(descriptors, np.float64)
    if first is None:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    chosen = [int(first)]
    nearest = ((x - x[first]) ** 2).sum(1)
    while len(chosen) < k:
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, ((x - x[nxt]) ** 2).sum(1))
    return chosen


def select_images(method: str, k: int, descriptors: np.ndarray | None, num_images: int,
                  seed: Sequence[int] | int = 0) -> np.ndarray:
    """Sorted positions of k images: ``random`` (a seeded draw, as the baseline study always drew),
    ``kcenter`` (seeded start, so different seeds give different diverse sets) or ``first`` (the first k
    of the pool, the images the main job and train_mlps.py label; the same for every seed)."""
    if method == "first":
        return np.arange(k)
    rng = np.random.default_rng(seed)
    if method == "random":
        return np.sort(rng.choice(num_images, k, replace=False))
    if method == "kcenter":
        if descriptors is None:
            raise ValueError("kcenter needs image descriptors")
        return np.sort(kcenter_greedy(descriptors, k, first=int(rng.integers(num_images))))
    raise ValueError(f"unknown selection method {method!r}; expected one of {SELECTION_METHODS}")
