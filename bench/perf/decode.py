"""Decode paths of the generation engine by batch size: where CUDA graphs and grouped decode attention pay.

``python -m bench.perf decode [--device cuda] [--quick] [--rows 8,32,...] [--prompt-tokens 134] [--new 16]``

One batch of ``rows`` prompts of ``prompt-tokens`` random tokens (left-padded: a quarter of the rows shorter by
up to half), ``new`` greedy tokens, no stop tokens (every row runs every step), SmolLM2-135M's shape with random
weights (bf16 on a GPU, fp32 on CPU; ``--quick``: a 2-layer tiny Llama), SDPA backends as the engine picks them
(`bench.models.generation.attention_backends`). Paths, each timed after a warm-up:

- ``dynamic, repeat_kv``: `decode_causal` over a `DynamicCache` with transformers' SDPA attention (keys and values
  copied per query head);
- ``dynamic, grouped``: the same under `bench.models.decode_attention.grouped_decoding`;
- ``static, grouped``: `decode_static` without graphs (transformers' `StaticCache`);
- ``static, grouped, CUDA graph``: `decode_static` with the decode step replayed from a CUDA graph (CUDA only).

Rows: ``{rows, path, seconds, tokens_per_s, x_dynamic}`` (x_dynamic: against ``dynamic, repeat_kv`` at the same
batch size) and ``same_tokens`` (the path's tokens equal the first path's). Writes ``results/perf/decode-<dev>``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.models.decode_attention import grouped_decoding
from bench.models.generation import attention_backends, decode_causal, decode_static
from bench.perf.common import pick_device, write_results
from bench.perf.eval import SMOLLM2_SHAPE, TINY_SHAPE, timed


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf decode", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="CPU-sized: tiny model, rows 2,8, 32-token prompts")
    p.add_argument("--rows", default=None, help="batch sizes (default 8,32,128,512,2048; quick: 2,8)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="longest prompt (default 134; quick 32)")
    p.add_argument("--new", type=int, default=16, help="new tokens per row")
    return p.parse_args(argv)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(shape)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=49152, pad_token_id=0, **arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype).eval()


def prompt_rows(n: int, longest: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [longest - (int(torch.randint(0, longest // 2, (1,), generator=g)) if i % 4 == 3 else 0)
               for i in range(n)]
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    model = random_model(TINY_SHAPE if args.quick else SMOLLM2_SHAPE, device, dtype)
    sizes = [int(r) for r in (args.rows or ("2,8" if args.quick else "8,32,128,512,2048")).split(",")]
    longest = args.prompt_tokens or (32 if args.quick else 134)
    paths = {
        "dynamic, repeat_kv": (contextlib.nullcontext, lambda rows: decode_causal(model, rows, args.new, [], 0)),
        "dynamic, grouped": (lambda: grouped_decoding(model), lambda rows: decode_causal(model, rows, args.new, [], 0)),
        "static, grouped": (lambda: grouped_decoding(model),
                            lambda rows: decode_static(model, rows, args.new, [], 0, graphs=False)),
    }
    if gpu:
        paths["static, grouped, CUDA graph"] = (lambda: grouped_decoding(model),
                                                lambda rows: decode_static(model, rows, args.new, [], 0, graphs=True))
    results = []
    for n in sizes:
        rows = prompt_rows(n, longest, model.config.vocab_size)
        first, base_s = None, None
        for path, (context, run) in paths.items():
            with context(), attention_backends(device):  # as the engine runs (no cuDNN attention on CUDA)
                run(rows[: min(n, 8)])  # warm-up (kernels, allocator)
                tokens, seconds = timed(lambda: run(rows), device)
            first = first or tokens
            base_s = base_s or seconds
            results.append({"rows": n, "path": path, "seconds": seconds, "tokens_per_s": n * args.new / seconds,
                            "x_dynamic": base_s / seconds, "same_tokens": tokens == first})
            print(f"rows {n:5d}  {path:28s} {seconds:8.3f} s  x{base_s / seconds:5.2f}  same {tokens == first}",
                  flush=True)
    write_results("decode", results, {"model": "tiny Llama (quick)" if args.quick else "SmolLM2-135M shape, random",
                                      "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": longest,
                                      "new_tokens": args.new}, device)


if __name__ == "__main__":
    main()
