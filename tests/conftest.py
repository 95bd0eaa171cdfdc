"""Shared fixtures: tiny models built from the project's configs, and random LoRA pools for them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CACHE = Path(os.environ.get("BENCH_CACHE_DIR", ROOT / ".cache"))
DATA_ROOT = ROOT.parent / "shared" / "data"
# The tiny test models run fastest on one thread (and do not thrash a shared 2-core runner).
torch.set_num_threads(1)
# Without a GPU, Triton kernels are built for Triton's CPU interpreter (chosen before Triton is first
# imported); they run on CPU tensors only where a test asks (tests/test_triton_merge.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def model_cfg(name: str):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


@pytest.fixture(scope="session")
def tiny_lm():
    """The smoke profile's tiny Llama (SmolLM2 tokenizer), on CPU."""
    from bench.models.loading import load_language_model

    return load_language_model(model_cfg("tiny_llama"), CACHE, device="cpu")


@pytest.fixture(scope="session")
def tiny_t5():
    from bench.models.loading import load_language_model

    return load_language_model(model_cfg("tiny_t5"), CACHE, device="cpu")


def encode_prompts(lm, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `prompts` as one batch, left-padded for causal LMs (right for seq2seq): what
    the tests' reference decoding loops start from."""
    from bench.models.generation import _padded

    side = "right" if lm.is_seq2seq else "left"
    return _padded([lm.prompt_ids(p) for p in prompts], lm.tokenizer.pad_token_id, side, lm.device)


def random_adapter(model: torch.nn.Module, name: str, base: str, targets=("q_proj", "v_proj"), rank: int = 4,
                   alpha: float = 8.0, seed: int = 0, dtype=torch.float32) -> LoraAdapter:
    """A LoRA with random (non-zero) A and B for every `targets` linear layer of `model`."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            d_out, d_in = layer.weight.shape
            A = torch.randn(rank, d_in, generator=g, dtype=dtype) / d_in**0.5
            B = torch.randn(d_out, rank, generator=g, dtype=dtype) / rank**0.5
            modules[path] = LoraModule(A, B, alpha / rank)
    return LoraAdapter(name, base, modules)


@pytest.fixture
def make_pool(tiny_lm):
    """make_pool(n, rank=4, seed=0, ranks=None) -> ExpertPool of random adapters for the tiny Llama."""

    def make(n: int, rank: int = 4, seed: int = 0, ranks=None) -> ExpertPool:
        ranks = ranks or [rank] * n
        adapters = [random_adapter(tiny_lm.model, f"e{i}", tiny_lm.model_id, rank=r, seed=seed * 1000 + i)
                    for i, r in enumerate(ranks)]
        return ExpertPool(tiny_lm.model_id, adapters)

    return make


def peft_holding(model: torch.nn.Module, adapters: list[LoraAdapter], b_weights: list[float] | None = None):
    """A peft model over `model` holding every adapter under its own name (each lora_B times its weight in
    `b_weights`, when given): the reference the merge tests compare against."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    peft_model = None
    for i, adapter in enumerate(adapters):
        kwargs = adapter.peft_config()
        kwargs.pop("base_model_name_or_path")
        config = LoraConfig(**kwargs)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter.name)
        else:
            peft_model.add_adapter(adapter.name, config)
        state = adapter.peft_state_dict()
        if b_weights is not None:
            state = {k: (v * b_weights[i] if "lora_B" in k else v) for k, v in state.items()}
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter.name)
        assert not [k for k in result.unexpected_keys if "lora_" in k]
    return peft_model


class RecordingModel:
    """A stand-in for a model (LM or UNet pipeline) with only the two context managers a static merge needs; it
    records what it was given: ``("adapter", adapter)`` or ``("deltas", {module: ΔW})``."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.applied: list = []

    @contextlib.contextmanager
    def adapter_applied(self, adapter):
        self.applied.append(("adapter", adapter))
        yield self

    @contextlib.contextmanager
    def deltas_folded(self, deltas):
        self.applied.append(("deltas", deltas))
        yield self


def shuffle_ranks(a: LoraAdapter, seed: int) -> LoraAdapter:
    """The same LoRA with its ranks permuted (A's rows and B's columns together): every ΔW unchanged."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for module, m in a.modules.items():
        perm = torch.randperm(m.rank, generator=g)
        modules[module] = LoraModule(m.A[perm], m.B[:, perm], m.scale)
    return LoraAdapter(a.name, a.base_model, modules, task_type=a.task_type)


def assert_composes_then_restores(lm, pool: ExpertPool, method, folded: bool = True) -> None:
    """Each variant `method` composes from `pool` generates on `lm` with its composition in place (folded into the
    base weights when `folded`), and the base weights are exactly back once the composition is left."""
    from methods.base import FitContext

    weight = lambda: lm.model.get_submodule(pool.module_names[0]).weight  # noqa: E731 - looked up anew each time
    before = weight().detach().clone()
    ctx = FitContext(model=lm, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input, score=lambda c, e: 0.0)
    for composed in method.compose(ctx):
        assert composed.generate(["1 + 1 ="], max_new_tokens=2)[0] is not None
        if folded:
            assert not torch.equal(weight(), before)
    assert torch.equal(weight(), before)
