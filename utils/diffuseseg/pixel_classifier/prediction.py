"""Prediction from the ensemble: every member's logits, the vote, and the Jensen-Shannon uncertainty."""
from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from diffuseseg.pixel_classifier.model import PixelEnsemble


def feature_pixels(feature_maps: Tensor) -> Tensor:
    """(B, d, H, W) feature maps -> (B*H*W, d) pixel rows, in (B, H, W) order."""
    b, d, h, w = feature_maps.shape
    return feature_maps.permute(0, 2, 3, 1).reshape(b * h * w, d)


@torch.no_grad()
def predict(ensemble: PixelEnsemble, features: np.ndarray | Tensor, chunk: int = 65536) -> Tensor:
    """Logits (E, N, C), float32 on the CPU, of every member for pixel features (N, d); eval mode."""
    was_training = ensemble.training
    ensemble.eval()
    device = next(ensemble.parameters()).device
    n = features.shape[0]
    out = torch.empty(ensemble.members, n, ensemble.num_classes)
    try:
        for s in range(0, n, chunk):
            rows = features[s:s + chunk]
            # np.array copies: a float32 chunk either way, and safe for read-only memmaps.
            rows = rows if isinstance(rows, Tensor) else torch.from_numpy(np.array(rows, dtype=np.float32))
            out[:, s:s + rows.shape[0]] = ensemble(rows.to(device, torch.float32)).cpu()
    finally:
        ensemble.train(was_training)
    return out


def vote(logits: Tensor, mode: str = "majority") -> Tensor:
    """Ensemble labels (N,) from logits (E, N, C).

    ``majority``: the most frequent of the members' argmax labels (official), ties -> lowest class id;
    ``mean_softmax``: argmax of the members' mean softmax.
    """
    logits = torch.as_tensor(logits)
    if mode == "majority":
        labels = logits.argmax(-1)  # (E, N)
        counts = torch.zeros(logits.shape[1], logits.shape[2], dtype=torch.int32, device=logits.device)
        counts.scatter_add_(1, labels.t(), torch.ones_like(labels.t(), dtype=torch.int32))
        return counts.argmax(1)  # argmax returns the first maximum: the lowest class id on ties
    if mode == "mean_softmax":
        return logits.float().softmax(-1).mean(0).argmax(-1)
    raise ValueError(f"unknown vote mode {mode!r}; expected 'majority' or 'mean_softmax'")


def uncertainty(logits: Tensor) -> Tensor:
    """Per-pixel Jensen-Shannon divergence (N,) of the members' predictive distributions (natural log):
    entropy of the mean softmax minus the mean of the members' entropies. 0 when members agree."""
    log_p = torch.as_tensor(logits).float().log_softmax(-1)
    member_entropy = -(log_p.exp() * log_p).sum(-1).mean(0)
    mean_p = log_p.exp().mean(0)
    mixture_entropy = -torch.special.xlogy(mean_p, mean_p).sum(-1)
    return (mixture_entropy - member_entropy).clamp_min(0.0)  # >= 0 in exact arithmetic; clip rounding


def image_uncertainty_score(pixel_js: Tensor) -> float:
    """Image-level uncertainty (official): mean of the top 10% per-pixel JS values (of all pixels
    when there are fewer than 10, as the official ``js.sort()[0][-int(n / 10):]`` does)."""
    js = torch.as_tensor(pixel_js).reshape(-1).float()
    k = js.numel() // 10
    return float((js.topk(k).values if k > 0 else js).mean())
