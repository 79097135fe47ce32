"""Pixel features from a frozen DDPM: noised copies of an image at a few timesteps, one batched U-Net
pass, activations of named blocks up-sampled to the label resolution and concatenated.

Layout (as in DiffuseSeg and Baranchuk et al.): timestep-major, then block order, so the feature
vector of a pixel is ``[t0: block0 | block1 | ..., t1: block0 | ...]``. One noise tensor per image
is shared by all timesteps: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffuseseg.diffusion import NoiseSchedule
from diffuseseg.runtime import maybe_compile
from diffuseseg.unet import UNet


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines the features, stored with every ensemble that consumes them."""
    timesteps: tuple[int, ...]
    blocks: tuple[str, ...]
    noise: str            # "shared": one noise tensor for all images (official); "per_image": seeded per image key
    noise_seed: int
    image_size: int
    dim: int              # feature channels per pixel
    checkpoint_sha256: str = ""  # which DDPM produced them ("" = not tied to a file, e.g. a random U-Net)
    label_size: int = 0   # side of the feature maps (features.label_size); 0 = image_size

    def __post_init__(self) -> None:
        if not self.label_size:
            object.__setattr__(self, "label_size", self.image_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        d = dict(d)
        d["timesteps"], d["blocks"] = tuple(d["timesteps"]), tuple(d["blocks"])
        d.setdefault("label_size", d["image_size"])  # files written before the key existed
        return cls(**d)

    def differences(self, other: "FeatureSpec") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def feature_noise(shape: tuple[int, int, int], mode: str, seed: int, keys: Sequence[int]) -> Tensor:
    """(len(keys), C, H, W) noise: the same tensor for every key ("shared"), or one per key."""
    if mode == "shared":
        one = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
        return one.expand(len(keys), *shape).clone()
    if mode == "per_image":
        return torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, int(k)]).generate_state(1)[0])))
            for k in keys])
    raise ValueError(f"unknown feature noise mode {mode!r}; expected 'shared' or 'per_image'")


class FeatureExtractor:
    """Frozen U-Net + schedule -> per-pixel features of images in [-1, 1]."""

    def __init__(self, model: UNet, schedule: NoiseSchedule, timesteps: Sequence[int], blocks: Sequence[str],
                 *, noise: str = "shared", noise_seed: int = 0, label_size: int | None = None,
                 checkpoint_sha256: str = "", compile: str = "none", compile_backend: str = "inductor",
                 channels_last: bool | None = None) -> None:
        bad = [t for t in timesteps if not 0 <= t < schedule.num_train_timesteps]
        if bad:
            raise ValueError(f"feature timesteps {bad} are outside [0, {schedule.num_train_timesteps - 1}]")
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        # channels_last=None: channels-last on a CPU, where the U-Net passes run about 1.2x faster and the maps come
        # out channels-last as the read-out stores them (benchmark.py --parts photos); the features agree to float
        # rounding. GPUs keep the layout they were given (not measured there).
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.schedule = schedule
        self.timesteps, self.blocks = tuple(int(t) for t in timesteps), tuple(blocks)
        self.noise_mode, self.noise_seed = noise, noise_seed
        self.image_size = model.cfg.im_size
        self.label_size = label_size or self.image_size
        # Infer the feature size from a dry run on a 1-image batch (also validates the block names).
        with torch.no_grad():
            probe = torch.zeros(1, model.cfg.im_channels, self.image_size, self.image_size, device=self.device)
            outs = model.forward_features(probe, torch.zeros(1, dtype=torch.long, device=self.device), self.blocks)
        self.channels_per_timestep = sum(outs[b].shape[1] for b in self.blocks)
        # Compiled after the probe, so the eager dry run costs no compile; a compiled pass gives the same features.
        self._forward_features = maybe_compile(model.forward_features, compile, compile_backend)
        self.spec = FeatureSpec(self.timesteps, self.blocks, noise, noise_seed, self.image_size,
                                self.channels_per_timestep * len(self.timesteps), checkpoint_sha256,
                                self.label_size)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @torch.no_grad()
    def __call__(self, images: Tensor, keys: Sequence[int] | None = None, noise: Tensor | None = None) -> Tensor:
        """Features (B, dim, label_size, label_size) of ``images`` (B, C, H, W) in [-1, 1]: ``block_maps``
        upsampled bilinearly to ``label_size`` and concatenated.

        ``keys`` identify images for per-image noise (default 0..B-1); ``noise`` overrides both.
        """
        size = (self.label_size, self.label_size)
        return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                          if m.shape[-1] != self.label_size else m for m in self.block_maps(images, keys, noise)], 1)

    @torch.no_grad()
    def block_maps(self, images: Tensor, keys: Sequence[int] | None = None,
                   noise: Tensor | None = None) -> list[Tensor]:
        """The features before upsampling: one map (B, c, s, s) per timestep and block at the block's own
        resolution, in the order of the feature channels (timestep-major, then ``blocks``)."""
        b = images.shape[0]
        if noise is None:
            keys = range(b) if keys is None else keys
            noise = feature_noise(tuple(images.shape[1:]), self.noise_mode, self.noise_seed, keys)
        images, noise = images.to(self.device, torch.float32), noise.to(self.device, torch.float32)
        n_t = len(self.timesteps)
        # All timesteps in ONE forward: batch index = timestep_index * B + image_index.
        t = torch.tensor(self.timesteps, device=self.device).repeat_interleave(b)
        x_t = self.schedule.add_noise(images.repeat(n_t, 1, 1, 1), noise.repeat(n_t, 1, 1, 1), t)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        outs = self._forward_features(x_t, t, self.blocks)
        return [outs[name][i * b:(i + 1) * b] for i in range(n_t) for name in self.blocks]


class RawPixelFeatures:
    """Baseline with the extractor's interface: each pixel's RGB and (x, y) position, in [-1, 1]."""

    def __init__(self, image_size: int, label_size: int | None = None) -> None:
        self.image_size = image_size
        self.label_size = label_size or image_size
        self.spec = FeatureSpec((), ("rgb", "xy"), "none", 0, image_size, 5, "", self.label_size)

    @property
    def dim(self) -> int:
        return self.spec.dim

    def __call__(self, images: Tensor, keys: Sequence[int] | None = None, noise: Tensor | None = None) -> Tensor:
        size = (self.label_size, self.label_size)
        rgb = images.float() if images.shape[-1] == self.label_size else F.interpolate(
            images.float(), size=size, mode="bilinear", align_corners=False)
        coords = torch.linspace(-1, 1, self.label_size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        xy = torch.stack([xx, yy]).expand(images.shape[0], 2, *size)
        return torch.cat([rgb, xy], dim=1)
