"""Settings: what a leaderboard row is measured in, and the paired resampling every table and test of it shares.

A row is one method (and variant, metric) in one *setting*: profile, task and its whole config (subtasks, `limit`,
`fit_scope`, format, …), model config, expert pool (name, size, training config; not its folder) and
`fit_examples`. Jobs of one setting must have been scored on the same eval examples (subtask, input, target); a job
whose examples differ is left out with a message rather than averaged. A method run with two different configs in
one setting gives two rows (`config`: a hash of `method_params`; `option_labels`: the method parameters in which its
configs differ, e.g. ``normalize=True`` or ``steps=50``; empty for a method run with one config). `resample` draws a
setting's bootstrap replicates once, seeded by its key, so the leaderboard, `compare` and the papers' comparison
resample a setting alike (`bench.analysis.stats`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from bench.analysis.published import Job
from bench.analysis.stats import REPLICATES, Draws, Scores, replicates
from bench.run.records import LOCATION_KEYS


def setting_of(record: dict) -> dict:
    """The fields that fix what a job measures, except its method (module docstring)."""
    config = record.get("config", {})
    experts = dict(config.get("experts") or {})
    for key in LOCATION_KEYS:
        experts.pop(key, None)
    return {"profile": record["profile"], "task": config.get("task", {"name": record["task"]}),
            "model": config.get("model", {}), "experts": experts, "fit_examples": config.get("fit_examples")}


def short_hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


def example_key(row: dict) -> tuple[str, ...]:
    """What identifies an evaluated example in a prediction row: the input (a text task) or the prompt, image
    seed and index (a diffusion task), and the target."""
    return (str(row.get("input", row.get("prompt", ""))), str(row.get("target", row.get("clip_text", ""))),
            str(row.get("seed", "")), str(row.get("image_index", "")))


def numbered_keys(rows: list[dict]) -> list[tuple]:
    """Each row's `example_key` with its occurrence number among equal keys of its subtask: a data set that holds
    an example twice (BBH's sports_understanding does) is scored, and resampled, twice."""
    seen: dict[tuple, int] = {}
    out = []
    for row in rows:
        key = example_key(row)
        slot = (row.get("subtask"), *key)
        seen[slot] = seen.get(slot, -1) + 1
        out.append((*key, str(seen[slot])))
    return out


def example_value(row: dict, metric: str) -> float | None:
    """A prediction row's score under `metric` (exact match: its correctness)."""
    if metric == "exact_match":
        return float(row["correct"]) if "correct" in row else None
    value = row.get(metric)
    if value is None and metric == "clip_i":
        subjects = [v for k, v in row.items() if k.startswith("clip_i/")]
        value = sum(subjects) / len(subjects) if subjects else None
    return None if value is None else float(value)


class Setting:
    """The jobs of one setting, their rows' per-example scores, and the examples they share."""

    def __init__(self, key: str, fields: dict) -> None:
        self.key, self.fields = key, fields
        self.examples: dict[str, list[tuple[str, str]]] | None = None  # subtask -> example keys, in order
        self.rows: dict[tuple, dict] = {}  # (method, variant, metric, config) -> row data
        self.left_out: list[tuple[str, str]] = []

    def add(self, job: Job) -> None:
        record, preds = job.record, job.predictions
        by_variant: dict[str, list[dict]] = {}
        for p in preds:
            by_variant.setdefault(p.get("variant") or "", []).append(p)
        examples = {}
        for p, key in zip(first := next(iter(by_variant.values()), []), numbered_keys(first)):
            examples.setdefault(p["subtask"], []).append(key)
        examples = {t: sorted(keys) for t, keys in sorted(examples.items())}
        if not examples:
            self.left_out.append((job.source, "no predictions"))
            return
        if self.examples is None:
            self.examples = examples
        elif examples != self.examples:
            self.left_out.append((job.source, "eval examples differ from the other jobs of its setting"))
            return
        config = short_hash(record.get("method_params", {}))
        slot = {t: j for j, t in enumerate(examples)}
        order = {(t, k): i for t in examples for i, k in enumerate(examples[t])}
        for row in record["rows"]:
            if row["subtask"] != "all":
                continue
            variant = row.get("variant") or ""
            data = self.rows.setdefault((record["method"], variant, row["metric"], config), {
                "seeds": {}, "costs": [], "hardware": set(), "record": record})
            values = [np.full(len(examples[t]), np.nan) for t in examples]
            scored = by_variant.get(variant, [])
            for p, key in zip(scored, numbered_keys(scored)):
                value = example_value(p, row["metric"])
                if value is not None:
                    values[slot[p["subtask"]]][order[(p["subtask"], key)]] = value
            if any(np.isnan(v).any() for v in values):
                self.left_out.append((job.source, f"predictions lack {row['metric']} for variant {variant!r}"))
                continue
            data["seeds"][record["seed"]] = values
            data["hardware"].add(record.get("hardware") or record.get("device") or "")
            data["costs"].append({"fit_seconds": row.get("fit_seconds"), "eval_seconds": row.get("eval_seconds"),
                                  "peak_memory_mb": record.get("peak_memory_mb"),
                                  "trained_params": row.get("trained_params"),
                                  "fit_examples_used": row.get("fit_examples"), "fit_steps": row.get("fit_steps")})


@dataclass
class Resampled:
    """A setting's rows (sorted keys), their per-example scores, the shared bootstrap draws (seeded by the setting
    key: every tool resamples a setting alike), each row's replicates of the macro average and its mean."""

    keys: list[tuple]
    scores: dict[tuple, Scores]
    draws: Draws
    reps: dict[tuple, np.ndarray]
    means: dict[tuple, float]


def resample(setting: Setting) -> Resampled:
    subtasks = list(setting.examples)
    keys = sorted(setting.rows)
    scores = {k: Scores(subtasks, [setting.rows[k]["seeds"][s] for s in sorted(setting.rows[k]["seeds"])])
              for k in keys}
    max_seeds = max(len(s.values) for s in scores.values())
    draws = Draws.make({t: len(v) for t, v in setting.examples.items()}, max_seeds, REPLICATES,
                       int(setting.key, 16) % 2**32)
    return Resampled(keys, scores, draws, {k: replicates(scores[k], draws) for k in keys},
                     {k: scores[k].statistic() for k in keys})


def flat_params(params: dict, prefix: str = "") -> dict[str, object]:
    """`params` with nested mappings flattened to dotted keys."""
    out: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def option_labels(params: dict[str, dict]) -> dict[str, str]:
    """Per config hash of one method: its values of the parameters in which the method's configs `params`
    ({config hash: method_params}) differ, as ``key=value, …``; empty labels when there is one config. A null
    value, or a parameter a config predates, reads ``default``: null in a method config is its default."""
    flat = {c: flat_params(p) for c, p in params.items()}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str)
                                         for f in flat.values()}) > 1]
    return {c: ", ".join(f"{k}={'default' if f.get(k) is None else f.get(k)}" for k in differing)
            for c, f in flat.items()}


def setting_options(setting: Setting) -> dict[tuple[str, str], str]:
    """(method, config hash) -> `option_labels` of that config among the method's configs in `setting`."""
    options: dict[tuple[str, str], str] = {}
    for method in {k[0] for k in setting.rows}:
        params = {k[3]: data["record"].get("method_params", {}) for k, data in setting.rows.items() if k[0] == method}
        options.update({(method, c): label for c, label in option_labels(params).items()})
    return options


def settings_of(jobs: list[Job]) -> dict[str, Setting]:
    """`jobs` grouped by setting (module docstring), keyed by its short hash."""
    settings: dict[str, Setting] = {}
    for job in jobs:
        fields = setting_of(job.record)
        key = short_hash(fields)
        settings.setdefault(key, Setting(key, fields)).add(job)
    return settings


def setting_columns(setting: Setting) -> dict:
    f = setting.fields
    return {"setting": setting.key, "profile": f["profile"], "domain": f["experts"].get("domain", "nlp"),
            "task": f["task"].get("name"), "experts": f["experts"].get("name"), "fit_examples": f["fit_examples"],
            "limit": f["task"].get("limit")}
