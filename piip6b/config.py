"""Experiment configuration: YAML files with `_base_` inheritance, dotted overrides, typed dataclasses.

A config file is a YAML mapping. `_base_: other.yaml` (or a list of them, later ones win) names files,
relative to this one, that are deep-merged first; the file's own keys then override theirs. A key
whose value is the mapping `{_delete_: true, ...}` replaces the inherited mapping instead of merging
into it. Command-line overrides `optim.lr=2e-4` are parsed as YAML scalars and applied last.

The merged tree is validated into `ExperimentConfig`: every section is a dataclass owned by the
module that uses it, every key is checked, and a misspelled key is reported with the closest valid
one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from piip6b.config_files import (BASE_KEY, DEFAULT_NAME, ConfigError, apply_overrides,  # noqa: F401 (part of this API)
                                 default_run_dir, load_yaml, set_dotted)
from piip6b.devices import PerformanceSettings
from piip6b.engine.checkpoint import CheckpointConfig
from piip6b.engine.metrics import LoggingConfig
from piip6b.engine.optim import OptimConfig
from piip6b.engine.schedule import ScheduleConfig
from piip6b.engine.sharding import EngineConfig
from piip6b.models import ModelConfig, get_spec
from piip6b.tasks.data.config import DataConfig
from piip6b.tasks.detection import DetectionConfig
from piip6b.tasks.segmentation import SegmentationConfig

def with_values(cfg: Any, values: typing.Mapping[str, Any]) -> Any:
    """A copy of the config `cfg` with dotted keys set to these values, validated like a loaded one."""
    tree = to_dict(cfg)
    for key, value in values.items():
        set_dotted(tree, key, value, f"setting {key}")
    return build_dataclass(type(cfg), tree)


# ----------------------------------------------------------------------------------------------
# Typed validation
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any string float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {path!r}{hint} (valid keys of {where or 'the top level'}: "
                f"{', '.join(sorted(fields))})"
            )
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
    except ValueError as exc:  # the section's own __post_init__ rejected a value or a combination
        named = where and str(exc).startswith(f"{where}.")
        raise ConfigError(str(exc) if named else f"{where or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict:
    """Plain mapping of a config (tuples become lists), suitable for YAML/JSON and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# Where a run writes, logs and resumes from, and how fast it computes, do not change what it trains.
_NOT_RECIPE = ("run_dir", "checkpoint", "logging", "evaluation", "performance")


def config_hash(cfg: Any) -> str:
    """Stable short hash of the recipe (the config without run management), stored in checkpoints
    to detect a changed recipe on resume."""
    recipe = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_RECIPE}
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


@dataclass
class EvaluationConfig:
    interval: int = 0  # evaluate every N optimizer steps (0 = only at the end)
    at_end: bool = True
    split: str = "val"
    visualize: int = 0  # images sent to TensorBoard per evaluation

    def __post_init__(self) -> None:
        for name in ("interval", "visualize"):
            if getattr(self, name) < 0:
                raise ValueError(f"evaluation.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ExperimentConfig:
    name: str = DEFAULT_NAME
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    task: Literal["detection", "segmentation"] = "detection"
    model: ModelConfig = field(default_factory=ModelConfig)
    detection: DetectionConfig | None = None
    segmentation: SegmentationConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    performance: PerformanceSettings = field(default_factory=PerformanceSettings)

    def __post_init__(self) -> None:
        if self.run_dir is None:
            self.run_dir = default_run_dir(self.name)
        if self.task == "detection" and self.detection is None:
            self.detection = DetectionConfig()
        if self.task == "segmentation" and self.segmentation is None:
            self.segmentation = SegmentationConfig()
        # Batches are padded to a multiple the backbone accepts (every branch's share of the input a
        # whole number of patches, e.g. 128 for H6B at 192/512): derived here, never set by hand.
        needed = get_spec(self.model.preset, self.model.img_sizes).size_divisor
        self.data.size_divisor = math.lcm(self.data.size_divisor, needed)


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load, inherit, override and validate a config file (the one entry point for users)."""
    tree = apply_overrides(load_yaml(path), overrides)
    return build_dataclass(ExperimentConfig, tree)
