"""The non-finite guard shared by every training loop (DDPM, pixel ensemble, conv heads, segmenter).

A step whose loss or gradient is NaN/inf is skipped before it can touch the weights, the optimizer
state, the EMA or a checkpoint. A few such steps in a row can be a fluke (one bad batch); many mean the
run has diverged, and it stops with an error naming the step, leaving the last good checkpoint as it was.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from diffuseseg.errors import UserError


class NonFiniteError(UserError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradient."""


def grads_are_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every gradient is finite (one fused reduction, no host sync per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class NonFiniteGuard:
    """``ok(step, loss, params)`` says whether this step may update anything; it raises NonFiniteError
    after more than ``max_bad_steps`` bad steps in a row (0 = at the first)."""

    def __init__(self, what: str, max_bad_steps: int, hint: str = "") -> None:
        self.what, self.max_bad_steps, self.hint = what, max_bad_steps, hint
        self.in_a_row = 0
        self.skipped = 0

    def ok(self, step: int, loss: Tensor | float, params: Iterable[torch.nn.Parameter] | None = None) -> bool:
        value = float(loss)
        if math.isfinite(value) and (params is None or grads_are_finite(params)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.max_bad_steps:
            kind = "loss" if not math.isfinite(value) else "gradient"
            raise NonFiniteError(
                f"{self.what}: non-finite {kind} ({value}) at step {step}, {self.in_a_row} bad steps in a row "
                f"(limit {self.max_bad_steps}); the run stopped without writing the diverged state, the last "
                f"checkpoint is untouched.{(' ' + self.hint) if self.hint else ''}")
        return False
