"""An ensemble of small pixel MLPs (Baranchuk et al., ICLR 2022), all members computed at once.

Each member is ``Linear(d, 128) -> ReLU -> BatchNorm1d -> Linear(128, 32) -> ReLU -> BatchNorm1d ->
Linear(32, C)`` ("official" order) or with BatchNorm before ReLU ("diffuseseg" order, the layout of
DiffuseSeg's ``mlp_<k>_best.pt`` files). Instead of E separate modules trained one after another, the
E members' parameters are stacked along a leading member axis and run as batched matmuls; batch norm
treats every (member, channel) pair as its own channel, so each member normalises with the statistics
of its own mini-batch. Adam is element-wise, so one Adam over the stacked tensors is exactly E
independent Adams: training the stack is the same computation as training the members separately
(``tests/test_pixel_classifier.py`` checks it step by step, to float rounding), with E times fewer,
larger kernels. ``benchmark_epoch`` times it against the sequential loop.
"""
from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from diffuseseg.errors import UserError
from diffuseseg.guard import NonFiniteGuard
from diffuseseg.io import atomic_torch_save, load_torch_file

ENSEMBLE_FORMAT = "diffuseseg-ensemble/1"
LAYER_ORDERS = ("official", "diffuseseg")
INITS = ("pytorch", "official")
# Module indices of the official nn.Sequential (Linear, ReLU, BN, Linear, ReLU, BN, Linear).
_OFFICIAL_NAMES = {"fc1": "layers.0", "bn1": "layers.2", "fc2": "layers.3", "bn2": "layers.5", "fc_out": "layers.6"}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


