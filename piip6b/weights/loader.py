"""Exact, loud, memory-safe loading of weight files into a model (or a ZeRO-3 engine).

Loading happens in two phases:
1. `plan_load` reads only file headers (names, shapes, dtypes) and decides, for every parameter
   of the target, where its value comes from (copy, bicubic resize, identity fill) — or fails with
   one error naming every missing key, unexpected key and unconvertible shape. Nothing is touched.
2. The plan streams tensors one at a time from the memory map: `load_pretrained` copies each into
   its parameter and drops the copied pages; `iter_converted` yields `(name, tensor)` for callers
   that place them themselves (ZeRO-3 partitioned parameters, the safetensors writer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Callable, Literal, Union

import torch
import torch.nn as nn

from piip6b.dist import full_shape, is_partitioned

from . import resize
from .formats import TensorInfo, WeightSource, open_source
from .layouts import (
    LAYER_SCALE_KEY,
    LEGACY_MISSING_LAYER_SCALE,
    PIIP6B_TARGET_KEY,
    Ignored,
    Layout,
    get_layout,
    is_new_by_construction,
    legacy_name,
)

Op = Literal["copy", "resize_patch", "resize_pos", "fill_ones"]
ModelLike = Union[nn.Module, Mapping[str, TensorInfo]]
SourceLike = Union[str, PathLike, WeightSource]


class WeightsLoadError(ValueError):
    """The file does not fit the model; the model was not modified."""


@dataclass(frozen=True)
class Entry:
    target: str  # full name in the model
    source: str | None  # name in the file (None for fills)
    op: Op
    src_shape: tuple[int, ...]
    dst: TensorInfo


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class LoadReport:
    source: str
    format: str
    target: str | None
    loaded: list[str] = field(default_factory=list)  # model names (copied or resized)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    filled: list[tuple[str, str]] = field(default_factory=list)  # (model name, why)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)  # (file name, model name, why): old layout
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)
    missing: list[str] = field(default_factory=list)  # allowed: new by construction or allow-pattern
    unexpected: list[str] = field(default_factory=list)  # allowed by allow-pattern

    def summary(self) -> str:
        lines = [f"[weights] {self.source} as '{self.format}' -> {self.target or 'model root'}",
                 f"  loaded     {len(self.loaded)}"]
        lines.append(f"  renamed    {len(self.renamed)}")
        by_reason: dict[str, list[str]] = {}
        for old, new, why in self.renamed:
            by_reason.setdefault(why, []).append(f"{old} -> {new}")
        lines += [f"    {_names(names, 4)}: {why}" for why, names in by_reason.items()]
        lines.append(f"  resized    {len(self.resized)}")
        lines += [f"    {name}: {_fmt_shape(a)} -> {_fmt_shape(b)} (bicubic)" for name, a, b in self.resized]
        lines.append(f"  filled     {len(self.filled)}")
        by_reason = {}
        for name, why in self.filled:
            by_reason.setdefault(why, []).append(name)
        lines += [f"    {_names(names)}: {why}" for why, names in by_reason.items()]
        by_reason = {}
        for name, why in self.ignored:
            by_reason.setdefault(why, []).append(name)
        lines.append(f"  ignored    {len(self.ignored)}")
        lines += [f"    {_names(names)}: {why}" for why, names in by_reason.items()]
        lines.append(f"  missing    {len(self.missing)}" + (f" (allowed: {_names(self.missing)})" if self.missing else ""))
        lines.append(f"  unexpected {len(self.unexpected)}" + (f" (allowed: {_names(self.unexpected)})" if self.unexpected else ""))
        return "\n".join(lines)


def target_spec(model: ModelLike) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a model's state dict (ZeRO-3 partitioned params: `ds_shape`)."""
    if isinstance(model, Mapping):
        return {k: v if isinstance(v, TensorInfo) else TensorInfo(tuple(v[0]), v[1]) for k, v in model.items()}
    return {name: TensorInfo(full_shape(tensor), tensor.dtype)
            for name, tensor in model.state_dict(keep_vars=True).items()}


def _compile(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in patterns]


