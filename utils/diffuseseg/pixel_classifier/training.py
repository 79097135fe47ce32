"""Training the stacked ensemble: per-member sample orders, the official stopping rule, one fused Adam."""
from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteGuard
from diffuseseg.pixel_classifier.model import PixelEnsemble


def derived_seed(seed: int, stream: int) -> int:
    """Independent seeds for independent random streams from one user seed; ``train_ensemble`` uses
    stream 0 for the initialisation and stream 1 for the ``MemberSampler``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class MemberSampler:
    """Mini-batch indices for E members, (E, B) per step; each member has its own sample order.

    Uniform (default): per epoch, an independent random permutation of the N pixels per member
    (like a shuffled DataLoader per model). Class-balanced: N draws with replacement per member and
    epoch, each pixel with probability proportional to 1 / (frequency of its class), i.e. a uniform
    class among those present, then a uniform pixel of that class.
    ``drop_last``: skip the last partial mini-batch of every epoch, as the official DataLoader
    (``drop_last=True``) does: an epoch is then ``N // batch_size`` steps. Without it, only a last
    mini-batch of a single pixel is dropped: batch norm cannot train on one sample.
    """

    def __init__(self, num_pixels: int, members: int, batch_size: int, seed: int = 0,
                 labels: np.ndarray | Tensor | None = None, drop_last: bool = False) -> None:
        self.num_pixels, self.members, self.batch_size = int(num_pixels), int(members), int(batch_size)
        self.drop_last = bool(drop_last)
        self.generator = torch.Generator().manual_seed(seed)
        self.balanced = labels is not None
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
            self._by_class = torch.argsort(labels, stable=True)
            _, counts = torch.unique(labels, return_counts=True)
            self._counts = counts
            self._starts = torch.cumsum(counts, 0) - counts

    def __len__(self) -> int:
        n, b = self.num_pixels, self.batch_size
        return n // b + (1 if n % b > 1 and not self.drop_last else 0)

    def _epoch_order(self) -> Tensor:
        e, n, g = self.members, self.num_pixels, self.generator
        if not self.balanced:
            return torch.stack([torch.randperm(n, generator=g) for _ in range(e)])
        cls = torch.randint(len(self._counts), (e, n), generator=g)
        counts = self._counts[cls]
        offset = (torch.rand((e, n), generator=g, dtype=torch.float64) * counts).long().minimum(counts - 1)
        return self._by_class[self._starts[cls] + offset]

    def epoch(self) -> Iterator[Tensor]:
        order = self._epoch_order()
        smallest = self.batch_size if self.drop_last else 2
        for start in range(0, self.num_pixels, self.batch_size):
            batch = order[:, start:start + self.batch_size]
            if batch.shape[1] < smallest:  # only the last batch can be short
                break
            yield batch


class _RowGather:
    """Rows ``features[idx]`` as float32 on ``device``, for (N, d) arrays, memmaps or tensors.

    On a GPU, features that fit (<= 4 GiB) are copied there once (in their dtype) and gathered there;
    otherwise rows are gathered on the host and only the mini-batch is transferred.
    """

    DEVICE_BUDGET = 4 << 30

    def __init__(self, features: np.ndarray | Tensor, device: torch.device) -> None:
        self.device = device
        self.table: Tensor | None = None
        self.array: np.ndarray | None = None
        nbytes = features.numel() * features.element_size() if isinstance(features, Tensor) else features.nbytes
        if device.type != "cpu" and nbytes <= self.DEVICE_BUDGET:
            if isinstance(features, Tensor):
                self.table = features.to(device)
            else:  # copy in slices, so a memmap is never fully duplicated in host memory
                self.table = torch.empty(features.shape, dtype=_torch_dtype(features.dtype), device=device)
                for s in range(0, len(features), 1 << 16):
                    self.table[s:s + (1 << 16)] = torch.from_numpy(np.array(features[s:s + (1 << 16)]))
        elif isinstance(features, Tensor):
            self.table = features.cpu()
        elif isinstance(features, np.memmap) or not features.flags.writeable:
            self.array = features  # numpy fancy indexing pages in only the rows it reads
        else:
            self.table = torch.from_numpy(np.ascontiguousarray(features))

    def __call__(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        if self.table is not None:
            rows = self.table[flat.to(self.table.device)]
        else:
            rows = torch.from_numpy(self.array[flat.numpy()])
        return rows.to(self.device, torch.float32, non_blocking=True).view(*idx.shape, -1)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


def _check_training_data(features: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    if len(features.shape) != 2:
        raise UserError(f"pixel features must be (N, d), got shape {tuple(features.shape)}")
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    labels = labels.reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise UserError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.shape[0] < 2:
        raise UserError("need at least 2 labelled pixels to train (batch norm)")
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:8].tolist()
        raise UserError(f"labels {bad} are outside 0..{num_classes - 1}; drop ignored pixels before training")
    return labels.astype(np.int64, copy=False)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch / device has one (CPU and CUDA in torch >= 2.4):
    the same update rule, but one pass over the parameters instead of ~10 (on CPU, the default
    per-tensor Adam was half the time of a stacked-ensemble step)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def member_losses(ensemble: PixelEnsemble, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each member on its own mini-batch: x (E, B, d), y (E, B) -> (E,)."""
    logits = ensemble(x)
    e, b, c = logits.shape
    return F.cross_entropy(logits.reshape(e * b, c), y.reshape(-1), reduction="none").view(e, b).mean(1)


