"""`method=lora_flow`: LoRA-Flow, dynamic per-token fusion weights (Wang et al., ACL 2024; DESIGN §4).

For transformer block l and token t, with x_t the block's *input* hidden state (the residual stream before the
block's first norm, captured by a forward pre-hook on the block module):

    w = softmax(W_l x_t / T) + b_l          W_l (N × d, no bias), b_l (N,) added after the softmax

and every LoRA'd projection of the block outputs ``W x + Σ_i w_i Δh_i(x)``, the N experts computed as one
stacked LoRA (`bench.lora.stacked.StackedLoraLinear`, per-token gates: one broadcast multiply and two GEMMs).
The official code (thunlp/LoRAFlow, `TransformerBlock`: `lora_fusion_gate`, `weight_bias`) does exactly this
for N = 2 on Llama-2; here N is any pool size. As there: W_l starts at zero, T = 1, only W_l and b_l train,
AdamW (weight decay 0.1, betas (0.9, 0.95), eps 1e-5), gradient clipping at 1.0, a cosine schedule with 20 %
linear warm-up, 5 epochs over the fit examples, lr 1e-3 and total batch 4 (the README's best setting for
most tasks). Deviation: the official b_l starts at (−0.5, 0.5) for its (language, task) pair, i.e. all weight
on the second LoRA at step 0; that has no N-expert analogue, so b_l starts at 0 (w = 1/N: the uniform
average) unless `bias_init` gives N values (``bias_init: [-0.5, 0.5]`` reproduces the official start).

Generation with a KV cache needs nothing special: each forward's tokens get their own weights from their own
block input. Seq2seq (T5): cross-attention key/value projections read the encoder's states, whose tokens are
not the block's; their weights come from the same block gate applied to their own input tokens (the encoder
states, also d wide).

Note on "zero gate weights and zero bias": W_l = 0, b_l = 0 gives w = 1/N for every token, i.e. the uniform
linear merge of the experts, not the base model (the softmax sums to 1). The base model is w ≡ 0, which a
trained gate reaches only through b_l = −softmax(·); `LoraFlowRouter.override` forces it for tests.

Saved gates (`GatedComposed.save`): `gates.safetensors` + `gates.json`; `attach_saved_gates` restores them.
Recorded: `info.gate_stats` = {block: [mean w_i over the fit examples' tokens, prompt and target]} and
`info.bias` = {block: b_l}.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, block_of
from bench.registry import register_method
from methods.base import FitContext, FitReport, Method, Timer
from methods.ops.gates import (GatedComposed, TrainConfig, check_saved_gates, count_params, info_common, load_gates,
                           reads_encoder, router_attached, train_gates)
from tasks.base import Example


class FlowGate(nn.Module):
    """w = softmax(W x / T) + b for one block."""

    def __init__(self, n_experts: int, d: int, temperature: float = 1.0, bias_init: Sequence[float] | None = None):
        super().__init__()
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.zeros(n_experts, d))  # zero init, as the official gate
        bias = torch.zeros(n_experts) if bias_init is None else torch.tensor([float(b) for b in bias_init])
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> w (..., N), float32."""
        return torch.softmax(F.linear(x.float(), self.weight) / self.temperature, dim=-1) + self.bias


def _key(block: str) -> str:
    return block.replace(".", ":") or "model"


