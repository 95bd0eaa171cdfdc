"""Shared machinery of the gated methods (MoLE, LoRA-Flow): the gate-training loop, the saved-gates format
and the `GatedComposed` that a task evaluates.

Training loop (`train_gates`): AdamW over the gate parameters only, on the fit examples in seeded shuffled
batches. Its length is either `steps` (MoLE: 800 in the paper; epochs repeat as needed) or `epochs` over the
fit examples (LoRA-Flow: 5). Learning-rate schedule `constant` or `cosine` (linear warm-up over
`warmup_ratio` of the steps, then cosine to 0: BMTrain's `Cosine`, which LoRA-Flow's official training uses),
optional gradient-norm clipping. Every random draw comes from the run's seed.

Saved gates (`GatedComposed.save`): `gates.safetensors` (the gate module's state dict, float32) and
`gates.json` (method, hyperparameters, expert names in pool order, base model id, the gated module paths and
the gate shapes), enough to rebuild the gates on a fresh stacked model (`load_gates`, then the method's
`attach_gates`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from tqdm.auto import tqdm
from torch import nn

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, stacked_experts
from methods.base import Composed
from tasks.base import Example

GATES_FILE = "gates.safetensors"
GATES_CONFIG = "gates.json"


# ----------------------------------------------------------------------------------------- composed + I/O
@dataclass
class GatedComposed(Composed):
    """The base model with stacked experts and trained gates in place; `save` writes the gates."""

    gates: nn.Module | None = None
    gate_config: dict = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path | None:
        if self.gates is None:
            return None
        return save_gates(self.gates, {**self.gate_config, "variant": self.variant}, folder)


Router = TypeVar("Router")


@contextlib.contextmanager
def router_attached(lm, pool: ExpertPool,
                    build: Callable[[nn.Module, dict[str, StackedLoraLinear]], Router]) -> Iterator[Router]:
    """`lm`'s model with the pool's experts stacked and the router `build(model, layers)` attached for the span
    of the block; the router's `remove()` and the original layers are restored afterwards."""
    with stacked_experts(lm.model, pool) as layers:
        router = build(lm.model, layers)
        try:
            yield router
        finally:
            router.remove()


