"""Nested mappings: the one deep merge, shared by config inheritance and the DeepSpeed config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DELETE_KEY = "_delete_"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, merging nested mappings instead of replacing them.

    A value `{_delete_: true, ...}` in `override` replaces the inherited mapping instead of merging
    into it (mmcv's convention, so a config can drop a whole inherited section).
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and value.get(DELETE_KEY):
            merged[key] = {k: v for k, v in value.items() if k != DELETE_KEY}
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
