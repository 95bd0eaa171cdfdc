"""`LanguageModel`: a base model with its tokenizer and prompt format, and the operations every NLP method
and task needs: batched greedy generation, target-token cross-entropy, and applying a LoRA adapter (through
peft) or dense deltas for the span of a ``with`` block, leaving the base weights exactly as they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from bench.lora.adapters import LoraAdapter
from bench.models.batching import pad_rows


@dataclass
class LanguageModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    is_seq2seq: bool = False
    chat: bool = False
    system_prompt: str | None = None
    max_input_tokens: int = 1024
    token_budget: int | None = None  # padded tokens per generation batch (None: `bench.models.generation`'s default)
    max_rows: int | None = None  # rows per generation batch at most (None: the budget decides)
    legacy_batch: int | None = None  # set: `generate` takes the previous fixed-batch path (tests, perf baseline)
    cuda_graphs: bool = True  # on CUDA, hook-free batches decode from a captured CUDA graph (`bench.models.generation`)
    _base: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def base_model(self) -> torch.nn.Module:
        """The underlying transformers model, also while a peft adapter wraps it."""
        return self._base if self._base is not None else self.model

    # ----------------------------------------------------------------- text formatting
    def format_prompt(self, text: str) -> str:
        """The model's input for a task prompt: the chat template for chat models, the text otherwise."""
        if not self.chat:
            return text
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.is_seq2seq)["input_ids"]

    def encode_pairs(self, inputs: Sequence[str], targets: Sequence[str], max_len: int = 512) -> dict:
        """Tensors for teacher forcing: labels are the target tokens (+ EOS); prompt tokens are -100.

        Causal LMs: prompt and target concatenated, right-padded. Seq2seq: encoder input and decoder labels.
        Prompts are truncated from the left so the target always fits within `max_len`.
        """
        rows, labels = self._pair_rows(inputs, targets, max_len)
        batch = pad_rows(rows, self.tokenizer.pad_token_id, side="right")
        out = {"input_ids": batch, "attention_mask": (pad_rows([[1] * len(r) for r in rows], 0, side="right"))}
        out["labels"] = pad_rows(labels, -100, side="right")
        return {k: v.to(self.device) for k, v in out.items()}

    def _pair_rows(self, inputs: Sequence[str], targets: Sequence[str],
                   max_len: int) -> tuple[list[list[int]], list[list[int]]]:
        """Token rows and label rows of `encode_pairs`, unpadded."""
        eos = self.tokenizer.eos_token_id
        rows, labels = [], []
        for text, target in zip(inputs, targets):
            prompt = self._ids(self.format_prompt(text))
            tgt = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
            if self.is_seq2seq:
                rows.append(prompt[-max_len:])
                labels.append(tgt[:max_len])
            else:
                tgt = tgt[: max_len - 1]
                prompt = prompt[-(max_len - len(tgt)):]
                rows.append(prompt + tgt)
                labels.append([-100] * len(prompt) + tgt)
        return rows, labels

    def pair_batches(self, inputs: Sequence[str], targets: Sequence[str], max_len: int = 512,
                     token_budget: int | None = None) -> list[list[int]]:
        """Teacher-forcing forward batches: example indices sorted by length (prompt + target, and the decoder's
        labels for seq2seq), cut so that each batch's padded tokens stay within `token_budget` (default:
        `bench.models.batching.loss_token_budget`)."""
        from bench.models.batching import loss_token_budget, plan_batches

        rows, labels = self._pair_rows(inputs, targets, max_len)
        lengths = [len(r) + (len(l) if self.is_seq2seq else 0) for r, l in zip(rows, labels)]
        budget = token_budget or loss_token_budget(self.model)
        return [b.index for b in plan_batches(lengths, 0, budget)]

    def loss(self, inputs: Sequence[str], targets: Sequence[str], batch_size: int | None = None,
             max_len: int = 512, reduction: str = "mean", token_budget: int | None = None) -> torch.Tensor:
        """Mean cross-entropy of the target tokens (graph kept when called with grad enabled).

        reduction="mean": the mean over examples of each example's mean target-token cross-entropy;
        "per_example": those means, in input order. Forward batches: `pair_batches` (length-sorted, a token
        budget), or with `batch_size` that many examples in input order (one forward per batch, for callers that
        read per-forward state such as MoLE's gate records). Either way the same numbers (padding is masked).
        """
        if batch_size:
            plan = [list(range(i, min(i + batch_size, len(inputs)))) for i in range(0, len(inputs), batch_size)]
        else:
            plan = self.pair_batches(inputs, targets, max_len, token_budget)
        per_example, order = [], []
        for index in plan:
            order += index
            batch = self.encode_pairs([inputs[i] for i in index], [targets[i] for i in index], max_len)
            sums, counts = target_token_losses(self.model, batch, self.is_seq2seq)
            per_example.append(sums / counts.clamp(min=1))
        losses = torch.cat(per_example)[torch.as_tensor(order).argsort().to(self.device)]  # input order
        return losses.mean() if reduction == "mean" else losses

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids the model reads for a task prompt: formatted, left-truncated to `max_input_tokens`."""
        return self._ids(self.format_prompt(text))[-self.max_input_tokens :]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int | None = None,
                 progress: bool = False, desc: str = "generate", token_budget: int | None = None,
                 hooks=None, gaps: dict | None = None) -> list[str]:
        """Greedy continuations of `prompts` (formatted with `format_prompt`), special tokens removed, through the
        one engine (`bench.models.generation`): length-sorted batches of at most `token_budget` padded tokens (and
        `batch_size` rows, when given), outputs in input order; `hooks` carry a method's per-row state. With
        `legacy_batch` set on the model, the previous path instead (fixed batches of that size, input order)."""
        from bench.models.generation import NO_HOOKS, generate

        return generate(self, prompts, max_new_tokens, hooks=hooks or NO_HOOKS,
                        token_budget=token_budget or self.token_budget, max_rows=batch_size or self.max_rows,
                        progress=progress, desc=desc, legacy_batch=self.legacy_batch, gaps=gaps)

    def stop_token_ids(self) -> list[int]:
        """EOS and every other special token except padding/unknown (chat models end turns with tokens such as
        ``<|im_end|>`` or ``<|endoftext|>``; a composed model may emit either)."""
        tok = self.tokenizer
        ignore = {tok.unk_token_id} | ({tok.pad_token_id} if tok.pad_token_id != tok.eos_token_id else set())
        special = set(tok.all_special_ids) - ignore - {None}
        return [tok.eos_token_id] + sorted(special - {tok.eos_token_id})

    def decode_until_stop(self, rows: list[list[int]], has_start: bool = True) -> list[str]:
        """Text of each generated row up to (without) its first stop token (`has_start`: seq2seq rows that
        still begin with the decoder start token)."""
        stops = set(self.stop_token_ids())
        start = 1 if self.is_seq2seq and has_start else 0
        texts = []
        for row in rows:
            row = row[start:]
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts

    # ----------------------------------------------------------------- applying adapters
    @contextlib.contextmanager
    def adapter_applied(self, adapter: LoraAdapter, unmerged: bool = False) -> Iterator["LanguageModel"]:
        """Run the block with `adapter` in the model: by default its updates ``s·B@A`` folded into the base weights
        (inference runs the plain model; weights restored bit-exactly); ``unmerged=True`` injects it through peft
        (LoRA layers beside the base ones), the base model restored afterwards."""
        if not unmerged:
            with self.deltas_folded(adapter_deltas(adapter, self.base_model)):
                yield self
            return
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        kwargs = adapter.peft_config()
        kwargs.pop("base_model_name_or_path")
        kwargs["task_type"] = "SEQ_2_SEQ_LM" if self.is_seq2seq else "CAUSAL_LM"
        base = self.model
        peft_model = get_peft_model(base, LoraConfig(**kwargs))
        state = {k: v.to(self.device, base.dtype) for k, v in adapter.peft_state_dict().items()}
        result = set_peft_model_state_dict(peft_model, state)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            peft_model.unload()
            raise RuntimeError(f"peft did not place {len(unexpected)} LoRA tensors, e.g. {unexpected[:2]}")
        peft_model.eval()
        self.model, self._base = peft_model, base
        try:
            yield self
        finally:
            self.model = peft_model.unload()
            self._base = None

    @contextlib.contextmanager
    def deltas_folded(self, deltas: dict[str, torch.Tensor]) -> Iterator["LanguageModel"]:
        """Run the block with ``W += ΔW`` for each named linear layer; original weights restored bit-exactly."""
        with folded(self.model, deltas):
            yield self


@contextlib.contextmanager
def folded(root: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """``W += ΔW`` for each module path of `root` named in `deltas`, undone bit-exactly on exit (the original
    weights are kept, never recomputed by subtraction)."""
    from bench.errors import AdapterError

    modules = dict(root.named_modules())
    missing = sorted(set(deltas) - set(modules))
    if missing:
        raise AdapterError(f"cannot fold deltas into modules this model does not have: {missing[:3]}")
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = modules[name].weight
                saved[name] = weight.detach().clone()
                weight.add_(delta.to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)


def target_token_losses(model: torch.nn.Module, batch: dict, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a teacher-forcing `batch` (`LanguageModel.encode_pairs`): the summed cross-entropy of its
    target tokens and their count. A causal LM's head runs only from the batch's first target position on
    (``logits_to_keep``): the prompt tokens' logits are never used, and over a 49k vocabulary they were a fifth
    of a training step's forward and backward."""
    labels = batch["labels"]
    if seq2seq:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    else:
        first = int((labels != -100).int().argmax(1).min())  # the earliest target token of any row
        keep = labels.shape[1] - max(first - 1, 0)  # positions first-1 … end predict every target token
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        try:
            logits = model(**kwargs, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: every position
            logits = model(**kwargs).logits
        logits, labels = logits[:, -keep:][:, :-1], labels[:, labels.shape[1] - keep + 1:]
    tok = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                            reduction="none")
    mask = (labels != -100).float()
    return (tok * mask).sum(1), mask.sum(1)


def adapter_deltas(adapter: LoraAdapter, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> ``s·B@A`` (float32 at least, on the model's device) for every module of `adapter`."""
    device = next(model.parameters()).device
    deltas = {}
    for path, m in adapter.modules.items():
        dtype = torch.promote_types(m.A.dtype, torch.float32)
        deltas[path] = m.scale * (m.B.to(device, dtype) @ m.A.to(device, dtype))
    return deltas