class StackedLinear(nn.Module):
    """E independent ``Linear(in, out)`` layers. ``weight`` is (E, in, out): the *transpose* of each
    member's ``nn.Linear.weight``, so ``x @ weight`` needs no transpose in the batched matmul."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))
        self.reset_parameters()

    def reset_parameters(self, init: str = "pytorch", generator: torch.Generator | None = None) -> None:
        """``pytorch``: nn.Linear's default, U(+-1/sqrt(in)) for weight and bias; ``official``:
        Baranchuk et al.'s ``init_weights``, N(0, 0.02) weights and zero bias. Element-wise draws, so
        every member is initialised independently."""
        with torch.no_grad():
            if init == "pytorch":
                bound = 1.0 / math.sqrt(self.weight.shape[1])
                self.weight.uniform_(-bound, bound, generator=generator)
                self.bias.uniform_(-bound, bound, generator=generator)
            elif init == "official":
                self.weight.normal_(0.0, 0.02, generator=generator)
                self.bias.zero_()
            else:
                _check_choice("init", init, INITS)

    def forward(self, x: Tensor) -> Tensor:
        """(E, B, in) -> (E, B, out)."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class StackedBatchNorm(nn.Module):
    """E independent ``BatchNorm1d(features)`` layers, parameters and running stats of shape (E, F).

    Implemented as one ``F.batch_norm`` over E*F channels on the (B, E*F) layout, i.e. exactly
    nn.BatchNorm1d's kernel: training normalises with the biased batch variance of each member's own
    mini-batch and updates running_mean / running_var (unbiased) with momentum 0.1; eval uses them.
    """

    def __init__(self, members: int, features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(members, features))
        self.bias = nn.Parameter(torch.zeros(members, features))
        self.register_buffer("running_mean", torch.zeros(members, features))
        self.register_buffer("running_var", torch.ones(members, features))
        self.register_buffer("num_batches_tracked", torch.zeros(members, dtype=torch.long))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0), self.bias.zero_()
            self.running_mean.zero_(), self.running_var.fill_(1.0), self.num_batches_tracked.zero_()

    def forward_flat(self, x: Tensor) -> Tensor:
        """(B, E*F) -> (B, E*F), member-major channels."""
        if self.training:
            self.num_batches_tracked.add_(1)
        # The .view(-1)s share storage with the buffers, so F.batch_norm updates them in place.
        return F.batch_norm(x, self.running_mean.view(-1), self.running_var.view(-1), self.weight.view(-1),
                            self.bias.view(-1), self.training, self.momentum, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        """(E, B, F) -> (E, B, F)."""
        e, b, f = x.shape
        y = self.forward_flat(x.transpose(0, 1).reshape(b, e * f))
        return y.view(b, e, f).transpose(0, 1)


class MemberMLP(nn.Module):
    """One pixel MLP as a plain nn.Module, named like the files it comes from: ``layers.<i>`` (the
    official nn.Sequential) or ``fc1, bn1, fc2, bn2, fc_out`` (DiffuseSeg). The reference the stacked
    ensemble is tested against, and what ``PixelEnsemble.to_member_modules`` returns."""

    def __init__(self, in_dim: int, num_classes: int, hidden: tuple[int, int] = (128, 32),
                 layer_order: str = "official") -> None:
        super().__init__()
        _check_choice("layer_order", layer_order, LAYER_ORDERS)
        self.layer_order = layer_order
        h1, h2 = hidden
        if layer_order == "official":
            self.layers = nn.Sequential(nn.Linear(in_dim, h1), nn.ReLU(), nn.BatchNorm1d(h1),
                                        nn.Linear(h1, h2), nn.ReLU(), nn.BatchNorm1d(h2), nn.Linear(h2, num_classes))
        else:
            self.fc1, self.bn1 = nn.Linear(in_dim, h1), nn.BatchNorm1d(h1)
            self.fc2, self.bn2 = nn.Linear(h1, h2), nn.BatchNorm1d(h2)
            self.fc_out = nn.Linear(h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_order == "official":
            return self.layers(x)
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc_out(x)


class PixelEnsemble(nn.Module):
    """E pixel MLPs with stacked parameters; ``forward`` returns logits (E, B or N, C).

    Input (E, B, d): member k sees its own mini-batch ``x[k]`` (training). Input (N, d): every member
    sees the same pixels (prediction); the first layer is then one GEMM of width E*hidden[0].
    """

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, hidden: tuple[int, int] = (128, 32),
                 layer_order: str = "official", init: str = "pytorch",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_choice("layer_order", layer_order, LAYER_ORDERS)
        self.in_dim, self.num_classes, self.members = int(in_dim), int(num_classes), int(members)
        self.hidden, self.layer_order = (int(hidden[0]), int(hidden[1])), layer_order
        h1, h2 = self.hidden
        self.fc1, self.bn1 = StackedLinear(members, in_dim, h1), StackedBatchNorm(members, h1)
        self.fc2, self.bn2 = StackedLinear(members, h1, h2), StackedBatchNorm(members, h2)
        self.fc_out = StackedLinear(members, h2, num_classes)
        self.reset_parameters(init, generator)

    def reset_parameters(self, init: str = "pytorch", generator: torch.Generator | None = None) -> None:
        for layer in (self.fc1, self.fc2, self.fc_out):
            layer.reset_parameters(init, generator)
        self.bn1.reset_parameters(), self.bn2.reset_parameters()

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "num_classes": self.num_classes, "members": self.members,
                "hidden": list(self.hidden), "layer_order": self.layer_order}

    def _norm_act_flat(self, bn: StackedBatchNorm, x: Tensor) -> Tensor:
        return bn.forward_flat(F.relu(x)) if self.layer_order == "official" else F.relu(bn.forward_flat(x))

    def _norm_act(self, bn: StackedBatchNorm, x: Tensor) -> Tensor:
        return bn(F.relu(x)) if self.layer_order == "official" else F.relu(bn(x))

    def forward(self, x: Tensor) -> Tensor:
        e, (h1, _) = self.members, self.hidden
        if x.dim() == 2 and x.shape[1] == self.in_dim:
            n = x.shape[0]
            # Shared pixels: one (N, d) x (d, E*h1) GEMM; its output is already the (N, E*h1) layout
            # that the stacked batch norm works on.
            w = self.fc1.weight.permute(1, 0, 2).reshape(self.in_dim, e * h1)
            h = torch.addmm(self.fc1.bias.reshape(-1), x, w)
            h = self._norm_act_flat(self.bn1, h).view(n, e, h1).transpose(0, 1)
        elif x.dim() == 3 and x.shape[0] == e and x.shape[2] == self.in_dim:
            h = self._norm_act(self.bn1, self.fc1(x))
        else:
            raise ValueError(f"expected features (N, {self.in_dim}) or ({e}, B, {self.in_dim}), got {tuple(x.shape)}")
        h = self._norm_act(self.bn2, self.fc2(h))
        return self.fc_out(h)

    # ---- conversion to / from single-MLP state dicts -------------------------------------------------

    def to_member_state_dicts(self) -> list[dict[str, Tensor]]:
        """One nn.Module state_dict per member, named as ``MemberMLP`` (official ``layers.<i>`` or
        DiffuseSeg ``fc1 ... fc_out``, by ``layer_order``), nn.Linear weights as (out, in)."""
        names = _OFFICIAL_NAMES if self.layer_order == "official" else {k: k for k in _OFFICIAL_NAMES}
        out = []
        for k in range(self.members):
            sd: dict[str, Tensor] = {}
            for layer, name in names.items():
                module = getattr(self, layer)
                if isinstance(module, StackedLinear):
                    sd[f"{name}.weight"] = module.weight[k].detach().t().contiguous().cpu()
                    sd[f"{name}.bias"] = module.bias[k].detach().clone().cpu()
                else:
                    for key in _BN_KEYS:
                        sd[f"{name}.{key}"] = getattr(module, key)[k].detach().clone().cpu()
            out.append(sd)
        return out

    def to_member_modules(self) -> list[MemberMLP]:
        """The members as separate ``MemberMLP`` modules (same weights, same train/eval mode)."""
        modules = []
        for sd in self.to_member_state_dicts():
            m = MemberMLP(self.in_dim, self.num_classes, self.hidden, self.layer_order)
            m.load_state_dict(sd)
            modules.append(m.train(self.training))
        return modules

    @classmethod
    def from_member_state_dicts(cls, state_dicts: Sequence[dict[str, Tensor]]) -> "PixelEnsemble":
        """Stack single-MLP state dicts: DiffuseSeg ``fc1 ... fc_out`` naming (-> layer_order
        "diffuseseg") or the official ``layers.<i>`` one (-> "official"; ``{'model_state_dict': ...}``
        wrappers and DataParallel ``module.`` prefixes are accepted). Shapes define d, hidden and C."""
        if not state_dicts:
            raise UserError("no MLP state dicts given")
        unwrapped = [_unwrap_member(sd, k) for k, sd in enumerate(state_dicts)]
        orders = {order for order, _ in unwrapped}
        if len(orders) > 1:
            raise UserError("the MLP state dicts mix official (layers.<i>) and DiffuseSeg (fc1, bn1, ...) naming")
        order = orders.pop()
        names = _OFFICIAL_NAMES if order == "official" else {k: k for k in _OFFICIAL_NAMES}
        first = unwrapped[0][1]
        w1, w2, w3 = (first[f"{names[n]}.weight"] for n in ("fc1", "fc2", "fc_out"))
        ens = cls(w1.shape[1], w3.shape[0], len(state_dicts), (w1.shape[0], w2.shape[0]), order)
        expected = ens.to_member_state_dicts()[0]
        with torch.no_grad():
            for k, (_, sd) in enumerate(unwrapped):
                missing = sorted(set(expected) - set(sd) - {n for n in expected if n.endswith("num_batches_tracked")})
                unexpected = sorted(set(sd) - set(expected))
                if missing or unexpected:
                    raise UserError(f"MLP {k}: not a pixel MLP state dict"
                                    + (f"; missing {missing[:6]}" if missing else "")
                                    + (f"; unexpected {unexpected[:6]}" if unexpected else ""))
                for name, ref in expected.items():
                    if name in sd and tuple(sd[name].shape) != tuple(ref.shape):
                        raise UserError(f"MLP {k}: {name} has shape {tuple(sd[name].shape)}, expected "
                                        f"{tuple(ref.shape)} (all members must share d, hidden sizes and C)")
                for layer, name in names.items():
                    module = getattr(ens, layer)
                    if isinstance(module, StackedLinear):
                        module.weight[k].copy_(sd[f"{name}.weight"].t())
                        module.bias[k].copy_(sd[f"{name}.bias"])
                    else:
                        for key in _BN_KEYS:
                            if f"{name}.{key}" in sd:
                                getattr(module, key)[k].copy_(sd[f"{name}.{key}"])
        return ens.eval()

    @classmethod
    def from_diffuseseg_state_dicts(cls, state_dicts: Sequence[dict[str, Tensor]]) -> "PixelEnsemble":
        """Stack DiffuseSeg ``mlp_<k>_best.pt`` state dicts (fc1 -> bn1 -> ReLU -> ...); eval mode."""
        ens = cls.from_member_state_dicts(state_dicts)
        if ens.layer_order != "diffuseseg":
            raise UserError("these are official (layers.<i>) MLP state dicts, not DiffuseSeg ones "
                            "(use PixelEnsemble.from_member_state_dicts)")
        return ens


def _unwrap_member(sd: Any, k: int) -> tuple[str, dict[str, Tensor]]:
    """(layer order, plain state dict) of one member file's content."""
    if isinstance(sd, dict) and "model_state_dict" in sd:
        sd = sd["model_state_dict"]  # official train_interpreter.py checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"MLP {k}: expected a state dict of tensors, got {type(sd).__name__}")
    sd = {key.removeprefix("module."): v for key, v in sd.items()}
    if "fc1.weight" in sd:
        return "diffuseseg", sd
    if "layers.0.weight" in sd:
        return "official", sd
    raise UserError(f"MLP {k}: neither DiffuseSeg (fc1.weight ...) nor official (layers.0.weight ...) "
                    f"pixel MLP keys; found {sorted(sd)[:6]}")


MEMBER_FILE_PATTERNS = (r"mlp_(\d+)_best\.pt", r"model_(\d+)\.pth")  # DiffuseSeg, official ddpm-segmentation


def member_files(folder: str | Path) -> list[Path]:
    """DiffuseSeg's ``mlp_<k>_best.pt`` (or the official ``model_<k>.pth``) files in ``folder``, by k."""
    folder = Path(folder)
    for pattern in MEMBER_FILE_PATTERNS:
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
        if found:
            return [p for _, p in sorted(found)]
    raise UserError(f"{folder}: no pixel-MLP files in this folder (expected mlp_<k>_best.pt from DiffuseSeg "
                    f"or model_<k>.pth from ddpm-segmentation)")


def load_diffuseseg_mlps(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> PixelEnsemble:
    """An ensemble from DiffuseSeg's ``mlp_<k>_best.pt`` (or official ``model_<k>.pth``) files."""
    dicts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"MLP file not found: {path}")
        try:
            dicts.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # torch raises several types for corrupt / foreign files
            raise UserError(f"cannot read MLP file {path}: {str(err).splitlines()[0]}") from None
    try:
        return PixelEnsemble.from_member_state_dicts(dicts).to(device)
    except UserError as err:  # name the file instead of the member index
        message = str(err)
        for k, path in enumerate(paths):
            message = message.replace(f"MLP {k}:", f"{path}:")
        raise UserError(message) from None


# ---- training ---------------------------------------------------------------------------------------

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
    A last mini-batch of a single pixel is dropped: batch norm cannot train on one sample.
    """

    def __init__(self, num_pixels: int, members: int, batch_size: int, seed: int = 0,
                 labels: np.ndarray | Tensor | None = None) -> None:
        self.num_pixels, self.members, self.batch_size = int(num_pixels), int(members), int(batch_size)
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
        return n // b + (1 if n % b > 1 else 0)

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
        for start in range(0, self.num_pixels, self.batch_size):
            batch = order[:, start:start + self.batch_size]
            if batch.shape[1] < 2:
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
                   members: int = 10, hidden: tuple[int, int] = (128, 32), layer_order: str = "official",
                   init: str = "pytorch", lr: float = 1e-3, batch_size: int = 64, max_epochs: int = 100,
                   patience: int = 50, min_epochs: int = 4, min_steps: int = 0, class_balanced: bool = False, seed: int = 0,
                   device: str | torch.device = "cpu", progress: bool = True,
                   ensemble: PixelEnsemble | None = None, max_bad_steps: int = 10) -> PixelEnsemble:
    """Train E pixel MLPs on features (N, d) (float16/32 array, memmap or tensor) and labels (N,).

    Recipe of Baranchuk et al.: cross-entropy, Adam(lr=1e-3), batch 64, at most 100 epochs, each
    member its own initialisation (``init``) and its own sample order (``MemberSampler``).

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
    if ensemble is None:
        ensemble = PixelEnsemble(features.shape[1], num_classes, members, hidden, layer_order, init,
                                 generator=torch.Generator().manual_seed(derived_seed(seed, 0)))
    elif (ensemble.in_dim, ensemble.num_classes) != (features.shape[1], num_classes):
        raise UserError(f"the given ensemble is for d={ensemble.in_dim}, C={ensemble.num_classes}; "
                        f"the data has d={features.shape[1]}, C={num_classes}")
    ensemble = ensemble.to(device).train()
    e = ensemble.members
    sampler = MemberSampler(len(y_all), e, batch_size, derived_seed(seed, 1),
                            labels=y_all if class_balanced else None)
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


# ---- prediction ---------------------------------------------------------------------------------------

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


# ---- files ----------------------------------------------------------------------------------------------

def _check_plain(value: Any, where: str = "meta") -> None:
    """Raise unless ``value`` loads back with ``torch.load(weights_only=True)``."""
    # Exact types: numpy scalars subclass float but do not load with weights_only=True.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, Tensor):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; ensemble meta may hold only dicts, lists, "
                    "tuples, str, numbers, bools, None and tensors (e.g. use FeatureSpec.to_dict())")


