"""Token-budget batches of teacher-forced forwards (bench/models/batching.py): `LanguageModel.loss` and MoA's hidden
features give, in input order, what each example gives alone (no padding at all)."""

from __future__ import annotations

import torch

from bench.models.batching import loss_token_budget

TEXTS = [f"Q: item {i}: " + "apples and pears " * (1 + (5 * i) % 7) + "?\nA:" for i in range(11)]
TARGETS = [("yes" if i % 2 else "no, " * (i % 4)) + str(i) for i in range(11)]


def alone(lm, text: str, target: str) -> torch.Tensor:
    """Mean cross-entropy of `target`'s tokens (and EOS) after `text`, one unpadded example."""
    batch = lm.encode_pairs([text], [target])
    logits = lm.model(input_ids=batch["input_ids"]).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])


def test_loss_batches_by_token_budget_in_input_order(tiny_lm):
    rows = tiny_lm._pair_rows(TEXTS, TARGETS, 512)[0]
    budget = 3 * max(len(r) for r in rows)
    plan = tiny_lm.pair_batches(TEXTS, TARGETS, token_budget=budget)
    assert len(plan) >= 4 and sorted(i for b in plan for i in b) == list(range(len(TEXTS)))
    for index in plan:
        assert len(index) * max(len(rows[i]) for i in index) <= budget
    with torch.no_grad():
        got = tiny_lm.loss(TEXTS, TARGETS, reduction="per_example", token_budget=budget)
        expected = torch.stack([alone(tiny_lm, t, y) for t, y in zip(TEXTS, TARGETS)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loss_gradient_does_not_depend_on_the_batches(tiny_lm):
    """A training step's gradient: token-budget forwards (several) against one forward of every example."""
    weight = tiny_lm.model.get_input_embeddings().weight
    grads, trainable = [], weight.requires_grad
    weight.requires_grad_(True)
    try:
        for kwargs in ({"token_budget": 64}, {"batch_size": len(TEXTS)}):
            weight.grad = None
            tiny_lm.loss(TEXTS, TARGETS, **kwargs).backward()
            grads.append(weight.grad.clone())
    finally:
        weight.grad = None
        weight.requires_grad_(trainable)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_moa_features_by_token_budget_equal_one_prompt_at_a_time(tiny_lm):
    from methods.moa import hidden_features

    batched = hidden_features(tiny_lm, TEXTS, token_budget=96)
    one_by_one = torch.cat([hidden_features(tiny_lm, [t]) for t in TEXTS])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_loss_budget_on_cpu_is_the_default(tiny_lm):
    from bench.models.batching import DEFAULT_LOSS_TOKEN_BUDGET

    assert loss_token_budget(tiny_lm.model) == DEFAULT_LOSS_TOKEN_BUDGET
