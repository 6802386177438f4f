"""The stabilizer s(z) that keeps LRP denominators away from zero.

Three modes, all with sign(0) = +1 so that a zero denominator is pushed to +epsilon:
- ``sign``: s(z) = z + eps * sign(z)
- ``clip``: s(z) = sign(z) * max(|z|, eps)
- ``rms``:  s(z) = z + eps * rms(z) * sign(z), rms taken over each sample (all non-batch elements), so that
  epsilon is relative to the scale of the layer's output — useful where magnitudes differ by orders between
  layers (residual networks with Gamma). A sample whose denominators are all zero uses eps itself.

The rms of a denominator may also be given (``divide(..., rms=...)``): a layer that keeps relu(z) in place of
its output z takes it at forward time, while z is whole (``ParamRule.rectified_rms``), as B numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

MODES = ("sign", "clip", "rms")


def sign0(z: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, in z's dtype."""
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


@dataclass(frozen=True)
class Stabilizer:
    """A denominator stabilizer: ``Stabilizer(1e-6, 'sign')``; call it on a denominator tensor."""

    epsilon: float = 1e-6
    mode: str = "sign"

    def __post_init__(self) -> None:
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, Real):
            raise TypeError(f"stabilizer epsilon: expected a number >= 0, got {self.epsilon!r}")
        if not self.epsilon >= 0:
            raise ValueError(f"stabilizer epsilon: expected a number >= 0, got {self.epsilon!r}")
        if self.mode not in MODES:
            raise ValueError(f"stabilizer mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        object.__setattr__(self, "epsilon", float(self.epsilon))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "sign":
            # copysign: two passes instead of four; -0.0 (an all-(-0) sum, whose numerators are all zero too)
            # gets -eps, which changes nothing
            return z + torch.copysign(torch.tensor(self.epsilon, dtype=z.dtype, device=z.device), z)
        if self.mode == "clip":
            return sign0(z) * z.abs().clamp(min=self.epsilon)
        dims = tuple(range(1, z.dim()))
        rms = z.pow(2).mean(dim=dims, keepdim=True).sqrt() if dims else z.pow(2).mean().sqrt()
        rms = torch.where(rms > 0, rms, 1.0)  # an all-zero sample: eps itself, so 0/s(0) is 0, not NaN
        return z + self.epsilon * rms * sign0(z)

    @staticmethod
    def rms(den: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The rms mode's per-sample scale of a denominator: sqrt(mean(den^2)) over each sample's elements (all
        elements for a tensor of at most one dimension), kept as dimensions of size 1; 1 for an all-zero sample;
        times ``scale`` (epsilon, for the term itself in one op less). One reduction (a norm), which sums in
        another order than mean(den^2): equal up to rounding."""
        dims = tuple(range(1, den.dim()))
        root = math.sqrt(max(math.prod(den.shape[1:]) if dims else den.numel(), 1))
        norm = torch.linalg.vector_norm(den, dim=dims or None, keepdim=bool(dims))
        return torch.where(norm > 0, norm, root).mul_(scale / root)

    def divide(self, numerator: torch.Tensor, den: torch.Tensor, out: torch.Tensor | None = None,
               nonnegative: bool = False, rms: torch.Tensor | None = None) -> torch.Tensor:
        """numerator / s(den), with one new tensor instead of three when no graph is being recorded.

        Fresh large tensors cost page faults on the CPU, which can take longer than the arithmetic, so the
        first-order path computes s(den) into one buffer (``out`` when given, e.g. half of a rule's pair buffer)
        and divides into it. With grad enabled (second order) it stays out of place and ``out`` must be None.
        ``nonnegative``: den >= 0 (a rectified output), so s(den) is den + eps or max(den, eps), one pass less.
        ``rms``: the rms mode's per-sample scale of the whole denominator (``Stabilizer.rms``), taken where den was
        whole; used in the first order only (with a graph the scale is a function of den, taken here).
        """
        if nonnegative and not torch.is_grad_enabled() and (self.mode != "rms" or rms is not None):
            if self.mode == "clip":
                s = den.clamp(min=self.epsilon) if out is None else torch.clamp(den, min=self.epsilon, out=out)
            else:
                term = self.epsilon if rms is None else rms * self.epsilon
                s = torch.add(den, term) if out is None else torch.add(den, term, out=out)
            return torch.div(numerator, s, out=s)
        if not torch.is_grad_enabled() and self.mode == "rms":
            return self._divide_rms(numerator, den, out, rms)
        if torch.is_grad_enabled() or self.mode != "sign":
            result = numerator / self(den)
            return result if out is None else out.copy_(result)
        eps = torch.tensor(self.epsilon, dtype=den.dtype, device=den.device)
        out = torch.copysign(eps, den) if out is None else torch.copysign(eps, den, out=out)
        out.add_(den)
        return torch.div(numerator, out, out=out)

    def _divide_rms(self, numerator: torch.Tensor, den: torch.Tensor, out: torch.Tensor | None,
                    rms: torch.Tensor | None = None) -> torch.Tensor:
        """``numerator / self(den)`` in rms mode in three passes over den (one buffer), after the per-sample rms
        (one reduction, unless ``rms`` is given): s = den + copysign(eps * rms, den) and the division in place.

        Equal to ``self(den)`` up to rounding (the norm sums in another order than mean(den^2)): the rms only
        scales eps. copysign gives -0.0 the sign -1 where sign0 gives +1; such a denominator is a sum of zero
        products, whose numerators are zero too, as in the sign mode."""
        term = self.rms(den, self.epsilon) if rms is None else rms * self.epsilon
        s = torch.copysign(term, den) if out is None else torch.copysign(term, den, out=out)
        s.add_(den)
        return torch.div(numerator, s, out=s)

    def with_epsilon(self, epsilon: float) -> Stabilizer:
        """The same mode with another epsilon (the Epsilon rule's own epsilon)."""
        return Stabilizer(epsilon, self.mode)

    @classmethod
    def coerce(cls, value: Stabilizer | float | dict | None, default: float = 1e-6) -> Stabilizer:
        """Accept a Stabilizer, a number (sign mode), a dict of fields or None (the default)."""
        if value is None:
            return cls(default)
        if isinstance(value, Stabilizer):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(value)