def save_ensemble(path: str | Path, ensemble: PixelEnsemble, meta: dict | None = None) -> Path:
    """Write the stacked weights, the architecture and the caller's ``meta`` (class names, palette,
    feature spec ...) atomically, in a file ``torch.load(weights_only=True)`` can read."""
    meta = dict(meta or {})
    _check_plain(meta)
    return atomic_torch_save({
        "format": ENSEMBLE_FORMAT,
        "config": ensemble.config(),
        "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()},
        "meta": meta,
    }, path)


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> tuple[PixelEnsemble, dict]:
    """(ensemble in eval mode, meta) from a ``save_ensemble`` file."""
    path = Path(path)
    obj = load_torch_file(path, "ensemble file")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != ENSEMBLE_FORMAT:
        hint = ""
        if isinstance(obj, dict) and ("fc1.weight" in obj or "model_state_dict" in obj
                                      or "layers.0.weight" in obj or "module.layers.0.weight" in obj):
            hint = " It looks like a single pixel MLP: load a set of those with load_diffuseseg_mlps([...])."
        found = f"format {fmt!r}" if fmt is not None else f"a {type(obj).__name__} without a format tag"
        raise UserError(f"{path} is not a pixel ensemble file (expected format {ENSEMBLE_FORMAT!r}, "
                        f"found {found}).{hint}")
    try:
        cfg = obj["config"]
        ensemble = PixelEnsemble(cfg["in_dim"], cfg["num_classes"], cfg["members"], tuple(cfg["hidden"]),
                                 cfg["layer_order"])
        ensemble.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"{path}: damaged ensemble file ({str(err).splitlines()[0]})") from None
    return ensemble.to(device).eval(), obj.get("meta", {})


