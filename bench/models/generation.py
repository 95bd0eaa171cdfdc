"""The one generation engine of every NLP method: greedy decoding over length-sorted, token-budget batches.

`generate(lm, prompts, max_new_tokens, hooks=...)` is what `LanguageModel.generate` and every composed model's
`generate` call. What it does:

- **Batches.** Prompts are tokenized once (chat template, left-truncated to ``lm.max_input_tokens``), sorted by
  length, longest first, and cut into batches whose padded size ``model rows × (longest prompt +
  max_new_tokens)`` stays within a token budget (and, if given, ``max_rows`` examples); a method that runs
  ``fanout`` model rows per example gets ``fanout`` times fewer examples per batch. Generations come back in
  input order.
- **Per-row composition state** lives in a `RowHooks` object that the engine drives: ``start`` is told which
  input rows (by input index and prompt) form the batch, ``select`` which of them are still running after a
  compaction, ``before_step(t)`` runs before the forward that produces generated token t (t = 0: the prompt's
  forward), and ``scores`` turns the model rows' last logits into one row of scores per example. A method whose
  composition varies per row (MoA routes, retriever picks, MoLE's per-sequence gates) keeps that state in its
  hooks and re-indexes it in ``select``; a method that runs several model rows per example (Composite: one per
  expert, ``fanout = N``) gets them in expert-major order (copy i of example j at row ``i·b + j``).
- **Finished rows stop costing compute** (causal LMs): decoding is our greedy loop over transformers' KV cache
  (`DynamicCache`); when rows emit a stop token, the batch is compacted (cache, attention mask, positions and the
  hooks' state index-selected), and it ends when every row is done or the budget is spent. Seq2seq models go
  through ``model.generate`` on the same batches, with the hooks as a logits processor (no compaction there).
- **Grouped-query decode attention.** Decode steps of SDPA models attend through
  `bench.models.decode_attention` (the query heads of a KV head as rows of one attention) instead of copying every
  key/value head per query head; prompt forwards are transformers' own SDPA.
- **CUDA graphs.** On CUDA, a batch of a method without per-row state (base, folded merges, peft wrappers,
  LoRA-Flow's in-module gates) decodes over transformers' `StaticCache` with the decode step captured once as a
  CUDA graph and replayed (`decode_static`): the host no longer launches every kernel of every step, which is
  where eager decoding of a small model spends its time. The graph is re-captured when half of the rows have
  finished (the batch is compacted then, not at every stop). Methods with per-row hooks, seq2seq models,
  attention other than SDPA/eager, and a capture that fails decode eagerly, the reason logged once per call.
- **The previous path** (`legacy_batch`: fixed batches in input order through ``model.generate``) stays
  available as the reference of the tests and the baseline of ``python -m bench.perf eval``.
- **Memory.** The budget (`bench.models.batching`) defaults to ``DEFAULT_TOKEN_BUDGET`` tokens on CPU and, on CUDA, to what a quarter of
  the free memory holds at the model's KV-cache bytes per token; a batch that runs out of memory is split in
  two and retried (logged), down to one row.

Greedy decoding over another batch composition is the same computation up to floating-point rounding (padding
is masked, positions follow the mask), so predictions equal the per-8 batches of the old path except where the
top two logits are within rounding of each other (`tests/test_generation.py` finds and reports such near-ties).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from bench.models.batching import Batch, default_token_budget, pad_rows, plan_batches
from bench.models.decode_attention import grouped_decoding
from bench.progress import BARS_OFF

log = logging.getLogger(__name__)

class RowHooks:
    """Per-batch composition state driven by the engine; the default composes nothing (the model as it is)."""

    fanout: int = 1  # model rows per example

    def start(self, index: list[int], prompts: list[str]) -> None:
        """A batch of these input rows (their indices in the `generate` call and their prompts) begins."""

    def select(self, keep: torch.Tensor) -> None:
        """Only the examples at these positions of the current batch go on (a 1-D index tensor)."""

    def before_step(self, t: int) -> None:
        """The next forward produces generated token t (t = 0: the prompt's forward)."""

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Last-position logits of the model rows ``(fanout·b, V)`` -> one score row per example ``(b, V)``."""
        return logits

    def end(self) -> None:
        """The batch is done (reset what `start` set)."""


NO_HOOKS = RowHooks()


def _padded(rows: list[list[int]], pad: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `rows` padded on `side` (`bench.models.batching.pad_rows`), on `device`."""
    return pad_rows(rows, pad, side).to(device), pad_rows([[1] * len(r) for r in rows], 0, side).to(device)


def _expand(keep: torch.Tensor, b: int, fanout: int) -> torch.Tensor:
    """Example positions -> model-row positions for `fanout` expert-major copies of a batch of b."""
    return torch.cat([keep + i * b for i in range(fanout)]) if fanout > 1 else keep


def top2_gap(scores: torch.Tensor) -> list[float]:
    """Per row, the gap between the two highest scores (how close greedy decoding was to another token)."""
    top = scores.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


@torch.no_grad()
def decode_causal(model: torch.nn.Module, rows: list[list[int]], max_new_tokens: int, stops: Sequence[int],
                  pad: int, hooks: RowHooks = NO_HOOKS,
                  gaps: list[list[float]] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, through the first stop token) of left-padded `rows`, finished rows
    removed from the batch as they finish; `gaps`, when given, receives each row's `top2_gap` per step."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b, fanout = len(rows), hooks.fanout
    ids, mask = _padded(rows, pad, "left", device)
    if fanout > 1:
        ids, mask = ids.repeat(fanout, 1), mask.repeat(fanout, 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stop_ids = torch.tensor(sorted(set(stops)), device=device)
    alive = torch.arange(b, device=device)  # batch positions of the running examples
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    cache = DynamicCache()
    hooks.before_step(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    for t in range(max_new_tokens):
        scores = hooks.scores(logits)
        nxt = scores.argmax(-1)
        for j, token in zip(alive.tolist(), nxt.tolist()):
            out_tokens[j].append(token)
        if gaps is not None:
            for j, gap in zip(alive.tolist(), top2_gap(scores)):
                gaps[j].append(gap)
        done = torch.isin(nxt, stop_ids)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            rows_kept = _expand(keep, len(alive), fanout)
            cache.batch_select_indices(rows_kept)
            mask, positions = mask[rows_kept], positions[rows_kept]
            alive, nxt = alive[keep], nxt[keep]
            hooks.select(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions[:, -1:] + 1
        hooks.before_step(t + 1)
        step_ids = nxt.repeat(fanout).unsqueeze(1)
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return out_tokens


class _HookProcessor:
    """The hooks as a transformers logits processor (for ``model.generate``): per-example scores, repeated to
    every copy so all copies pick the same token; then the next step's `before_step`. Records `top2_gap` per
    step in `gaps` when given."""

    def __init__(self, hooks: RowHooks, gaps: list[list[float]] | None = None) -> None:
        self.hooks, self.gaps, self.t = hooks, gaps, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        per_example = self.hooks.scores(scores)
        if self.gaps is not None:
            for j, gap in enumerate(top2_gap(per_example)):
                self.gaps[j].append(gap)
        self.t += 1
        self.hooks.before_step(self.t)
        return per_example.repeat(self.hooks.fanout, 1).to(scores.dtype)


@torch.no_grad()
def decode_generate(model: torch.nn.Module, rows: list[list[int]], max_new_tokens: int, stops: Sequence[int],
                    pad: int, hooks: RowHooks = NO_HOOKS, gaps: list[list[float]] | None = None,
                    seq2seq: bool = False) -> list[list[int]]:
    """Greedy continuations through transformers' ``model.generate`` (left padding for causal LMs, right padding
    for seq2seq encoders; the decoder start token dropped), the hooks as a logits processor. Finished rows run
    on (padded) until the batch is done."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = _padded(rows, pad, "right" if seq2seq else "left", device)
    if hooks.fanout > 1:
        ids, mask = ids.repeat(hooks.fanout, 1), mask.repeat(hooks.fanout, 1)
    hooks.before_step(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad, eos_token_id=list(stops), temperature=None, top_p=None,
                         top_k=None, logits_processor=LogitsProcessorList([_HookProcessor(hooks, gaps)]))
    new = out[: len(rows), 1:] if seq2seq else out[: len(rows), ids.shape[1]:]
    return new.tolist()


def attention_backends(device: torch.device):
    """On CUDA, scaled-dot-product attention without the cuDNN backend: cuDNN builds a new plan for every new
    key length, i.e. at every decoding step, which made the host the bottleneck (H200 profile of 2,048 BBH
    prompts: 3.2 of 8.0 s in ``_cudnn_attention_forward`` on the CPU, 0.3 s on the GPU). Elsewhere: no change."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _DecodeStep:
    """The one-token decode forward of a batch over a `StaticCache`: inputs in fixed buffers (token, position,
    an additive 4-D mask over the cache's columns), replayed from a CUDA graph when `graphs` (captured at the first call,
    whose eager run on a side stream is that step's real computation), eager otherwise."""

    def __init__(self, model: torch.nn.Module, cache, mask: torch.Tensor, last_position: torch.Tensor,
                 length: int, graphs: bool) -> None:
        b, width = mask.shape
        self.model, self.cache, self.graphs = model, cache, graphs
        self.blocked = torch.finfo(model.dtype).min
        self.mask = torch.full((b, 1, 1, length), self.blocked, dtype=model.dtype, device=mask.device)
        self.mask[:, 0, 0, :width].masked_fill_(mask.bool(), 0.0)  # additive: one mask for every layer
        self.column = width  # the cache column the next token is written to
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=mask.device)
        self.position = last_position.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position,
                          past_key_values=self.cache, use_cache=True).logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits after feeding `tokens` (one per row) at the next cache column."""
        self.ids.copy_(tokens.view(-1, 1))
        self.position.add_(1)
        self.mask[:, :, :, self.column] = 0.0
        self.column += 1
        if not self.graphs:
            return self._forward()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward()  # this step, run (kernels chosen, workspaces allocated)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: replays advance the cache's own length counter
            self.out = self._forward()
        self.graph = graph
        return logits

    def select(self, keep: torch.Tensor) -> None:
        """Only the rows at `keep` go on: cache, buffers index-selected; the graph re-captured at the next call."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            layer.batch_size = len(keep)
        self.mask, self.ids, self.position = self.mask[keep], self.ids[keep], self.position[keep]
        self.graph = self.out = None


@torch.no_grad()
def decode_static(model: torch.nn.Module, rows: list[list[int]], max_new_tokens: int, stops: Sequence[int],
                  pad: int, gaps: list[list[float]] | None = None, graphs: bool = True) -> list[list[int]]:
    """Greedy continuations like `decode_causal` (no hooks), over transformers' `StaticCache`, the decode step a
    replayed CUDA graph when `graphs`. Finished rows stay in the batch until half of them have finished; then
    the batch is compacted (and the graph re-captured)."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    b = len(rows)
    ids, mask = _padded(rows, pad, "left", device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = -(-(ids.shape[1] + max_new_tokens) // 16) * 16  # SDPA's fused kernels want masks in 16s
    cache = StaticCache(config=model.config, max_cache_len=length)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    step = _DecodeStep(model, cache, mask, positions[:, -1:], length, graphs)
    stop_ids = torch.tensor(sorted(set(stops)), device=device)
    alive = torch.arange(b, device=device)  # batch positions of the rows still in the batch
    running = torch.ones(b, dtype=torch.bool, device=device)  # of those, the ones not finished
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    for t in range(max_new_tokens):
        nxt = logits.argmax(-1)
        for j, token, live in zip(alive.tolist(), nxt.tolist(), running.tolist()):
            if live:
                out_tokens[j].append(token)
        if gaps is not None:
            for j, gap, live in zip(alive.tolist(), top2_gap(logits), running.tolist()):
                if live:
                    gaps[j].append(gap)
        running &= ~torch.isin(nxt, stop_ids)
        n_running = int(running.sum())
        if t == max_new_tokens - 1 or n_running == 0:
            break
        if 2 * n_running <= len(alive):
            keep = running.nonzero().flatten()
            step.select(keep)
            alive, nxt, running = alive[keep], nxt[keep], running[keep]
        logits = step(nxt)
    return out_tokens


def static_decode_obstacle(lm, hooks: RowHooks) -> str | None:
    """Why a batch of `lm` with `hooks` cannot decode through `decode_static` with CUDA graphs (None: it can)."""
    if lm.device.type != "cuda":
        return "not on CUDA"
    if not lm.cuda_graphs:
        return "generation.cuda_graphs is off"
    if lm.is_seq2seq:
        return "seq2seq model"
    if type(hooks) is not RowHooks:
        return f"per-row composition state ({type(hooks).__name__})"
    attention = getattr(lm.model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (static decode needs sdpa or eager)"
    return None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _run(lm, rows: list[list[int]], index: list[int], prompts: list[str], max_new_tokens: int,
         hooks: RowHooks, legacy: bool, gaps: list[list[float]] | None, graphs: bool) -> list[list[int]]:
    """One batch through its decoder; on out-of-memory, the two halves in turn (logged)."""
    hooks.start(index, prompts)
    try:
        args = (lm.model, rows, max_new_tokens, lm.stop_token_ids(), lm.tokenizer.pad_token_id, hooks, gaps)
        if legacy:  # the previous path exactly as it was
            return decode_generate(*args, seq2seq=lm.is_seq2seq)
        with attention_backends(lm.device):
            if lm.is_seq2seq:
                return decode_generate(*args, seq2seq=True)
            if graphs:
                return decode_static(*args[:5], gaps=gaps)
            return decode_causal(*args)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not _is_oom(error) or len(rows) == 1:
            raise
    finally:
        hooks.end()
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()
    for row_gaps in gaps or []:
        row_gaps.clear()  # steps recorded by the failed attempt
    half = len(rows) // 2
    log.warning("generation: out of memory at %d rows; retrying as %d + %d", len(rows), half, len(rows) - half)
    parts = [(slice(0, half)), slice(half, len(rows))]
    out = []
    for part in parts:
        sub_gaps = None if gaps is None else gaps[part]
        out += _run(lm, rows[part], index[part], prompts[part], max_new_tokens, hooks, legacy, sub_gaps, graphs)
    return out


def generate(lm, prompts: Sequence[str], max_new_tokens: int = 16, *, hooks: RowHooks = NO_HOOKS,
             token_budget: int | None = None, max_rows: int | None = None, progress: bool = False,
             desc: str = "generate", legacy_batch: int | None = None,
             gaps: dict[int, list[float]] | None = None) -> list[str]:
    """Greedy continuations of `prompts` on `lm` (a `bench.models.lm.LanguageModel`) in input order, text up to the
    first stop token (module docstring).

    `legacy_batch`: the previous path instead, the reference of the tests and the baseline of `bench.perf eval`:
    batches of that many prompts in input order through ``model.generate`` (hooks as a logits processor).
    `gaps`: filled with each input's `top2_gap` per generated token (input index -> list)."""
    if not prompts:
        return []
    rows = [lm.prompt_ids(p) for p in prompts]
    if legacy_batch:
        batches = [Batch(list(range(i, min(i + legacy_batch, len(rows)))), 0)
                   for i in range(0, len(rows), legacy_batch)]
    else:
        budget = token_budget or default_token_budget(lm.model)  # model rows: `fanout` per example
        batches = plan_batches([len(r) for r in rows], max_new_tokens, max(budget // hooks.fanout, 1), max_rows)
    graphs = False
    if not legacy_batch:
        obstacle = static_decode_obstacle(lm, hooks)
        graphs = obstacle is None
        if obstacle and lm.device.type == "cuda":
            log.info("generation: eager decoding (%s)", obstacle)
    outputs: list[str | None] = [None] * len(prompts)
    attention = contextlib.nullcontext() if legacy_batch else grouped_decoding(lm.model)
    with attention, tqdm(total=len(prompts), desc=desc, disable=not progress or BARS_OFF, leave=False) as bar:
        for batch in batches:
            batch_gaps = None if gaps is None else [[] for _ in batch.index]
            args = (lm, [rows[i] for i in batch.index], batch.index, [prompts[i] for i in batch.index],
                    max_new_tokens, hooks, bool(legacy_batch), batch_gaps)
            try:
                new = _run(*args, graphs)
            except RuntimeError as error:  # a capture the model does not allow: this call decodes eagerly
                if not graphs or _is_oom(error):
                    raise
                log.warning("generation: CUDA-graph decoding failed (%s); eager decoding", error)
                graphs = False
                for row_gaps in batch_gaps or []:
                    row_gaps.clear()
                new = _run(*args, graphs)
            for k, (i, text) in enumerate(zip(batch.index, lm.decode_until_stop(new, has_start=False))):
                outputs[i] = text
                if gaps is not None:
                    gaps[i] = batch_gaps[k]
            bar.update(len(batch.index))
    return outputs
