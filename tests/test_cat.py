"""CAT / LoRA Soups (methods/cat.py), tested from the paper's and the official code's equations:

    y_l = W_l x + Σ_i w_{l,i} s_i B_i A_i x,    w_l = softmax_i(θ_l)  (official "cat" mode; θ = w without softmax)

one weight per LoRA'd module and expert, the experts frozen, the result one LoRA of rank Σ r_i.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from methods.base import FitContext
from methods.cat import Cat, cat_attached, cat_merge, initial_logits, perf_forwards
from methods.ops.gates import lr_factor
from methods.linear import concat_merge
from tasks.algorithmic import generate

MODULES = ("blocks.0.q", "blocks.0.v", "blocks.1.q")
RANKS = (2, 5, 3)


# ----------------------------------------------------------------------------------------- float64 equations
class Net(nn.Module):
    """Three linear layers in a chain: y = q1(tanh(v0(q0(x))))."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        self.blocks[0].q = nn.Linear(d, d + 2, bias=False).double()
        self.blocks[0].v = nn.Linear(d + 2, d, bias=False).double()
        self.blocks[1].q = nn.Linear(d, d - 1, bias=False).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def layers(self):
        return [self.blocks[0].q, self.blocks[0].v, self.blocks[1].q]

    def forward(self, x):
        return self.blocks[1].q(torch.tanh(self.blocks[0].v(self.blocks[0].q(x))))