# ---- benchmark ------------------------------------------------------------------------------------------

def benchmark_epoch(members: int = 10, dim: int = 624, num_classes: int = 20, pixels: int = 50_000,
                    batch_size: int = 64, threads: int | None = 1, steps: int | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Seconds for one training epoch of the stacked ensemble (as ``train_ensemble`` runs it) vs the
    same E ``MemberMLP``s (official order) trained one after another, on random data: with the
    default Adam (the official loop) and with the same fused Adam as the stack (like for like).
    ``steps`` times only the first ``steps`` mini-batches of each and scales to the full epoch."""
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pixels, dim, generator=g)
    y = torch.randint(num_classes, (pixels,), generator=g)
    batches = list(MemberSampler(pixels, members, batch_size, seed).epoch())
    full = len(batches)
    batches = batches[:steps] if steps else batches
    scale = full / len(batches)

    ens = PixelEnsemble(dim, num_classes, members).train()
    initial = ens.to_member_modules()
    opt = make_adam(ens.parameters(), 1e-3)
    t0 = time.perf_counter()
    for idx in batches:
        loss = member_losses(ens, x[idx], y[idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    result = {"stacked_s": (time.perf_counter() - t0) * scale}

    for name, make in (("sequential_s", lambda p: torch.optim.Adam(p, lr=1e-3)),
                       ("sequential_fused_adam_s", lambda p: make_adam(p, 1e-3))):
        modules = copy.deepcopy(initial)
        t0 = time.perf_counter()
        for k, mlp in enumerate(modules):
            opt = make(mlp.parameters())
            for idx in batches:
                loss = F.cross_entropy(mlp(x[idx[k]]), y[idx[k]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        result[name] = (time.perf_counter() - t0) * scale
    # Training FLOPs ~ 3x the forward GEMMs (forward, grad wrt input, grad wrt weight): how close the
    # stacked epoch runs to the machine's GEMM peak, i.e. how much room any other schedule could have.
    h1, h2 = ens.hidden
    flops_per_step = 3 * 2 * batch_size * members * (dim * h1 + h1 * h2 + h2 * num_classes)
    result["stacked_gflops"] = flops_per_step * full / result["stacked_s"] / 1e9
    result["speedup"] = result["sequential_s"] / result["stacked_s"]
    result["speedup_same_adam"] = result["sequential_fused_adam_s"] / result["stacked_s"]
    result.update(steps_timed=len(batches), steps_per_epoch=full, threads=torch.get_num_threads())
    return result
