"""The command that re-runs a record: its named config options plus every method, task and profile value that
differs from what those options compose to now (a budget sweep's ``profile.gate_steps``, a method run with
``method.normalize=true``), so a leaderboard row's ``command`` reproduces that row and not the current defaults."""

from __future__ import annotations

import shlex
from functools import lru_cache

from hydra.errors import HydraException
from omegaconf import OmegaConf

from bench.config import compose_config
from bench.run.records import LOCATION_KEYS

SECTIONS = ("method", "task", "profile")


def command(record: dict) -> str:
    """``python -m bench …`` for `record` (module docstring)."""
    config = record.get("config", {})
    task = config.get("task", {})
    named = (f"method={record['method']}", f"task={record['task']}", f"profile={record['profile']}",
             f"experts={config.get('experts', {}).get('name', '?')}")
    parts = [*named, f"fit_examples={config.get('fit_examples')}"]
    if task.get("limit") is not None:
        parts.append(f"task.limit={task['limit']}")
    defaults = _composed(named)
    if defaults is not None:
        for section in SECTIONS:
            own = record.get("method_params") if section == "method" else config.get(section)
            parts += [f"{section}.{key}={hydra_value(value)}"
                      for key, value in differences(own or {}, defaults[section])
                      if not (section == "task" and key == "limit") and not is_location(key)]
    return "python -m bench " + " ".join(shell_word(p) for p in parts)


def is_location(key: str) -> bool:
    """Whether a dotted config key names a place on disk (a cache or data folder): the checkout's own, never part
    of what a row measures, so a command leaves it to the user's paths (and the tables stay the same in any clone)."""
    last = key.rsplit(".", 1)[-1]
    return last in (*LOCATION_KEYS, "root") or last.endswith(("_dir", "_root"))


@lru_cache(maxsize=None)
def _composed(named: tuple[str, ...]) -> dict | None:
    """The resolved method, task and profile sections the named options give now; None when this checkout no
    longer has one of them (the command then names the options only)."""
    try:
        cfg = compose_config(list(named))
    except HydraException:
        return None
    return {s: OmegaConf.to_container(cfg[s], resolve=True) for s in SECTIONS}


def differences(own: dict, default: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, own value) for every leaf of `own` that `default` lacks or holds differently; mappings are
    compared key by key, everything else (lists too) as a whole."""
    out: list[tuple[str, object]] = []
    for key, value in own.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            out += differences(value, default[key], path + ".")
        elif key not in default or default[key] != value:
            out.append((path, value))
    return out


def hydra_value(value: object) -> str:
    """`value` as a Hydra command-line override value (null, true/false, [a,b], {k:v}, quoted strings when needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or any(c in value for c in " ,[]{}=:'\"")):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def shell_word(override: str) -> str:
    """`override` as one shell word: as is when safe, in double quotes when only its own single quotes need it."""
    if shlex.quote(override) == override:
        return override
    if not any(c in override for c in '"$`\\!'):
        return f'"{override}"'
    return shlex.quote(override)
