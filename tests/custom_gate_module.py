"""Custom base functions for the tests, loaded by import path (``tests.custom_gate_module:NAME``).

Each F is paired with its closed-form derivative (``d_NAME``), written by hand so tests can compare
against it instead of against autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def F(x: Tensor) -> Tensor:
    """Admissible, not built in: the algebraic sigmoid F(x) = x/√(1+x²); F' = (1+x²)^(-3/2)."""
    return x / torch.sqrt(1.0 + x * x)


def d_F(x: Tensor) -> Tensor:
    return (1.0 + x * x) ** -1.5


# HWHM of F' = (1+x²)^(-3/2): (1+h²)^(3/2) = 2  =>  h = √(2^(2/3) − 1).
F_HWHM = math.sqrt(2.0 ** (2.0 / 3.0) - 1.0)


def LINEAR(x: Tensor) -> Tensor:
    """F(x) = x: F' ≡ 1, continuous, max 1 at 0, non-increasing, but no vanishing tail: fails (iv) only."""
    return x


def HALF_SLOPE(x: Tensor) -> Tensor:
    """F(x) = arctan(x)/2: F'(0) = 1/2 ≠ 1: fails (ii) only."""
    return 0.5 * torch.atan(x)


BUMP_AT = 5.0


def BUMP(x: Tensor) -> Tensor:
    """F' = 1/(1+x²) + 0.3·exp(−4(x−5)²): a bump away from 0 (below 1): fails (iii) only."""
    return torch.atan(x) + 0.3 * (math.sqrt(math.pi) / 4.0) * torch.erf(2.0 * (x - BUMP_AT))


def d_BUMP(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + x * x) + 0.3 * torch.exp(-4.0 * (x - BUMP_AT) ** 2)


def STEP(x: Tensor) -> Tensor:
    """F' = 1 for |x| ≤ 1, 1/(2x²) beyond: a jump from 1 to 1/2 at |x| = 1: fails (i) only."""
    ax = x.abs()
    outer = torch.sign(x) * (1.0 + 0.5 * (1.0 - 1.0 / ax.clamp(min=1.0)))
    return torch.where(ax <= 1.0, x, outer)


def NOT_ELEMENTWISE(x: Tensor) -> Tensor:
    """Maps a tensor to a scalar: must be rejected."""
    return x.sum()


def SLOW_TAIL(x: Tensor) -> Tensor:
    """F' = (1+|x|)^(−0.9): continuous, max 1 at 0, decreasing, F' → 0, but F'(x)·x ~ x^0.1 → ∞: fails (iv) only
    (the paper's (iv) asks the gradient contribution w·r to vanish, not only w)."""
    def h(t: Tensor) -> Tensor:  # ∫_0^t (1+s)^(-0.9) ds for t >= 0
        return ((1.0 + t) ** 0.1 - 1.0) / 0.1

    # Branches rather than sign(x)·h(|x|): autograd gives sign and |x| a zero derivative at 0, so F'(0) would read 0.
    return torch.where(x >= 0, h(x.clamp(min=0.0)), -h((-x).clamp(min=0.0)))


def d_SLOW_TAIL(x: Tensor) -> Tensor:
    return (1.0 + x.abs()) ** -0.9
