"""Sharded, atomic, resumable training checkpoints on top of DeepSpeed's own format.

Layout under `<run_dir>/checkpoints/`::

    step_00001000/              one DeepSpeed tag: model/optimizer shards of every rank
        *_model_states.pt, *_optim_states.pt
        rng/rank_00000.pt ...   every rank's own RNG streams
        manifest.json           written last, by rank 0, once every rank has finished writing
    latest                      name of the newest complete tag (replaced by rename)
    universal/step_00001000/    a DeepSpeed universal copy, made when resuming on another world size

A checkpoint *is* complete exactly when its manifest exists and every file it lists is present
with the recorded size. Everything else (a crash or preemption during the write, a truncated shard)
is reported and skipped when resuming automatically, and is an error when named explicitly.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import piip6b
from piip6b import dist
from piip6b.engine.rng import capture_rng_state, restore_rng_state
from piip6b.seeding import derive_seed, seed_everything

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
CHECKPOINTS_SUBDIR = "checkpoints"
UNIVERSAL_SUBDIR = "universal"
ABANDONED_SUBDIR = "abandoned"
RNG_SUBDIR = "rng"
MANIFEST_FORMAT = 1
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


@dataclass
class CheckpointConfig:
    """The `checkpoint` section of an experiment config."""

    every_steps: int = 1000  # also saved at the end of training and on preemption
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    auto_resume: bool = True  # resume from the newest complete checkpoint in the run dir
    resume: str | None = None  # explicit checkpoint (or run dir); failing to load it is an error
    universal_workers: int = 1  # processes for the world-size-change conversion (rank 0 only)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if self.universal_workers < 1:
            raise ValueError(f"checkpoint.universal_workers must be >= 1, got {self.universal_workers}")


@dataclass(frozen=True)
class Manifest:
    """What a complete checkpoint promises: who wrote it and every file with its size."""

    tag: str
    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]  # path relative to the checkpoint folder -> size in bytes
    config_hash: str | None
    code_version: str
    created: str
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format') if isinstance(data, dict) else data!r}")
        return cls(**data)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the checkout (with `-dirty`) when there is one."""
    version = piip6b.__version__
    repo = Path(piip6b.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{version}+unknown"
    return f"{version}+g{commit}{'-dirty' if dirty else ''}"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _list_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith(".")
    }


def _step_of(path: Path) -> int | None:
    match = _TAG_RE.match(path.name)
    return int(match.group(1)) if match else None


