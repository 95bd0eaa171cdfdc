"""MoLE's gating function, one definition for the language-model form (`methods.mole`) and the diffusion form
(`methods.mole_diffusion`): see `methods.mole`'s docstring, *Gate*."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MoleGate(nn.Module):
    """MoLE's gate: ``softmax(e · Flatten(concat_i LayerNorm(pooled Δh_i)) / τ)``, e without bias, τ clamped to
    `temperature_range` (module docstring, *Gate*). Shared by the language-model and the diffusion form."""

    def __init__(self, n_experts: int, d: int, temperature_init: float = 1.0,
                 temperature_range: tuple[float, float] = (1.0, 3.0), init_std: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.n_experts, self.d = n_experts, d
        self.temperature_range = (float(temperature_range[0]), float(temperature_range[1]))
        self.proj = nn.Linear(n_experts * d, n_experts, bias=False)
        with torch.no_grad():
            if init_std > 0:
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * init_std)
            else:
                self.proj.weight.zero_()
        self.temperature = nn.Parameter(torch.tensor(float(temperature_init)).clamp(*self.temperature_range))

    def tau(self) -> torch.Tensor:
        return self.temperature.clamp(*self.temperature_range)

    def forward(self, pooled: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """pooled (..., N, d) -> weights (..., N); `keep` (N,) bool drops the other experts (renormalized)."""
        z = F.layer_norm(pooled.to(self.proj.weight.dtype), (pooled.shape[-1],))  # per expert, no affine
        logits = self.proj(z.flatten(-2)) / self.tau()
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(-1)

    @torch.no_grad()
    def project_temperature(self) -> None:
        self.temperature.clamp_(*self.temperature_range)