class LoraFlowRouter:
    """One `FlowGate` per block; a pre-hook on each block computes its per-token weights from the block input."""

    def __init__(self, model: nn.Module, layers: dict[str, StackedLoraLinear], temperature: float = 1.0,
                 bias_init: Sequence[float] | None = None) -> None:
        first = next(iter(layers.values()))
        self.n_experts = first.n_experts
        if bias_init is not None and len(bias_init) != self.n_experts:
            raise ConfigError(f"method.bias_init has {len(bias_init)} values for {self.n_experts} experts")
        d = _hidden_size(model)
        self.layers = layers
        self.blocks: dict[str, str] = {}  # gate key -> block path
        self.route: dict[str, tuple[str, bool]] = {}  # matrix path -> (gate key, reads the encoder)
        gates = {}
        for path in layers:
            block = block_of(path)
            key = _key(block)
            if key not in gates:
                gates[key] = FlowGate(self.n_experts, d, temperature, bias_init)
                self.blocks[key] = block
            self.route[path] = (key, reads_encoder(path))
        self.gates = nn.ModuleDict(gates).to(first.A_cat.device)
        self.current: dict[str, torch.Tensor] = {}  # gate key -> (batch, seq, N) weights of the current forward
        self.record = False
        self.records: list[tuple[str, torch.Tensor]] = []
        self.override: Callable[[torch.Tensor], torch.Tensor] | None = None  # transforms every w (tests)
        self.handles = []
        for key, block in self.blocks.items():
            module = model.get_submodule(block) if block else model
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._pre, key), with_kwargs=True))
        for path, layer in layers.items():
            layer.gate_fn = functools.partial(self._gates, path)

    def weights(self, key: str, x: torch.Tensor) -> torch.Tensor:
        w = self.gates[key](x)
        if self.override is not None:
            w = self.override(w)
        if self.record:
            self.records.append((key, w.detach()))
        return w

    def _pre(self, key: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.current[key] = self.weights(key, hidden)

    def _gates(self, path: str, layer: StackedLoraLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        key, cross = self.route[path]
        if cross:
            w = self.weights(key, x)  # encoder tokens: the block's gate on their own states
        else:
            w = self.current.get(key)
            if w is None or w.shape[:-1] != h.shape[:-1]:
                got = None if w is None else tuple(w.shape[:-1])
                raise RuntimeError(f"LoRA-Flow: {path} has tokens {tuple(h.shape[:-1])} but its block's gate "
                                   f"computed weights for {got} (block input not captured?)")
        return w

    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def stats(self) -> dict[str, list[float]]:
        by_key: dict[str, list[torch.Tensor]] = {}
        for key, w in self.records:
            by_key.setdefault(key, []).append(w.reshape(-1, self.n_experts).float())
        return {self.blocks[k]: torch.cat(v).mean(0).tolist() for k, v in by_key.items()}

    def config(self) -> dict:
        first = next(iter(self.gates.values()))
        return {"temperature": first.temperature, "blocks": list(self.blocks.values()), "d": first.weight.shape[1]}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for layer in self.layers.values():
            layer.gate_fn = None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if d is None:
        raise ConfigError("LoRA-Flow needs the model's hidden size (config.hidden_size or config.d_model)")
    return int(d)


@contextlib.contextmanager
def lora_flow_attached(lm, pool: ExpertPool, temperature: float = 1.0,
                       bias_init: Sequence[float] | None = None) -> Iterator[LoraFlowRouter]:
    """`lm`'s model with the pool's experts stacked and LoRA-Flow gates attached, for the span of the block."""
    with router_attached(lm, pool, lambda model, layers: LoraFlowRouter(model, layers, temperature, bias_init)) as router:
        yield router


@contextlib.contextmanager
def attach_saved_gates(lm, pool: ExpertPool, folder) -> Iterator[LoraFlowRouter]:
    """A fresh stacked model with the LoRA-Flow gates saved in `folder`."""
    state, config = load_gates(folder)
    check_saved_gates(config, "lora_flow", pool.names, pool.module_names)
    with lora_flow_attached(lm, pool, float(config["temperature"])) as router:
        router.gates.load_state_dict(state)
        yield router


@register_method("lora_flow")
class LoraFlow(Method):
    domains = ("nlp",)

    def check_config(self) -> None:
        if not float(self.cfg.get("temperature", 1.0)) > 0:
            raise ConfigError(f"method.temperature={self.cfg.get('temperature')}: must be > 0")
        bias_init = self.cfg.get("bias_init")
        if bias_init is not None and (isinstance(bias_init, (str, float, int)) or not len(bias_init)):
            raise ConfigError(f"method.bias_init={bias_init}: null (zeros) or a list of one value per expert")
        self.train_config = TrainConfig.from_cfg(self.cfg)

    def compose(self, ctx: FitContext) -> Iterator[GatedComposed]:
        cfg, tc = self.cfg, self.train_config
        lm, examples = ctx.model, list(ctx.fit_examples)
        bias_init = cfg.get("bias_init")
        torch.manual_seed(ctx.seed)
        with lora_flow_attached(lm, ctx.pool, float(cfg.get("temperature", 1.0)),
                                None if bias_init is None else list(bias_init)) as router:
            fit_loss = functools.partial(evaluate, lm, router, examples, ctx.prompt, tc)
            with Timer() as timer:
                initial, _ = fit_loss()

                def objective(batch: list[Example]) -> torch.Tensor:
                    return lm.loss([ctx.prompt(e) for e in batch], [e.train_target for e in batch],
                                   max_len=tc.max_len)  # token-budget forwards, the same gradient

                result = train_gates(router.parameters(), examples, objective, tc, ctx.seed,
                                     desc=f"fit lora_flow {ctx.unit}")
                final, stats = fit_loss()
            info = {**info_common(tc, initial, final, result.history), "train_seconds": result.seconds,
                    "epochs": tc.epochs, "steps_config": tc.steps,
                    "gate_stats": stats, "bias": {router.blocks[k]: g.bias.detach().tolist()
                                                  for k, g in router.gates.items()}}
            report = FitReport(examples=len(examples), steps=result.steps, seconds=timer.seconds,
                               trained_params=count_params(router.gates), info=info)
            config = {"method": "lora_flow", "experts": ctx.pool.names, "base_model": ctx.pool.base_model,
                      "modules": ctx.pool.module_names, **router.config()}
            yield GatedComposed(lm, report, "", gates=router.gates, gate_config=config)


@torch.no_grad()
def evaluate(lm, router: LoraFlowRouter, examples: Sequence[Example], prompt: Callable[[Example], str],
             tc: TrainConfig) -> tuple[float | None, dict[str, list[float]]]:
    """(mean fit loss, mean weights per block over every token) on `examples`, one example per forward so that
    no padding token enters the statistics (the loss, a mean of per-example means, does not depend on it);
    (None, {}) without examples."""
    if not examples:
        return None, {}
    router.records.clear()
    router.record = True
    try:
        loss = lm.loss([prompt(e) for e in examples], [e.train_target for e in examples],
                       batch_size=1, max_len=tc.max_len)
    finally:
        router.record = False
    stats = router.stats()
    router.records.clear()
    return float(loss), stats