def _candidates_in(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder in `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), key=lambda sp: sp[0], reverse=True)


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run.

    save / find_resume / load are collective (every rank calls them; rank 0 decides and writes
    the shared files); validate / complete_checkpoints are local and need no process group.

    Assumes the run dir is on a file system every rank sees (the usual shared cluster storage).
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, universal_workers: int = 1):
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_SUBDIR
        self.keep_last = keep_last
        self.universal_workers = universal_workers

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, client_state: Mapping[str, Any]) -> Path:
        """Write checkpoint `step` from every rank; returns once it is complete on disk.

        `client_state` (epoch, consumed samples, config, its hash...) is stored with the model
        states; step, world size and code version are added here, RNG states per rank beside it.
        """
        rank, world = dist.rank(), dist.world_size()
        tag = tag_for_step(step)
        path = self.root / tag
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        already_complete = dist.on_main(lambda: self._prepare_folder(path))
        if already_complete:
            return path

        started = time.perf_counter()
        state = dict(client_state)
        state.update(step=step, world_size=world, code_version=code_version())
        engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False)
        rng_dir = path / RNG_SUBDIR
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
        # The manifest may only vouch for files that every rank has finished writing.
        dist.barrier()
        if rank == 0:
            manifest = Manifest(
                tag=tag,
                step=step,
                world_size=world,
                zero_stage=int(engine.zero_optimization_stage()),
                files=_list_files(path),
                config_hash=state.get("config_hash"),
                code_version=code_version(),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            )
            _write_text_atomically(path / MANIFEST_NAME, manifest.to_json())
            _write_text_atomically(self.root / LATEST_NAME, tag + "\n")
            size_gb = sum(manifest.files.values()) / 1e9
            logger.info(
                "saved checkpoint %s (%d files, %.2f GB, %.1f s)",
                path, len(manifest.files), size_gb, time.perf_counter() - started,
            )
            self._apply_retention(newest=step)
        # Nobody leaves (e.g. exits after a preemption save) before the checkpoint is complete.
        dist.barrier()
        return path

    def _prepare_folder(self, path: Path) -> bool:
        """True when `path` is already a complete checkpoint; removes a half-written one."""
        if not path.exists():
            return False
        try:
            self.validate(path)
        except CheckpointError as error:
            logger.warning("removing unusable checkpoint before rewriting it: %s", error)
            shutil.rmtree(path)
            return False
        logger.info("checkpoint %s is already complete; not writing it again", path)
        return True

    def _apply_retention(self, newest: int) -> None:
        complete: list[Path] = []
        for step, path in self._candidates():
            try:
                self.validate(path)
            except CheckpointError as error:
                # A folder with no manifest never finished and can never be loaded; one whose
                # files disagree with its manifest is kept for inspection.
                if step < newest and not (path / MANIFEST_NAME).exists():
                    logger.warning("deleting unfinished checkpoint older than %s: %s", tag_for_step(newest), error)
                    shutil.rmtree(path, ignore_errors=True)
                continue
            complete.append(path)
        if self.keep_last == 0:
            return
        for path in complete[self.keep_last:]:
            logger.info("retention (keep_last=%d): deleting %s", self.keep_last, path)
            # Manifest first: a deletion cut short leaves an incomplete folder, never a
            # "complete" one with missing shards.
            (path / MANIFEST_NAME).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(self.root / UNIVERSAL_SUBDIR / path.name, ignore_errors=True)

    # ------------------------------------------------------------------ discovery
    def _candidates(self) -> list[tuple[int, Path]]:
        return _candidates_in(self.root)

    @staticmethod
    def validate(path: str | os.PathLike) -> Manifest:
        """The manifest of a complete checkpoint folder, or CheckpointError saying what is wrong."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete: no {MANIFEST_NAME} (the save did not finish, "
                "e.g. a crash or preemption while writing)"
            )
        try:
            manifest = Manifest.from_json(manifest_path.read_text())
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST_NAME}: {error}") from error
        for name, size in manifest.files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
            actual = file.stat().st_size
            if actual != size:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: {name} has {actual} bytes, the manifest "
                    f"recorded {size} (truncated or overwritten)"
                )
        if not any(name.endswith("model_states.pt") for name in manifest.files):
            raise CheckpointError(f"checkpoint {path} is corrupt: its manifest lists no model states file")
        return manifest

    def complete_checkpoints(self) -> list[Path]:
        """Every complete checkpoint of this run, newest first (rank-local; no collectives)."""
        complete = []
        for _, path in self._candidates():
            try:
                self.validate(path)
            except CheckpointError:
                continue
            complete.append(path)
        return complete

    def find_resume(self, explicit: str | os.PathLike | None = None) -> Path | None:
        """The checkpoint to resume from: `explicit` (a checkpoint folder, or a run / checkpoints
        dir meaning its newest complete one), else the newest complete one of this run, else None.

        Anything wrong with an explicit choice raises CheckpointError: asking for a checkpoint
        and silently training from scratch would waste the whole allocation.
        """
        if explicit is not None:
            return dist.on_main(lambda: self._warn_if_newer(self._resolve_explicit(Path(explicit))))
        return dist.on_main(lambda: self._newest_complete(self.root))

    def _warn_if_newer(self, chosen: Path) -> Path:
        step = _step_of(chosen)
        newer = [p.name for p in self.complete_checkpoints() if step is not None and _step_of(p) > step]
        if newer:
            logger.warning("resuming from %s although this run dir has newer complete checkpoints %s: "
                           "they will be set aside, not deleted", chosen, newer)
        return chosen

    def set_aside_newer_than(self, step: int) -> None:
        """Move this run's checkpoints newer than `step` (the one it resumes from; 0 for a fresh
        start) to `checkpoints/abandoned/`. They belong to a line of training this run does not
        continue: left in place, a save at the same step would find them "already complete" and
        skip writing, and retention would count them and delete the new ones. Collective."""

        def move() -> None:
            for other, path in _candidates_in(self.root):
                if other > step:
                    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
                    target = self.root / ABANDONED_SUBDIR / f"{path.name}-{stamp}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                    logger.warning("set aside %s (newer than the resume point, step %d) as %s", path, step, target)

        dist.on_main(move)

    @classmethod
    def _resolve_explicit(cls, path: Path) -> Path:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path}: no such file or directory")
        if (path / MANIFEST_NAME).exists() or _step_of(path) is not None:
            cls.validate(path)
            return path
        for root in (path / CHECKPOINTS_SUBDIR, path):
            if root.is_dir() and any(_step_of(p) is not None for p in root.iterdir()):
                newest = cls._newest_complete(root)
                if newest is None:
                    raise CheckpointError(f"checkpoint path {path}: it holds no complete checkpoint (see warnings above)")
                return newest
        raise CheckpointError(
            f"checkpoint path {path}: not a checkpoint folder (no {MANIFEST_NAME}) and no step_* "
            f"checkpoints inside it or its {CHECKPOINTS_SUBDIR}/ folder"
        )

    @classmethod
    def _newest_complete(cls, root: Path) -> Path | None:
        for _, path in _candidates_in(root):
            try:
                cls.validate(path)
            except CheckpointError as error:
                logger.warning("skipping checkpoint: %s", error)
                continue
            return path
        return None

    # ------------------------------------------------------------------ load
    def load(self, engine: Any, path: str | os.PathLike, expected_config_hash: str | None = None) -> dict[str, Any]:
        """Load `path` into `engine` on every rank and restore RNG states; returns the client state.

        A checkpoint written by a different number of ranks (or ZeRO stage) is first converted
        to DeepSpeed's universal format by rank 0 into `checkpoints/universal/<tag>`.
        """
        path = Path(path)
        rank, world = dist.rank(), dist.world_size()
        manifest = dist.on_main(lambda: self.validate(path))
        if expected_config_hash is not None and manifest.config_hash not in (None, expected_config_hash):
            if rank == 0:
                logger.warning(
                    "checkpoint %s was written with config hash %s, this run's is %s: resuming with "
                    "the new config", path, manifest.config_hash, expected_config_hash,
                )
        zero_stage = int(engine.zero_optimization_stage())
        universal = manifest.world_size != world or manifest.zero_stage != zero_stage
        if universal:
            if rank == 0:
                logger.warning(
                    "checkpoint %s was written by %d ranks with ZeRO-%d; this run has %d ranks with "
                    "ZeRO-%d: converting it to a DeepSpeed universal checkpoint (ds_to_universal) and "
                    "loading that", path, manifest.world_size, manifest.zero_stage, world, zero_stage,
                )
            load_dir = dist.on_main(lambda: self._universal_copy(path, manifest))
            client_state = self._load_universal(engine, Path(load_dir))
        else:
            load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {path} (see its log above)")
        client_state = dict(client_state or {})

        if universal:
            # Per-rank streams cannot be mapped onto a different number of ranks: start new,
            # reproducible ones for this (step, rank) instead.
            seed = derive_seed(client_state.get("seed", 0), manifest.step, rank, world)
            seed_everything(seed)
            if rank == 0:
                logger.warning("world size changed: RNG streams re-seeded per rank (not a bit-exact resume)")
        else:
            rng_file = path / RNG_SUBDIR / f"rank_{rank:05d}.pt"
            if not rng_file.is_file():
                raise CheckpointError(f"checkpoint {path} has no RNG state for rank {rank} ({rng_file})")
            restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        if rank == 0:
            logger.info("resumed from %s at step %d", path, manifest.step)
        client_state.setdefault("step", manifest.step)
        return client_state

    def _universal_copy(self, path: Path, manifest: Manifest) -> str:
        """Rank 0: convert `path` with DeepSpeed's ds_to_universal (reusing an earlier copy)."""
        from deepspeed.checkpoint import ds_to_universal

        target = self.root / UNIVERSAL_SUBDIR / path.name
        source_id = {"source": str(path.resolve()), "created": manifest.created}
        marker = target / "converted_from.json"
        if marker.is_file() and json.loads(marker.read_text()) == source_id:
            logger.info("reusing universal checkpoint %s", target)
            return str(target)
        shutil.rmtree(target, ignore_errors=True)
        scratch = target.with_name(f".{target.name}.converting")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        args = argparse.Namespace(
            input_folder=str(path),
            output_folder=str(scratch),
            num_extract_workers=self.universal_workers,
            num_merge_workers=max(1, self.universal_workers // 2),
            keep_temp_folder=False,
            strict=True,
            # Our models have no tensor/pipeline parallel layout to describe; ZeRO-1/2 checkpoints
            # of such models lack the (then trivial) universal_checkpoint_info DeepSpeed asks for.
            inject_missing_state=True,
        )
        try:
            ds_to_universal.main(args)
        except Exception as error:  # noqa: BLE001 - any failure here means "cannot resume"
            shutil.rmtree(scratch, ignore_errors=True)
            raise CheckpointError(
                f"converting checkpoint {path} to a universal checkpoint failed: {error!r}"
            ) from error
        _write_text_atomically(scratch / marker.name, json.dumps(source_id))
        os.replace(scratch, target)
        logger.info("universal checkpoint written to %s (%.1f s)", target, time.perf_counter() - started)
        return str(target)

    @staticmethod
    def _load_universal(engine: Any, folder: Path) -> dict[str, Any]:
        # DeepSpeed reads this flag from its config at load time only; set it for this one load
        # so the caller need not know in advance whether the world size changed.
        config = engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            load_path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        finally:
            config.load_universal_checkpoint = previous
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load universal checkpoint {folder}")
        return client_state
