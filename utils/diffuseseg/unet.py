"""The denoising U-Net (ε- or v-prediction), parameter-compatible with DiffuseSeg.

The module tree, parameter names and forward semantics follow the original DiffuseSeg U-Net
(``../shared/reference/diffuseseg-seed-format.md``), so its published ``state_dict`` loads unchanged.
Three extensions keep that compatibility: attention can be switched off per level (a lean CPU model
needs it only at low resolution), optional dropout inside the ResNet layers (a parameter-free
module, so names do not move), and attention runs through ``F.scaled_dot_product_attention`` with
``nn.MultiheadAttention``'s parameter layout.

Every block is reachable by a stable name (``downs.<i>``, ``mids.<j>``, ``ups.<k>``):
``UNet.forward_features`` returns the outputs of named blocks and stops after the last one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuseseg.config import GROUPS, ModelConfig, validate_model_config


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps, sin half first (DiffuseSeg's layout)."""
    half = dim // 2
    freqs = 10000 ** (torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] / freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, computed with
    the fused ``scaled_dot_product_attention`` kernel (same numbers, less memory, faster)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, L, C)
        b, length, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(b, length, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, length, c))


def _norm_act_conv(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    # SiLU in place: the GroupNorm's output feeds nothing else, and autograd's silu_ keeps what it needs; it spares
    # a whole map's memory traffic per layer (the read-out's U-Net passes ~1.1x faster on a CPU)
    layers = [("0", nn.GroupNorm(GROUPS, c_in)), ("1", nn.SiLU(inplace=True))]
    if dropout > 0:
        layers.append(("dropout", nn.Dropout(dropout)))  # named so that the conv keeps index "2"
    layers.append(("2", nn.Conv2d(c_in, c_out, 3, padding=1)))
    return nn.Sequential(OrderedDict(layers))


class _ResAttnStack(nn.Module):
    """``num_resnets`` ResNet layers and ``num_attn`` attention layers held in DiffuseSeg's
    per-kind ModuleLists (``resnet_conv_first.<l>``, ``attentions.<l>``, ...)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, num_resnets: int, num_attn: int,
                 num_heads: int, dropout: float) -> None:
        super().__init__()
        ins = [c_in] + [c_out] * (num_resnets - 1)
        self.resnet_conv_first = nn.ModuleList(_norm_act_conv(i, c_out) for i in ins)
        self.t_emb_layers = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out)) for _ in ins)
        self.resnet_conv_second = nn.ModuleList(
            _norm_act_conv(c_out, c_out, dropout) for _ in ins)
        if num_attn:
            self.attention_norms = nn.ModuleList(nn.GroupNorm(GROUPS, c_out) for _ in range(num_attn))
            self.attentions = nn.ModuleList(SelfAttention(c_out, num_heads) for _ in range(num_attn))
        self.residual_input_conv = nn.ModuleList(nn.Conv2d(i, c_out, 1) for i in ins)

    def resnet(self, layer: int, h: Tensor, t_emb: Tensor) -> Tensor:
        # sums in place into the convolutions' fresh outputs (which autograd does not keep): half the memory traffic
        out = self.resnet_conv_first[layer](h)
        out += self.t_emb_layers[layer](t_emb)[:, :, None, None]
        out = self.resnet_conv_second[layer](out)
        return out.add_(self.residual_input_conv[layer](h))

    def attend(self, layer: int, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        # GroupNorm is shape-agnostic over spatial dims, so normalise before flattening.
        tokens = self.attention_norms[layer](h).reshape(b, c, height * width).transpose(1, 2)
        attn = self.attentions[layer](tokens).transpose(1, 2).reshape(b, c, height, width)
        return h + attn


class DownBlock(_ResAttnStack):
    def __init__(self, c_in: int, c_out: int, t_dim: int, num_layers: int, attention: bool,
                 num_heads: int, down_sample: bool, dropout: float) -> None:
        super().__init__(c_in, c_out, t_dim, num_layers, num_layers if attention else 0,
                         num_heads, dropout)
        self.num_layers, self.attention = num_layers, attention
        self.down_sample_conv = nn.Conv2d(c_out, c_out, 4, 2, 1) if down_sample else nn.Identity()

    def forward(self, h: Tensor, t_emb: Tensor) -> Tensor:
        for layer in range(self.num_layers):
            h = self.resnet(layer, h, t_emb)
            if self.attention:
                h = self.attend(layer, h)
        return self.down_sample_conv(h)


class MidBlock(_ResAttnStack):
    def __init__(self, c_in: int, c_out: int, t_dim: int, num_layers: int, num_heads: int,
                 dropout: float) -> None:
        super().__init__(c_in, c_out, t_dim, num_layers + 1, num_layers, num_heads, dropout)
        self.num_layers = num_layers

    def forward(self, h: Tensor, t_emb: Tensor) -> Tensor:
        h = self.resnet(0, h, t_emb)
        for layer in range(self.num_layers):
            h = self.attend(layer, h)
            h = self.resnet(layer + 1, h, t_emb)
        return h


class UpBlock(_ResAttnStack):
    """Up-samples ``c_in // 2`` channels, concatenates the skip (``c_in // 2`` channels)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, num_layers: int, attention: bool,
                 num_heads: int, up_sample: bool, dropout: float) -> None:
        super().__init__(c_in, c_out, t_dim, num_layers, num_layers if attention else 0,
                         num_heads, dropout)
        self.num_layers, self.attention = num_layers, attention
        self.up_sample_conv = (nn.ConvTranspose2d(c_in // 2, c_in // 2, 4, 2, 1) if up_sample
                               else nn.Identity())

    def forward(self, h: Tensor, skip: Tensor, t_emb: Tensor) -> Tensor:
        h = torch.cat([self.up_sample_conv(h), skip], dim=1)
        for layer in range(self.num_layers):
            h = self.resnet(layer, h, t_emb)
            if self.attention:
                h = self.attend(layer, h)
        return h


class UNet(nn.Module):
    """DiffuseSeg's U-Net. ``forward(x, t)`` predicts the noise (or v) for images ``x`` in [-1, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        down, mid, t_dim = cfg.down_channels, cfg.mid_channels, cfg.time_emb_dim
        attn = cfg.attention
        self.t_proj = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(cfg.im_channels, down[0], 3, padding=1)
        self.downs = nn.ModuleList(
            DownBlock(down[i], down[i + 1], t_dim, cfg.num_down_layers, attn[i], cfg.num_heads,
                      cfg.down_sample[i], cfg.dropout)
            for i in range(len(down) - 1))
        self.mids = nn.ModuleList(
            MidBlock(mid[j], mid[j + 1], t_dim, cfg.num_mid_layers, cfg.num_heads, cfg.dropout)
            for j in range(len(mid) - 1))
        # DiffuseSeg: the up block of level i maps down[i]*2 -> down[i-1] (16 at the top level).
        self.ups = nn.ModuleList(
            UpBlock(down[i] * 2, down[i - 1] if i else cfg.out_block_channels, t_dim,
                    cfg.num_up_layers, attn[i], cfg.num_heads, cfg.down_sample[i], cfg.dropout)
            for i in reversed(range(len(down) - 1)))
        self.norm_out = nn.GroupNorm(GROUPS, cfg.out_block_channels)
        self.conv_out = nn.Conv2d(cfg.out_block_channels, cfg.im_channels, 3, padding=1)

    @property
    def block_names(self) -> list[str]:
        """Names of the blocks in execution order (what ``forward_features`` can capture)."""
        return ([f"downs.{i}" for i in range(len(self.downs))]
                + [f"mids.{j}" for j in range(len(self.mids))]
                + [f"ups.{k}" for k in range(len(self.ups))])

    def _run(self, x: Tensor, t: Tensor, capture: Sequence[str] = ()) -> tuple[Tensor | None, dict[str, Tensor]]:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_emb = self.t_proj(timestep_embedding(t.to(x.device), self.cfg.time_emb_dim))
        wanted, captured = set(capture), {}
        unknown = wanted - set(self.block_names)
        if unknown:
            raise KeyError(f"unknown U-Net block(s) {sorted(unknown)}; available: {self.block_names}")

        def keep(name: str, h: Tensor) -> bool:  # True once every requested block is captured
            if name in wanted:
                captured[name] = h
            return bool(wanted) and len(captured) == len(wanted)

        h, skips = self.conv_in(x), []
        for i, block in enumerate(self.downs):
            skips.append(h)
            h = block(h, t_emb)
            if keep(f"downs.{i}", h):
                return None, captured
        for j, block in enumerate(self.mids):
            h = block(h, t_emb)
            if keep(f"mids.{j}", h):
                return None, captured
        for k, block in enumerate(self.ups):
            h = block(h, skips.pop(), t_emb)
            if keep(f"ups.{k}", h):
                return None, captured
        return self.conv_out(F.silu(self.norm_out(h))), captured

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self._run(x, t)[0]

    def forward_features(self, x: Tensor, t: Tensor, blocks: Sequence[str]) -> dict[str, Tensor]:
        """Outputs of the named blocks for (x, t); computation stops after the last of them."""
        if not blocks:
            raise ValueError("forward_features needs at least one block name")
        return self._run(x, t, blocks)[1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def model_config_from_diffuseseg(unet_config: dict) -> ModelConfig:
    """A ModelConfig equal to a DiffuseSeg ``unet_config`` dict (attention at every level)."""
    known = {f for f in ModelConfig.__dataclass_fields__}
    unknown = set(unet_config) - known
    if unknown:
        raise ValueError(f"unknown DiffuseSeg U-Net keys {sorted(unknown)}")
    values = dict(unet_config)
    values.setdefault("attention", [True] * (len(values["down_channels"]) - 1))
    values.setdefault("dropout", 0.0)
    values.setdefault("out_block_channels", 16)
    return ModelConfig(**values)
