"""The stacked expert layer equals a per-expert reference loop for any gates (float64)."""

import pytest
import torch

from bench.lora.adapters import LoraModule
from bench.lora.stacked import StackedLoraLinear, block_of


def reference(base, experts, x, gates):
    """y = W x + b + Σ_i g_i s_i B_i A_i x, one expert at a time."""
    y = base(x)
    for i, m in enumerate(experts):
        g = gates[..., i] if gates is not None else torch.ones(())
        delta = m.scale * (x @ m.A.T) @ m.B.T
        while g.dim() and g.dim() < delta.dim():
            g = g.unsqueeze(-1)
        y = y + g * delta
    return y


@pytest.mark.parametrize("gate_shape", ["none", "layer", "sequence", "token"])
@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 5, 3]])
def test_stacked_equals_loop(gate_shape, ranks):
    torch.manual_seed(len(ranks) + sum(ranks))
    d_in, d_out, batch, seq = 12, 10, 3, 7
    base = torch.nn.Linear(d_in, d_out).double()
    experts = [LoraModule(torch.randn(r, d_in).double(), torch.randn(d_out, r).double(), 0.5 + i) for i, r in enumerate(ranks)]
    layer = StackedLoraLinear(base, experts)
    x = torch.randn(batch, seq, d_in).double()
    n = len(ranks)
    gates = {"none": None, "layer": torch.rand(n).double(), "sequence": torch.rand(batch, n).double(),
             "token": torch.rand(batch, seq, n).double()}[gate_shape]
    layer.gates = gates
    ref_gates = gates.unsqueeze(1) if gate_shape == "sequence" else gates
    torch.testing.assert_close(layer(x), reference(base, experts, x, ref_gates), rtol=1e-12, atol=1e-12)


def test_expert_outputs_are_each_expert():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    experts = [LoraModule(torch.randn(r, 6).double(), torch.randn(5, r).double(), 2.0) for r in (2, 3)]
    layer = StackedLoraLinear(base, experts)
    x = torch.randn(4, 6).double()
    outs = layer.expert_outputs(layer.project(x))
    for i, m in enumerate(experts):
        torch.testing.assert_close(outs[:, i], (x @ m.A.T @ m.B.T) * m.scale, rtol=1e-12, atol=1e-12)


def test_block_of():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("encoder.block.1.layer.0.SelfAttention.q") == "encoder.block.1"
    assert block_of("lm_head") == "lm_head"


# ---- added with the gated-layer benchmark: the faster formulations equal the reference -------------------
from bench.lora.stacked import fused_forward  # noqa: E402


def _layer(ranks, bias=True, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10, bias=bias).double()
    experts = [LoraModule(torch.randn(r, 12).double(), torch.randn(10, r).double(), 0.5 + i) for i, r in enumerate(ranks)]
    return base, experts, StackedLoraLinear(base, experts)


@pytest.mark.parametrize("gate_shape", ["none", "layer", "sequence", "token"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_equals_loop(gate_shape, bias):
    ranks = [2, 5, 3]
    base, experts, layer = _layer(ranks, bias)
    x = torch.randn(3, 7, 12).double()
    gates = {"none": None, "layer": torch.rand(3).double(), "sequence": torch.rand(3, 3).double(),
             "token": torch.rand(3, 7, 3).double()}[gate_shape]
    ref_gates = gates.unsqueeze(1) if gate_shape == "sequence" else gates
    y = fused_forward(x, layer.fused_weight(), layer.B_cat, gates, layer.n_experts, layer.rank, base.bias)
    torch.testing.assert_close(y, reference(base, experts, x, ref_gates), rtol=1e-12, atol=1e-12)


def test_grad_path_equals_inplace_path():
    base, experts, layer = _layer([3, 3])
    x = torch.randn(2, 5, 12).double()
    gates = torch.rand(2, 5, 2).double().requires_grad_()
    layer.gates = gates
    y_grad = layer(x)  # autograd path (gates require grad)
    y_grad.sum().backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    with torch.no_grad():
        y_inplace = layer(x)  # in-place addmm_ path
    torch.testing.assert_close(y_grad.detach(), y_inplace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_inplace, reference(base, experts, x, gates.detach()), rtol=1e-12, atol=1e-12)


def test_gate_fn_supplies_gates():
    base, experts, layer = _layer([2, 4])
    x = torch.randn(2, 5, 12).double()
    gates = torch.rand(2, 5, 2).double()
    seen = []

    def gate_fn(lyr, inp, h):
        seen.append(h.shape)
        return gates

    layer.gate_fn = gate_fn
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(base, experts, x, gates), rtol=1e-12, atol=1e-12)
    assert seen == [(2, 5, 2 * 4)]


# ---- the diffusion modes (bench.models.diffusion.ExpertMix) drive the same layer ---------------------------------
from bench.models.diffusion import ExpertMix  # noqa: E402


def _pool_outputs(experts, x):
    """Each expert's output mean-pooled over every dimension between batch and features: (batch, N, d_out)."""
    return torch.stack([(m.scale * (x @ m.A.T) @ m.B.T).flatten(1, -2).mean(1) for m in experts], 1)


@pytest.mark.parametrize("mode", ["off", "only", "weighted_layer", "weighted_row", "gated"])
@pytest.mark.parametrize("shape", [(3, 7), (3, 2, 4)])
def test_expert_mix_modes_equal_loop(mode, shape):
    """Experts of different ranks (2, 5, 3: the first padded), tokens (B, L, C) or spatial (B, H, W, C) inputs."""
    base, experts, layer = _layer([2, 5, 3], seed=1)
    mix = ExpertMix(["e0", "e1", "e2"], {"layer": layer})
    x = torch.randn(*shape, 12).double()
    n, batch, middle = 3, shape[0], [1] * (len(shape) - 1)
    if mode == "off":
        mix.off()
        ref = torch.zeros(n).double()
    elif mode == "only":
        mix.only(0, 0.7)  # a rank-2 expert: its own slice of the padded factors
        ref = 0.7 * torch.nn.functional.one_hot(torch.tensor(0), n).double()
    elif mode == "weighted_layer":
        mix.weighted(torch.rand(n).double())
        ref = mix.weights
    elif mode == "weighted_row":
        mix.weighted(torch.rand(batch, n).double())
        ref = mix.weights.view(batch, *middle, n)
    else:
        mix.gated(lambda lyr, h: lyr.expert_outputs(h.flatten(1, -2).mean(1)).sum(-1).softmax(-1))
        ref = _pool_outputs(experts, x).sum(-1).softmax(-1).view(batch, *middle, n)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(base, experts, x, ref), rtol=1e-12, atol=1e-12)