def _matches(name: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def _choose_op(dst_name: str, src: tuple[int, ...], dst: tuple[int, ...]) -> Op | None:
    if src == dst:
        return "copy"
    leaf = dst_name.rsplit(".", 2)
    if dst_name.endswith("patch_embed.proj.weight") and resize.patch_kernel_resizable(src, dst):
        return "resize_patch"
    if leaf[-1] == "pos_embed" and resize.pos_embed_resizable(src, dst):
        return "resize_pos"
    return None


class LoadPlan:
    """A validated mapping from a file's tensors to a model's names; streams converted tensors."""

    def __init__(self, source: WeightSource, layout: Layout, entries: list[Entry], report: LoadReport) -> None:
        self.source = source
        self.layout = layout
        self.entries = entries
        self.report = report

    def materialize(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(value in any dtype, the file-backed source view to release afterwards or None)."""
        if entry.op == "fill_ones":
            return torch.ones(entry.dst.shape, dtype=entry.dst.dtype), None
        src = self.source.get(entry.source)
        if entry.op == "copy":
            return src, src
        if entry.op == "resize_patch":
            return resize.resize_patch_kernel(src, entry.dst.shape[2:]), src
        return resize.resize_pos_embed(src, entry.dst.shape[1]), src

    def tensors(self, cast: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (model name, tensor) in model order; cast to the model's dtype unless cast=False.

        A yielded tensor may be a view into the file's memory map; its pages are dropped from
        this process's RSS once the consumer asks for the next one (the data stays valid: it is
        re-read from the file if touched again).
        """
        for entry in self.entries:
            value, view = self.materialize(entry)
            yield entry.target, (value.to(entry.dst.dtype) if cast else value)
            if view is not None:
                self.source.release(view)

    def close(self) -> None:
        self.source.close()


def plan_load(
    source: SourceLike,
    model: ModelLike,
    *,
    target: str | None = None,
    format: str | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> LoadPlan:
    """Validate a file against a model (or a name -> TensorInfo spec) without reading tensor data.

    target: dotted module path the file's names land under ("branch1", "backbone.branch2", None
        for the root). Files of this project default to the subtree recorded in their metadata.
    allow_missing / allow_unexpected: regexes (full match) on model names / file names.
    Raises WeightsLoadError naming every problem.
    """
    src = source if isinstance(source, WeightSource) else open_source(source)
    try:
        return _plan(src, target_spec(model), target, format, _compile(allow_missing), _compile(allow_unexpected))
    except BaseException:
        if not isinstance(source, WeightSource):
            src.close()
        raise


def _plan(
    src: WeightSource,
    spec: dict[str, TensorInfo],
    target: str | None,
    format: str | None,
    allow_missing: list[re.Pattern[str]],
    allow_unexpected: list[re.Pattern[str]],
) -> LoadPlan:
    layout = get_layout(format, src)
    file_root = ""
    if layout.name == "piip6b":
        file_root = src.metadata.get(PIIP6B_TARGET_KEY, "")
        if target is None and file_root:
            target = file_root
    if target == "backbone" and not any(k.startswith("backbone.") for k in spec):
        target = None  # the model IS the backbone
    prefix = f"{target}." if target else ""
    if target and not any(k.startswith(prefix) for k in spec):
        subtrees = sorted({k.split(".")[0] for k in spec})
        raise WeightsLoadError(f"{src.path}: the model has no module '{target}' to load into; top-level modules: {subtrees}.")
    scope = {k: v for k, v in spec.items() if k.startswith(prefix)}
    model_has_backbone = any(k.startswith("backbone.") for k in spec)

    report = LoadReport(str(src.path), layout.name, target)
    mapped: dict[str, str] = {}  # model name -> file name
    unexpected: list[str] = []
    file_names: list[tuple[str, str]] = []  # (file key, name relative to the file's root)
    for key in src.keys():
        if file_root and not key.startswith(file_root + "."):
            unexpected.append(key)
        else:
            file_names.append((key, key[len(file_root) + 1:] if file_root else key))
    # Released detectors and our detector exports carry `backbone.`; loading them into a bare
    # backbone drops that prefix and sets the heads aside (reported as ignored).
    strip_backbone = (
        layout.full_names
        and any(name.startswith("backbone.") for _, name in file_names)
        and not any(k[len(prefix):].startswith("backbone.") for k in scope)
    )
    for key, name in file_names:
        if strip_backbone:
            if not name.startswith("backbone."):
                action = layout.map_key(name)
                why = action.reason if isinstance(action, Ignored) else "not part of the backbone (a head of the file's model)"
                report.ignored.append((key, why))
                continue
            name = name[len("backbone."):]
        action = layout.map_key(name)
        if isinstance(action, Ignored):
            report.ignored.append((key, action.reason))
            continue
        if action is not None and prefix + action not in scope and layout.full_names:
            legacy = legacy_name(action)
            if legacy is not None and prefix + legacy[0] in scope:
                report.renamed.append((key, prefix + legacy[0], legacy[1]))
                action = legacy[0]
        if action is None or prefix + action not in scope:
            unexpected.append(key)
            continue
        full = prefix + action
        if full in mapped:
            raise WeightsLoadError(f"{src.path}: '{mapped[full]}' and '{key}' both map to '{full}'.")
        mapped[full] = key

    entries: list[Entry] = []
    missing: list[str] = []
    bad_shapes: list[str] = []
    for name, dst in scope.items():
        key = mapped.get(name)
        if key is None:
            legacy_block = LEGACY_MISSING_LAYER_SCALE.fullmatch(name) if layout.full_names else None
            if layout.fills_layer_scale and LAYER_SCALE_KEY.fullmatch(name[len(prefix):]):
                entries.append(Entry(name, None, "fill_ones", (), dst))
                report.filled.append((name, "the source has no layer scale; 1.0 is its exact equivalent"))
            elif legacy_block is not None and f"{legacy_block.group(1)}.norm1.weight" in mapped:
                entries.append(Entry(name, None, "fill_ones", (), dst))
                report.filled.append((name, "written when DeiT-T blocks had no layer scale (piip6b key layout 1); "
                                            "1.0 is its exact equivalent"))
            else:
                missing.append(name)
            continue
        info = src.info(key)
        op = _choose_op(name, info.shape, dst.shape)
        if op is None:
            bad_shapes.append(f"{key} {_fmt_shape(info.shape)} -> {name} {_fmt_shape(dst.shape)}")
            continue
        entries.append(Entry(name, key, op, info.shape, dst))
        report.loaded.append(name)
        if op.startswith("resize"):
            report.resized.append((name, info.shape, dst.shape))

    bad_missing = [n for n in missing if not (_matches(n, allow_missing) or is_new_by_construction(n, model_has_backbone))]
    bad_unexpected = [k for k in unexpected if not _matches(k, allow_unexpected)]
    report.missing = [n for n in missing if n not in set(bad_missing)]
    report.unexpected = [k for k in unexpected if k not in set(bad_unexpected)]
    problems = []
    if bad_missing:
        problems.append(f"missing in the file ({len(bad_missing)}): {_names(bad_missing)}")
    if bad_unexpected:
        problems.append(f"unexpected in the file ({len(bad_unexpected)}): {_names(bad_unexpected)}")
    if bad_shapes:
        problems.append(f"shapes no rule converts ({len(bad_shapes)}; file -> model): {_names(bad_shapes, 8)}")
    if problems:
        raise WeightsLoadError(
            f"{src.describe()} read as '{layout.name}' ({layout.description}) does not fit "
            f"{target or 'the model'}; nothing was loaded.\n  " + "\n  ".join(problems)
            + "\n  If this is the wrong file or preset, fix that. If the difference is intended, pass an explicit "
            "allow-pattern (allow_missing=/allow_unexpected=, or --allow-missing/--allow-unexpected), "
            "or the right format/target (format=, target=)."
        )
    return LoadPlan(src, layout, entries, report)


def iter_converted(
    source: SourceLike,
    model: ModelLike,
    *,
    target: str | None = None,
    format: str | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    log: Callable[[str], object] | None = print,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate, print the report, then yield (model name, tensor in the model's dtype) one at a time.

    For consumers that place tensors themselves, e.g. the engine filling ZeRO-3 partitioned
    parameters module by module (pass `model` as a name -> TensorInfo spec or the wrapped model;
    `ds_shape` is honoured). Validation happens before the first tensor is yielded.
    """
    plan = plan_load(source, model, target=target, format=format,
                     allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    if log is not None:
        log(plan.report.summary())
    try:
        yield from plan.tensors()
    finally:
        if not isinstance(source, WeightSource):
            plan.close()


def _destinations(model: nn.Module, plan: LoadPlan) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    dests = {e.target: state[e.target] for e in plan.entries}
    on_meta = [n for n, t in dests.items() if t.is_meta]
    if on_meta:
        raise WeightsLoadError(
            f"{len(on_meta)} parameters are on the meta device ({_names(on_meta, 4)}): materialise the model "
            "first, or stream with iter_converted()."
        )
    if any(is_partitioned(t) for t in dests.values()):
        raise WeightsLoadError(
            "the model's parameters are ZeRO-3 partitioned: load them with "
            "piip6b.engine.build.load_pretrained_sharded() instead of load_pretrained()."
        )
    return dests


def _stream_into(model: nn.Module, plan: LoadPlan) -> None:
    dests = _destinations(model, plan)
    with torch.no_grad():
        for entry in plan.entries:
            value, view = plan.materialize(entry)
            dests[entry.target].copy_(value)  # casts to the parameter's dtype in place
            if view is not None:
                plan.source.release(view)


def load_pretrained(
    model: nn.Module,
    source: SourceLike,
    target: str | None = None,
    *,
    format: str | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    log: Callable[[str], object] | None = print,
) -> LoadReport:
    """Load one weight file into `model` (or its submodule `target`, e.g. "branch1" or "backbone").

    Exact: every parameter of the target gets a value from the file (or a reported identity fill)
    unless it is new by construction (interactions, merges, pyramid, heads) or matches
    allow_missing; every file key is loaded or a known, reported ignore unless allow_unexpected
    matches it. On any problem, raises WeightsLoadError and leaves the model untouched.
    Streams tensor by tensor from the memory map (peak extra memory: about one tensor).
    """
    plan = plan_load(source, model, target=target, format=format,
                     allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    try:
        _stream_into(model, plan)
    finally:
        if not isinstance(source, WeightSource):
            plan.close()
    if log is not None:
        log(plan.report.summary())
    return plan.report


def plan_sources(
    sources: Mapping[str | None, SourceLike],
    model: ModelLike,
    *,
    formats: Mapping[str | None, str] | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> list[LoadPlan]:
    """Validate several files that together initialise `model`, e.g. {"branch1": 6B file,
    "branch2": MAE file}, without reading tensor data. The one coverage rule of this project:

    - each file is exact for its target (`plan_load`);
    - no parameter is given by two files;
    - the union covers every parameter that is not new by construction (interactions, merges,
      pyramid, heads) or allowed by `allow_missing`: a branch left at its random init is a mistake
      unless asked for.

    Raises WeightsLoadError naming every problem (the opened files are closed again).
    """
    allow_missing = list(allow_missing)
    spec = target_spec(model)
    plans: list[LoadPlan] = []
    try:
        for target, path in sources.items():
            plans.append(plan_load(path, spec, target=target, format=(formats or {}).get(target),
                                   allow_missing=allow_missing, allow_unexpected=allow_unexpected))
        covered: dict[str, str] = {}
        for plan in plans:
            for entry in plan.entries:
                if entry.target in covered:
                    raise WeightsLoadError(f"'{entry.target}' is given by both {covered[entry.target]} and {plan.report.source}.")
                covered[entry.target] = plan.report.source
        has_backbone = any(k.startswith("backbone.") for k in spec)
        patterns = _compile(allow_missing)
        uncovered = [n for n in spec if n not in covered
                     and not (is_new_by_construction(n, has_backbone) or _matches(n, patterns))]
        if uncovered:
            raise WeightsLoadError(
                f"after loading {[p.report.source for p in plans]}, {len(uncovered)} parameters would keep their "
                f"random init: {_names(uncovered)}. Add a source for them or an allow-pattern; nothing was loaded."
            )
    except BaseException:
        for plan, path in zip(plans, sources.values()):
            if not isinstance(path, WeightSource):
                plan.close()
        raise
    return plans


def load_pretrained_branches(
    model: nn.Module,
    sources: Mapping[str | None, SourceLike],
    *,
    formats: Mapping[str | None, str] | None = None,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    log: Callable[[str], object] | None = print,
) -> list[LoadReport]:
    """Initialise a whole model from several files (`plan_sources`' rule); nothing is loaded
    unless every file validates and together they cover the model."""
    plans = plan_sources(sources, model, formats=formats, allow_missing=allow_missing,
                         allow_unexpected=allow_unexpected)
    try:
        for plan in plans:
            _stream_into(model, plan)
            if log is not None:
                log(plan.report.summary())
        return [plan.report for plan in plans]
    finally:
        for plan, path in zip(plans, sources.values()):
            if not isinstance(path, WeightSource):
                plan.close()
