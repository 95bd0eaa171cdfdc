"""Name -> class registries for methods and tasks (after lm-eval's task registry).

A method or task is one module under `methods/` or `tasks/` that decorates its class with
`@register_method("name")` / `@register_task("name")`, plus one YAML under `conf/method/` or `conf/task/`.
Modules are imported on first lookup, so nothing heavy is imported before it is needed.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from bench.errors import ConfigError

T = TypeVar("T")
METHODS: dict[str, type] = {}
TASKS: dict[str, type] = {}
_discovered: set[str] = set()


def register_method(name: str) -> Callable[[T], T]:
    return _register(METHODS, name, "method")


def register_task(name: str) -> Callable[[T], T]:
    return _register(TASKS, name, "task")


def _register(table: dict, name: str, kind: str):
    def deco(cls):
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} registered twice ({table[name].__module__} and {cls.__module__})")
        cls.registry_name = name
        table[name] = cls
        return cls

    return deco


def _discover(package: str) -> None:
    if package in _discovered:
        return
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _discovered.add(package)


def get_method(name: str) -> type:
    _discover("methods")
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def get_task(name: str) -> type:
    _discover("tasks")
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def make_task(name: str, overrides=None, data_root: str | None = None):
    """Task `name` built from its conf/task YAML with `overrides` (e.g. a pool's ``train.task_cfg``) merged on top."""
    from omegaconf import OmegaConf

    from bench.config import load_group_option

    cfg = OmegaConf.merge(load_group_option("task", name), overrides or {})
    return get_task(name)(cfg, data_root)