def train_ensemble(features: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_classes: int, *,
                   members: int = 10, hidden: tuple[int, int] | None = None, layer_order: str = "official",
                   init: str = "official", lr: float = 1e-3, batch_size: int = 64, max_epochs: int = 100,
                   patience: int = 50, min_epochs: int = 4, min_steps: int = 0, class_balanced: bool = False, seed: int = 0,
                   drop_last: bool = True, device: str | torch.device = "cpu", progress: bool = True,
                   ensemble: PixelEnsemble | None = None, max_bad_steps: int = 10) -> PixelEnsemble:
    """Train E pixel MLPs on features (N, d) (float16/32 array, memmap or tensor) and labels (N,).

    Recipe of Baranchuk et al.: cross-entropy, Adam(lr=1e-3), batch 64, at most 100 epochs, each
    member its own initialisation (``init``, official N(0, 0.02)) and its own sample order
    (``MemberSampler``); hidden sizes ``official_hidden(num_classes)`` unless ``hidden`` is given; the
    last partial mini-batch of each epoch skipped (``drop_last``, as the official DataLoader), so an
    epoch is N // batch_size steps and fewer than ``batch_size`` pixels raise UserError.

    Stopping, mirrored *per member* from the official train_interpreter.py (which trains the models
    one after another, each with its own counter): from epoch index ``min_epochs`` on (official:
    ``epoch > 3``), after every step the member's mini-batch loss is compared with its best so far;
    a member stops after ``patience + 1`` consecutive steps without a new best (official: break when
    ``break_count > 50``). ``min_steps`` also delays the counter: official training sets hold
    millions of pixels, so four epochs are tens of thousands of steps; a few small images need a
    step floor to get a comparable amount of training. A stopped member's weights are frozen at that step (restored from a
    snapshot at the end; it keeps being computed, which cannot affect the others), so every member ends
    exactly as if trained alone. Training ends when all members stopped or after ``max_epochs``.

    A step with a NaN/inf loss or gradient is skipped; more than ``max_bad_steps`` in a row raise
    NonFiniteError (``guard.py``).

    ``ensemble``: train this one (in place) instead of a fresh seeded initialisation; ``members``,
    ``hidden``, ``layer_order`` and ``init`` are then taken from it / unused.
    Progress shows the mean loss of the members still training and px/s = member-pixels per second
    (each step trains E x batch_size of them).
    The returned ensemble (eval mode, on ``device``) carries ``train_info``: epochs, steps and, per
    member, (epoch index, global step count) at which it stopped (None = ran to max_epochs).
    """
    device = torch.device(device)
    y_all = _check_training_data(features, labels, num_classes)
    if drop_last and len(y_all) < batch_size:
        # Every batch would be the skipped partial one: the official loop would silently train nothing.
        raise UserError(f"{len(y_all)} labelled pixels are fewer than one mini-batch of {batch_size}, and the last "
                        f"partial batch is skipped (drop_last, official): lower the batch size or turn drop_last off")
    if ensemble is None:
        ensemble = PixelEnsemble(features.shape[1], num_classes, members, hidden, layer_order, init,
                                 generator=torch.Generator().manual_seed(derived_seed(seed, 0)))
    elif (ensemble.in_dim, ensemble.num_classes) != (features.shape[1], num_classes):
        raise UserError(f"the given ensemble is for d={ensemble.in_dim}, C={ensemble.num_classes}; "
                        f"the data has d={features.shape[1]}, C={num_classes}")
    ensemble = ensemble.to(device).train()
    e = ensemble.members
    sampler = MemberSampler(len(y_all), e, batch_size, derived_seed(seed, 1),
                            labels=y_all if class_balanced else None, drop_last=drop_last)
    gather = _RowGather(features, device)
    y_table = torch.from_numpy(y_all).to(device)
    optimizer = make_adam(ensemble.parameters(), lr)

    best = [math.inf] * e
    since_best = [0] * e
    stopped_at: list[tuple[int, int] | None] = [None] * e
    frozen: dict[int, dict[str, Tensor]] = {}
    steps_per_epoch = len(sampler)
    bar = tqdm(total=max_epochs * steps_per_epoch, desc="train pixel ensemble", unit="step",
               dynamic_ncols=True, disable=not progress)
    step, epochs_run, start = 0, 0, time.perf_counter()
    guard = NonFiniteGuard("train pixel ensemble", max_bad_steps, hint="Check the features for NaN/inf values.")
    pixels = 0  # member-pixels: each step trains E * B of them
    for epoch in range(max_epochs):
        epochs_run = epoch + 1
        for idx in sampler.epoch():
            x, y = gather(idx), y_table[idx.to(device)]
            losses = member_losses(ensemble, x, y)
            optimizer.zero_grad(set_to_none=True)
            # Sum, not mean: each member's gradient is then that of its own mean loss, as if alone.
            losses.sum().backward()
            if guard.ok(step, losses.sum().detach(), ensemble.parameters()):
                optimizer.step()
            step, pixels = step + 1, pixels + idx.numel()
            bar.update()
            if epoch >= min_epochs and step >= min_steps:
                for k, loss in enumerate(losses.tolist()):
                    if k in frozen:
                        continue
                    if loss < best[k]:
                        best[k], since_best[k] = loss, 0
                    else:
                        since_best[k] += 1
                    if since_best[k] > patience:
                        stopped_at[k] = (epoch, step)
                        frozen[k] = {name: t[k].detach().clone() for name, t in ensemble.state_dict().items()}
            if progress and step % 25 == 0:
                active = [k for k in range(e) if k not in frozen] or list(range(e))
                bar.set_postfix({"epoch": epoch, "loss": f"{losses[active].mean().item():.4f}",
                                 "active": f"{len(active)}/{e}",
                                 "px/s": f"{pixels / (time.perf_counter() - start):.3g}"})
            if len(frozen) == e:
                break
        if len(frozen) == e:
            break
    bar.close()
    with torch.no_grad():  # put each stopped member back to the weights it had when it stopped
        state = ensemble.state_dict()
        for k, snapshot in frozen.items():
            for name, value in snapshot.items():
                state[name][k].copy_(value)
    ensemble.train_info = {"epochs": epochs_run, "steps": step, "stopped_at": stopped_at,
                           "seconds": time.perf_counter() - start}
    return ensemble.eval()