def save_gates(gates: nn.Module, config: dict, folder: str | Path) -> Path:
    """`gates.safetensors` + `gates.json` in `folder` (created); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in gates.state_dict().items()}
    save_file(state, str(folder / GATES_FILE))
    tmp = folder / (GATES_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    tmp.replace(folder / GATES_CONFIG)
    return folder


def load_gates(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config) written by `save_gates`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (GATES_FILE, GATES_CONFIG) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"{folder} is not a saved-gates folder: {missing} missing")
    return load_file(str(folder / GATES_FILE)), json.loads((folder / GATES_CONFIG).read_text())


def check_saved_gates(config: dict, method: str, pool_names: Sequence[str], module_names: Sequence[str]) -> None:
    """The saved gates were trained by `method` on these experts (same order) and these modules."""
    if config.get("method") != method:
        raise ConfigError(f"saved gates are for method {config.get('method')!r}, not {method!r}")
    if list(config.get("experts", [])) != list(pool_names):
        raise ConfigError(f"saved gates were trained on experts {config.get('experts')}, this pool is {list(pool_names)}")
    if list(config.get("modules", [])) != list(module_names):
        raise ConfigError("saved gates were trained on other target modules than this pool's")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- training
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    lr: float
    batch_size: int
    steps: int | None = None  # exactly this many optimizer steps, or None to use `epochs`
    epochs: int = 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    schedule: str = "constant"  # constant | cosine | linear (transformers' linear schedule with warm-up)
    warmup_ratio: float = 0.0
    max_len: int = 512

    @classmethod
    def from_cfg(cls, cfg) -> "TrainConfig":
        get = cfg.get
        steps = get("steps")
        tc = cls(
            lr=float(get("lr")), batch_size=int(get("batch_size")), steps=None if steps is None else int(steps),
            epochs=int(get("epochs", 1) or 1), weight_decay=float(get("weight_decay", 0.01)),
            betas=tuple(float(b) for b in get("betas", (0.9, 0.999))), eps=float(get("eps", 1e-8)),
            clip_grad=None if get("clip_grad") is None else float(get("clip_grad")),
            schedule=str(get("schedule", "constant")), warmup_ratio=float(get("warmup_ratio", 0.0)),
            max_len=int(get("max_len", 512)),
        )
        tc.check()
        return tc

    def check(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"method.lr={self.lr}: must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"method.batch_size={self.batch_size}: must be ≥ 1")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"method.steps={self.steps}: must be ≥ 0 (or null to train for `epochs`)")
        if self.steps is None and self.epochs < 0:
            raise ConfigError(f"method.epochs={self.epochs}: must be ≥ 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"method.schedule={self.schedule!r}; choose one of {list(SCHEDULES)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"method.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if len(self.betas) != 2:
            raise ConfigError(f"method.betas={self.betas}: two values")

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(n_examples / self.batch_size)


def batches(examples: Sequence[Example], batch_size: int, n_steps: int, seed: int) -> list[list[Example]]:
    """`n_steps` batches: seeded permutations of the examples, cut in batches of `batch_size` (the last of an
    epoch may be smaller), epochs repeated until `n_steps` batches are drawn."""
    out: list[list[Example]] = []
    g = torch.Generator().manual_seed(int(seed))
    while len(out) < n_steps and examples:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            out.append([examples[j] for j in order[i : i + batch_size]])
            if len(out) == n_steps:
                break
    return out


def lr_factor(step: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """Multiplier of the base learning rate at 0-based `step`. ``linear`` is transformers'
    ``get_linear_schedule_with_warmup`` with ``ceil(ratio · total)`` warm-up steps (``step / warmup``, then a linear
    decay to 0 at `total`); ``constant`` and ``cosine`` warm up over ``int(ratio · total)`` steps from 1/(w + 1)."""
    if schedule == "linear":
        warm = math.ceil(total * warmup_ratio)
        return step / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))
    if schedule == "constant" and warmup_ratio == 0:
        return 1.0
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[float]  # the training objective at each step


def train_gates(params: list[nn.Parameter], examples: Sequence[Example],
                objective: Callable[[list[Example]], torch.Tensor], tc: TrainConfig, seed: int,
                after_step: Callable[[], None] | None = None, desc: str = "fit") -> TrainResult:
    """Minimize `objective(batch)` over `params` with AdamW (see the module docstring); a progress bar named
    `desc` shows the steps and the loss."""
    params = [p for p in params if p.requires_grad]
    n_steps = tc.total_steps(len(examples))
    plan = batches(list(examples), tc.batch_size, n_steps, seed)
    history: list[float] = []
    start = time.perf_counter()
    if params and plan:
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, eps=tc.eps, weight_decay=tc.weight_decay)
        bar = tqdm(plan, desc=desc, leave=False, unit="step")
        for step, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = tc.lr * lr_factor(step, len(plan), tc.schedule, tc.warmup_ratio)
            opt.zero_grad(set_to_none=True)
            loss = objective(batch)
            loss.backward()
            if tc.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
            opt.step()
            if after_step is not None:
                after_step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
    return TrainResult(steps=len(history), seconds=time.perf_counter() - start, history=history)


def info_common(tc: TrainConfig, initial: float | None, final: float | None, history: list[float]) -> dict[str, Any]:
    """The part of `FitReport.info` that every gated method reports."""
    return {
        "initial_fit_loss": initial, "final_fit_loss": final, "lr": tc.lr, "batch_size": tc.batch_size,
        "train_seconds": None,  # set by the method: optimizer steps only (FitReport.seconds: the whole fit)
        "schedule": tc.schedule, "objective_first": history[0] if history else None,
        "objective_last": history[-1] if history else None,
    }


# ----------------------------------------------------------------------------------------- model structure
# Key/value projections of cross-attention read the encoder's states, not their block's tokens (T5, BART, …).
CROSS_ATTENTION_KV = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")


def reads_encoder(path: str) -> bool:
    """Whether the module at `path` is a cross-attention key/value projection (its tokens are the encoder's)."""
    return any(path.endswith(suffix) for suffix in CROSS_ATTENTION_KV)


def stack_of(path: str) -> str:
    """The module that runs a module's block as one of a list of blocks (``model.layers.3.mlp.up_proj`` ->
    ``model``; ``decoder.block.0.layer.0.SelfAttention.q`` -> ``decoder``); "" (the whole model) when the
    path has no block number or its block list sits at the top."""
    from bench.lora.stacked import block_of

    block = block_of(path)
    if block == path and not path.split(".")[-1].isdigit():
        return ""
    return ".".join(block.split(".")[:-2])
