"""Reading experiment config files: YAML with `_base_` inheritance and dotted overrides, as one plain
tree (the format is described in `piip6b.config`, which validates the tree).

Imports only PyYAML, so what needs the tree but not the typed config (the batch scripts asking for
a run's directory before any rank starts) does not pay for importing torch: measured 17-20 s on
the loaded 2-core CI machine for `launch/rank.py --print-run-dir` through `piip6b.config`, 0.2 s
through this module.
"""

from __future__ import annotations

import typing
from pathlib import Path

import yaml

from piip6b.mappings import deep_merge

BASE_KEY = "_base_"
DEFAULT_NAME = "experiment"  # `name` when a config sets none


def default_run_dir(name: str) -> str:
    """Where a run writes when its config sets no `run_dir`: named by the experiment, never by a
    job, so a requeued or resubmitted job finds its checkpoints."""
    return str(Path("runs") / name)


def run_dir_of(tree: dict) -> str:
    """The run directory a config tree (after overrides) resolves to."""
    return str(tree.get("run_dir") or default_run_dir(str(tree.get("name") or DEFAULT_NAME)))


class ConfigError(ValueError):
    """A config file or override the user wrote is invalid; the message says where and how to fix it."""


# ----------------------------------------------------------------------------------------------
# YAML loading with inheritance
# ----------------------------------------------------------------------------------------------


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read one config file and everything it inherits from, as one merged mapping."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        hint = f" (inherited via {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(tree).__name__}")
    bases = tree.pop(BASE_KEY, [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, load_yaml(path.parent / base, (*_chain, path)))
    return deep_merge(merged, tree)


def apply_overrides(tree: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`1e-4`, `[1, 2]`, `null`, `true`)."""
    tree = dict(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        set_dotted(tree, key.strip(), value, f"override {item!r}")
    return tree


def set_dotted(tree: dict, key: str, value: typing.Any, what: str) -> None:
    """Set `a.b.c` in a nested mapping, copying the mappings on the way (the caller's stay as they
    were); `what` names the setting in the error when a parent is not a section."""
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parents[: i + 1])} is not a section")
        node[part] = child = dict(child)
        node = child
    node[leaf] = value