def net_pool(net, ranks=RANKS, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    adapters = []
    for i, r in enumerate(ranks):
        modules = {}
        for path, layer in zip(MODULES, net.layers()):
            d_out, d_in = layer.weight.shape
            modules[path] = LoraModule(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                                       torch.randn(d_out, r, generator=g, dtype=torch.float64), 0.5 + i)
        adapters.append(LoraAdapter(f"e{i}", "net", modules))
    return ExpertPool("net", adapters)


def reference(net, pool, w, x):
    """Each layer: W x + Σ_i w[l, i] s_i B_i A_i x, written out expert by expert."""
    def layer_out(l, path, layer, h):
        y = h @ layer.weight.T
        for i, adapter in enumerate(pool):
            m = adapter.modules[path]
            y = y + w[l, i] * m.scale * ((h @ m.A.T) @ m.B.T)
        return y

    q0, v0, q1 = net.layers()
    h = layer_out(0, MODULES[0], q0, x)
    h = torch.tanh(layer_out(1, MODULES[1], v0, h))
    return layer_out(2, MODULES[2], q1, h)


def folded_forward(net, adapter, x):
    """The net with ``W += scale · B A`` for each module of `adapter` (a plain LoRA, as peft computes it)."""
    q0, v0, q1 = net.layers()

    def lin(path, layer, h):
        m = adapter.modules[path]
        return h @ (layer.weight + m.scale * m.B @ m.A).T

    return lin(MODULES[2], q1, torch.tanh(lin(MODULES[1], v0, lin(MODULES[0], q0, x))))


@pytest.mark.parametrize("softmax", [True, False])
def test_composed_layers_and_saved_lora_equal_the_reference_float64(tmp_path, softmax):
    net = Net()
    pool = net_pool(net)
    theta = torch.randn(len(MODULES), len(pool), generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with cat_attached(SimpleNamespace(model=net), pool, theta, softmax=softmax) as weights:
        w = weights.weights().detach().double()
        with torch.no_grad():
            got = net(x)
        table = weights.table(pool.names)
    expected_w = torch.softmax(theta, -1).double() if softmax else theta.double()
    assert torch.allclose(w, expected_w, atol=1e-7)
    if softmax:  # per module: rows sum to 1 and differ between modules
        assert torch.allclose(w.sum(1), torch.ones(len(MODULES), dtype=torch.float64))
    ref = reference(net, pool, w, x)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(net(x), net(x)) and not torch.allclose(net(x), ref)  # the base net is back

    merged = cat_merge(list(pool), {m: [table[m][n] for n in pool.names] for m in MODULES})
    assert {m: mod.rank for m, mod in merged.modules.items()} == {m: sum(RANKS) for m in MODULES}
    with torch.no_grad():
        assert torch.allclose(folded_forward(net, merged, x), ref, rtol=1e-10, atol=1e-10)
    folder = merged.save(tmp_path / "cat")
    loaded = LoraAdapter.from_peft_folder(folder)
    assert loaded.ranks == {sum(RANKS)}
    with torch.no_grad():
        assert torch.allclose(folded_forward(net, loaded, x), ref, rtol=1e-10, atol=1e-10)


def test_randn_init_is_standard_normal_per_module_and_expert_and_follows_its_expert():
    names = [f"x{i}" for i in range(40)]
    modules = [f"layers.{i}.q" for i in range(50)]
    theta = initial_logits("randn", names, modules, seed=7)
    assert theta.shape == (50, 40)
    assert abs(float(theta.mean())) < 0.05 and abs(float(theta.std()) - 1) < 0.05
    assert len(set(theta.flatten().tolist())) == theta.numel()  # one draw per (module, expert)
    perm_n, perm_m = names[::-1], modules[7:] + modules[:7]
    again = initial_logits("randn", perm_n, perm_m, seed=7)
    for a, name in enumerate(perm_n):
        for b, mod in enumerate(perm_m):
            assert again[b, a] == theta[modules.index(mod), names.index(name)]
    assert not torch.equal(initial_logits("randn", names, modules, seed=8), theta)
    assert torch.equal(initial_logits([1.0, 2.0], ["a", "b"], modules[:3], 0), torch.tensor([[1.0, 2.0]] * 3))
    assert torch.equal(initial_logits({"b": 2.0, "a": 1.0}, ["a", "b"], modules[:1], 0), torch.tensor([[1.0, 2.0]]))


# ----------------------------------------------------------------------------------------- the method on the tiny LM
def fit_examples(n=6):
    return [generate("boolean_expressions", "fit", i) for i in range(n)]


def context(lm, pool, examples=None, seed=0):
    return FitContext(lm, pool, examples if examples is not None else fit_examples(), seed, lambda e: e.input,
                      score=None)


def cat_cfg(**over):
    base = OmegaConf.load("conf/method/cat.yaml")
    return OmegaConf.merge(base, over)


def run(lm, pool, cfg, examples=None, seed=0, check=None):
    gen = Cat(cfg).compose(context(lm, pool, examples, seed))
    composed = next(gen)
    out = check(composed) if check else None
    with pytest.raises(StopIteration):
        next(gen)
    return composed, out


def deltas(adapter):
    return {m: mod.delta(torch.float64) for m, mod in adapter.modules.items()}


def weighted_sum(pool, w_of):
    """Σ_i w_{l,i} s_i B_i A_i per module, from the experts."""
    return {m: sum(w_of(m, i) * a.modules[m].delta(torch.float64) for i, a in enumerate(pool))
            for m in pool.module_names}


def test_initial_weights_give_what_the_initialisation_implies(tiny_lm, make_pool):
    pool = make_pool(3, ranks=[2, 4, 3])
    # official init, no training: w = softmax(θ0) with θ0 the seeded N(0, 1) draws
    composed, _ = run(tiny_lm, pool, cat_cfg(steps=0))
    w0 = torch.softmax(initial_logits("randn", pool.names, pool.module_names, 0), -1)
    table = composed.report.info["weights"]
    assert composed.report.steps == 0 and table == composed.report.info["initial_weights"]
    expected = weighted_sum(pool, lambda m, i: float(w0[pool.module_names.index(m), i]))
    for m, d in deltas(composed.adapter).items():
        assert torch.allclose(d, expected[m], atol=1e-6)
        assert composed.adapter.modules[m].rank == 9
    # softmax with constant logits: the uniform average = linear arithmetic's default
    composed, _ = run(tiny_lm, pool, cat_cfg(steps=0, init=0.0))
    for m, d in deltas(composed.adapter).items():
        assert torch.allclose(d, deltas(concat_merge(list(pool), [1 / 3] * 3))[m], atol=1e-6)
    # no softmax, w = 1: the plain concatenation, the sum of the experts
    composed, _ = run(tiny_lm, pool, cat_cfg(steps=0, init=1.0, softmax=False))
    for m, d in deltas(composed.adapter).items():
        assert torch.allclose(d, weighted_sum(pool, lambda m, i: 1.0)[m], atol=1e-6)


def test_training_decreases_the_fit_loss_and_trains_only_the_weights(tiny_lm, make_pool):
    pool = make_pool(3, ranks=[2, 4, 3])
    experts = {(a.name, m, f): getattr(mod, f).clone() for a in pool for m, mod in a.modules.items() for f in "AB"}
    base = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    examples = fit_examples(6)
    cfg = cat_cfg(lr=0.05, steps=4, batch_size=2, schedule="constant", warmup_ratio=0.0)

    def check(composed):  # the evaluated model (the rank-Σr LoRA folded in) has the trained fit loss
        return float(tiny_lm.loss([e.input for e in examples], [e.train_target for e in examples],
                                  max_len=256))

    composed, folded_loss = run(tiny_lm, pool, cfg, examples, check=check)
    report = composed.report
    assert report.examples == 6 and report.steps == 4 and report.seconds > 0
    assert report.trained_params == len(pool.module_names) * 3
    info = report.info
    assert info["final_fit_loss"] < info["initial_fit_loss"]
    assert math.isclose(folded_loss, info["final_fit_loss"], rel_tol=1e-4)
    assert info["weights"] != info["initial_weights"]
    assert all(math.isclose(sum(row.values()), 1.0, rel_tol=1e-5) for row in info["weights"].values())
    assert set(info["rank"].values()) == {9}
    for (name, m, f), t in experts.items():  # experts frozen
        assert torch.equal(getattr(pool[pool.names.index(name)].modules[m], f), t)
    state = tiny_lm.model.state_dict()  # base model restored, no stacked layer left
    assert state.keys() == base.keys() and all(torch.equal(state[k], v) for k, v in base.items())


def test_pool_order_does_not_matter(tiny_lm, make_pool):
    pool = make_pool(3, ranks=[2, 4, 3], seed=1)
    reordered = ExpertPool(pool.base_model, [pool[2], pool[0], pool[1]])
    cfg = cat_cfg(lr=0.05, steps=3, batch_size=2, schedule="constant", warmup_ratio=0.0)
    a, _ = run(tiny_lm, pool, cfg)
    b, _ = run(tiny_lm, reordered, cfg)
    for m in pool.module_names:
        for n in pool.names:
            assert math.isclose(a.report.info["weights"][m][n], b.report.info["weights"][m][n], abs_tol=1e-5)
    da, db = deltas(a.adapter), deltas(b.adapter)
    assert all(torch.allclose(da[m], db[m], atol=1e-6) for m in da)


@pytest.mark.parametrize("over,key", [
    ({"schedule": "step"}, "method.schedule"), ({"init": "zeros"}, "method.init"), ({"init": []}, "method.init"),
    ({"init": True}, "method.init"), ({"softmax": "yes"}, "method.softmax"), ({"lr": -1.0}, "method.lr"),
    ({"batch_size": 0}, "method.batch_size"), ({"warmup_ratio": 1.5}, "method.warmup_ratio"),
    ({"steps": -2}, "method.steps"), ({"init": ["a", "b"]}, "method.init"),
])
def test_config_errors_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key):
        Cat(cat_cfg(**over))


def test_init_values_must_match_the_pool(tiny_lm, make_pool):
    pool = make_pool(2)
    with pytest.raises(ConfigError, match="method.init"):
        run(tiny_lm, pool, cat_cfg(steps=0, init=[1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="method.init"):
        run(tiny_lm, pool, cat_cfg(steps=0, init={"e0": 1.0, "nobody": 2.0}))


def test_linear_schedule_is_transformers_linear_with_warmup():
    from transformers import get_linear_schedule_with_warmup

    total, ratio = 37, 0.06
    warmup = math.ceil(total * ratio)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        assert math.isclose(opt.param_groups[0]["lr"], lr_factor(step, total, "linear", ratio), abs_tol=1e-12)
        opt.step()
        sched.step()


def test_perf_forwards_agree():
    fns = perf_forwards(d=64, n=3, rank=4, tokens=5, dtype=torch.float64)
    with torch.no_grad():
        out = {k: f() for k, f in fns.items()}
    assert out["base"].shape == (1, 5, 64)
    assert torch.allclose(out["cat_train"], out["cat_lora"], atol=1e-5)  # experts drawn in float32
    assert torch.allclose(out["cat_folded"], out["cat_lora"], atol=1e-5)  # W' built in float32
    assert not torch.allclose(out["base"], out["cat_lora"])
