"""The stacked pixel-MLP ensemble: E members' layers as batched tensors (see the package docstring)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuseseg.errors import UserError

ENSEMBLE_FORMAT = "diffuseseg-ensemble/1"
LAYER_ORDERS = ("official", "diffuseseg")
INITS = ("pytorch", "official")
# Module indices of the official nn.Sequential (Linear, ReLU, BN, Linear, ReLU, BN, Linear).
_OFFICIAL_NAMES = {"fc1": "layers.0", "bn1": "layers.2", "fc2": "layers.3", "bn2": "layers.5", "fc_out": "layers.6"}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# The official pixel_classifier widens its hidden layers for label sets of this many classes or more.
OFFICIAL_WIDE_CLASSES = 30


def official_hidden(num_classes: int) -> tuple[int, int]:
    """Hidden sizes of the official pixel classifier: (256, 128) for >= 30 classes, else (128, 32).

    The official code picks the width from the class count (e.g. ffhq_34 / ade_bedroom_30 get the wide
    MLP); a fixed (128, 32) would squeeze 30+ classes through 32 units."""
    return (256, 128) if num_classes >= OFFICIAL_WIDE_CLASSES else (128, 32)


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

    def __init__(self, in_dim: int, num_classes: int, hidden: tuple[int, int] | None = None,
                 layer_order: str = "official") -> None:
        super().__init__()
        _check_choice("layer_order", layer_order, LAYER_ORDERS)
        self.layer_order = layer_order
        h1, h2 = official_hidden(num_classes) if hidden is None else hidden
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

    Defaults are the official recipe: ``hidden=None`` -> ``official_hidden(num_classes)``, ``init="official"``
    (N(0, 0.02) weights, zero bias; ``"pytorch"`` = nn.Linear's default).
    """

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, hidden: tuple[int, int] | None = None,
                 layer_order: str = "official", init: str = "official",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_choice("layer_order", layer_order, LAYER_ORDERS)
        hidden = official_hidden(num_classes) if hidden is None else hidden
        self.in_dim, self.num_classes, self.members = int(in_dim), int(num_classes), int(members)
        self.hidden, self.layer_order = (int(hidden[0]), int(hidden[1])), layer_order
        h1, h2 = self.hidden
        self.fc1, self.bn1 = StackedLinear(members, in_dim, h1), StackedBatchNorm(members, h1)
        self.fc2, self.bn2 = StackedLinear(members, h1, h2), StackedBatchNorm(members, h2)
        self.fc_out = StackedLinear(members, h2, num_classes)
        self.reset_parameters(init, generator)

    def reset_parameters(self, init: str = "official", generator: torch.Generator | None = None) -> None:
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
