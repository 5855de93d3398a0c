"""Sharded, atomic, resumable training checkpoints on top of DeepSpeed's own format.

Layout under `<run_dir>/checkpoints/`::

    step_00001000/              one DeepSpeed tag: model/optimizer shards of every rank
        *_model_states.pt, *_optim_states.pt
        rng/rank_00000.pt ...   every rank's own RNG streams (plain data)
        model_shapes.json       the model's parameter names and shapes (refuses another model)
        manifest.json           written last, by rank 0, once every rank has written and hashed
    latest                      name of the newest complete tag (replaced by rename)
    universal/step_00001000/    a DeepSpeed universal copy, made when resuming on another world size
    abandoned/                  checkpoints newer than an explicit resume point, set aside

and `<run_dir>/finished.json`, written once the run has trained to its end (and evaluated, when it
evaluates at the end): a restart of a finished run does nothing.

A checkpoint *is* complete exactly when its manifest exists and every file it lists is present
with the recorded size; it *verifies* when, in addition, every file's SHA-256 equals the one its
writer recorded (each rank hashes the files it wrote, in parallel, before the manifest is written;
on resume each rank re-hashes its share). Everything else (a crash or preemption during the write,
a truncated or overwritten shard) is reported in one line and skipped when resuming
automatically, and is an error when named explicitly.

Every `torch.load` of a checkpoint (ours and DeepSpeed's, including the universal conversion)
runs with torch's weights-only unpickler: tensors and plain data only, never code.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import functools
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import piip6b
from piip6b import dist
from piip6b.engine.rng import LEGACY_NUMPY_GLOBALS, capture_rng_state, restore_rng_state
from piip6b.seeding import derive_seed, seed_everything

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
MODEL_SHAPES_NAME = "model_shapes.json"
FINISHED_NAME = "finished.json"
CHECKPOINTS_SUBDIR = "checkpoints"
UNIVERSAL_SUBDIR = "universal"
ABANDONED_SUBDIR = "abandoned"
RNG_SUBDIR = "rng"
# 2: every file's SHA-256 in `checksums`. Format 1 manifests (sizes only) are still read.
MANIFEST_FORMAT = 2
READABLE_MANIFEST_FORMATS = (1, 2)
# SHA-256 rather than a CRC: `sha256sum` checks a file by hand, and with the CPU's SHA extensions it
# costs about as much as zlib's CRC-32 (BENCHMARKS.md, "Checkpoint checksums").
HASH_NAME = "sha256"
_TAG_RE = re.compile(r"^step_(\d+)$")
# The rank that wrote a file, from DeepSpeed's shard names and our RNG files; other files
# (rank 0's shared ones) are rank 0's.
_WRITER_RE = re.compile(r"(?:zero_pp_rank_|^rng/rank_)0*(\d+)")
# A checkpoint's size when there is no earlier one to measure: ZeRO keeps an fp32 master copy and
# AdamW's two fp32 moments of every trainable parameter (12 bytes) beside the bf16/fp32 weights.
_BYTES_PER_TRAINABLE_PARAMETER = 12
_BYTES_PER_PARAMETER = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


class CheckpointSpaceError(CheckpointError):
    """The file system of the run dir has no room for a checkpoint."""


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
    """What a complete checkpoint promises: who wrote it and every file with its size and hash."""

    tag: str
    step: int
    world_size: int
    zero_stage: int
    files: dict[str, int]  # path relative to the checkpoint folder -> size in bytes
    config_hash: str | None
    code_version: str
    created: str
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # "model": {"preset", "task"} of the run
    checksums: dict[str, str] = field(default_factory=dict)  # path -> SHA-256 hex digest (format 2)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") not in READABLE_MANIFEST_FORMATS:
            raise ValueError(f"unknown manifest format {data.get('format') if isinstance(data, dict) else data!r}")
        return cls(**data)


@dataclass(frozen=True)
class FinishedRun:
    """`finished.json`: the run trained to its last step, saved it, and evaluated it if asked to."""

    step: int
    checkpoint: str  # the final checkpoint's tag
    consumed_samples: int
    evaluated: bool
    metrics: dict[str, float | None]  # None: not applicable (see piip6b.tasks.evaluation.results)
    finished_at: str

    def describe(self, run_dir: Path) -> str:
        how = "evaluated: " + ", ".join(f"{k} {v:.4g}" for k, v in list(self.metrics.items())[:4]) \
            if self.metrics else ("evaluated" if self.evaluated else "not evaluated")
        return (f"run already finished at step {self.step} (checkpoint "
                f"{run_dir / CHECKPOINTS_SUBDIR / self.checkpoint}, {how}; {self.finished_at}): nothing to do")


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
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in hashlib's own buffered loop."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, HASH_NAME).hexdigest()


def _writer_rank(name: str, world_size: int) -> int:
    """The rank that hashes `name`: the one that wrote it (its pages are still in that node's
    cache), modulo the current world size when checking a checkpoint of another world size."""
    match = _WRITER_RE.search(name)
    return int(match.group(1)) % world_size if match else 0


def _step_of(path: Path) -> int | None:
    match = _TAG_RE.match(path.name)
    return int(match.group(1)) if match else None


def _candidates_in(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder in `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), key=lambda sp: sp[0], reverse=True)


def existing_ancestor(path: str | os.PathLike) -> Path:
    """`path` if it exists, else its nearest existing parent: where a folder not yet created would
    live (its file system, its permissions)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = existing_ancestor(path.resolve())
    while not os.path.ismount(path):
        path = path.parent
    return path


def format_size(nbytes: float) -> str:
    """Bytes for a message: GB from one GB up, MB below (a tiny model's checkpoint is not 0.0 GB)."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _space_message(path: Path, needed: int) -> str:
    """"the file system of /x (mounted at /): 1.2 GB free of 100.0 GB; the checkpoint needs about 2.0 GB"."""
    existing = existing_ancestor(path)
    usage = shutil.disk_usage(existing)
    return (f"the file system of {path} (mounted at {_mount_point(existing)}) has {format_size(usage.free)} free of "
            f"{format_size(usage.total)}; the checkpoint needs about {format_size(needed)}")


def model_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter's name and full shape (ZeRO-3 partitions report their whole shape)."""
    return {name: list(dist.full_shape(p)) for name, p in module.named_parameters()}


def _shape_difference(saved: Mapping[str, list[int]], built: Mapping[str, list[int]]) -> str | None:
    """What differs between two `model_shapes` (None when nothing does), in a few words."""
    missing = [n for n in saved if n not in built]
    new = [n for n in built if n not in saved]
    reshaped = [n for n in saved if n in built and list(saved[n]) != list(built[n])]
    if not (missing or new or reshaped):
        return None
    parts = []
    if reshaped:
        name = reshaped[0]
        parts.append(f"{len(reshaped)} parameter(s) have other shapes (e.g. {name}: {list(saved[name])} in the "
                     f"checkpoint, {list(built[name])} here)")
    if missing:
        parts.append(f"{len(missing)} of its parameters do not exist here (e.g. {missing[0]})")
    if new:
        parts.append(f"{len(new)} parameters here are not in it (e.g. {new[0]})")
    return "; ".join(parts)


# DeepSpeed classes its ZeRO optimizer states pickle, allowed in weights-only loads: an enum and the
# bf16/fp16 loss scalers (attribute bags, restored by setting attributes; no code runs).
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside reads tensors and plain data only, even where DeepSpeed 0.19 asks
    for `weights_only=False` (its checkpoint engine, `zero_to_fp32`, `ds_to_universal`): torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides the caller's choice (the conversion's worker processes
    inherit it). A file that holds anything else fails to load instead of running its code."""
    variable = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(variable)
    os.environ[variable] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous


def _refused(path: Path, what: str, error: Exception) -> CheckpointError:
    reason = str(error).strip().splitlines()
    detail = next((line.strip() for line in reason if "Unsupported global" in line or "GLOBAL" in line), reason[0] if reason else "")
    return CheckpointError(
        f"checkpoint {path}: {what} holds more than tensors and plain data, so it was not loaded "
        f"(a file piip6b did not write, or one changed since: {detail[:200]}). Restore the checkpoint "
        "from a trusted copy, or resume from another one"
    )


def load_rng_file(path: Path) -> dict[str, Any]:
    """A rank's RNG state file, read with the weights-only unpickler (NumPy arrays allowed for the
    files written before the states were tensors)."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refused(path.parent.parent, f"{path.parent.name}/{path.name}", error) from error


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run.

    save / verify / find_resume / load / ensure_space are collective (every rank calls them; rank 0
    decides and writes the shared files); validate / complete_checkpoints are local and need no
    process group.

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
        Raises CheckpointSpaceError before writing when the file system has no room for it, and
        a one-line CheckpointError when a write fails.
        """
        rank, world = dist.rank(), dist.world_size()
        tag = tag_for_step(step)
        path = self.root / tag
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        already_complete = dist.on_main(lambda: self._prepare_folder(path))
        if already_complete:
            return path
        expected = self.ensure_space(self.expected_size(engine), f"checkpoint {tag}")

        started = time.perf_counter()
        state = dict(client_state)
        state.update(step=step, world_size=world, code_version=code_version())
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False)
            rng_dir = path / RNG_SUBDIR
            rng_dir.mkdir(parents=True, exist_ok=True)
            torch.save(capture_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
            if rank == 0:
                (path / MODEL_SHAPES_NAME).write_text(json.dumps(model_shapes(engine.module), indent=0))
            written = self._hash_own_files(path, rank, world)
        except Exception as error:  # noqa: BLE001 - any failure to write is one line about the checkpoint
            raise self._write_failure(path, expected, error) from error
        # The manifest may only vouch for files that every rank has finished writing and hashing.
        every_rank = dist.gather_to_main(written)
        if rank == 0:
            files = {name: size for share in every_rank for name, (size, _) in share.items()}
            manifest = Manifest(
                tag=tag,
                step=step,
                world_size=world,
                zero_stage=int(engine.zero_optimization_stage()),
                files=dict(sorted(files.items())),
                config_hash=state.get("config_hash"),
                code_version=code_version(),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                extra=_model_description(state.get("config")),
                checksums={name: digest for share in every_rank for name, (_, digest) in sorted(share.items())},
            )
            try:
                _write_text_atomically(path / MANIFEST_NAME, manifest.to_json())
                _write_text_atomically(self.root / LATEST_NAME, tag + "\n")
            except OSError as error:
                raise self._write_failure(path, expected, error) from error
            logger.info(
                "saved checkpoint %s (%d files, %s, %.1f s with checksums)",
                path, len(manifest.files), format_size(sum(manifest.files.values())), time.perf_counter() - started,
            )
            self._apply_retention(newest=step)
        # Nobody leaves (e.g. exits after a preemption save) before the checkpoint is complete.
        dist.barrier()
        return path

    @staticmethod
    def _hash_own_files(path: Path, rank: int, world: int) -> dict[str, tuple[int, str]]:
        """(size, SHA-256) of the files of `path` this rank wrote (rank 0 also takes the unnamed
        ones). Each rank lists the folder itself: on a network file system its own files are the
        ones it is sure to see complete."""
        own = [name for name in _list_files(path) if _writer_rank(name, world) == rank]
        return {name: ((path / name).stat().st_size, file_digest(path / name)) for name in own}

    def _write_failure(self, path: Path, expected: int, error: BaseException) -> CheckpointError:
        """One line for a failed write on this rank: a full file system named as such, anything
        else with the error's own first line."""
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full:
            # torch.save reports a full disk as "basic_ios::clear: iostream error" or "file write
            # failed", without errno: judge by what is left on the file system.
            try:
                full = shutil.disk_usage(self.root).free < max(expected // 100, 64 * 2**20)
            except OSError:
                pass
        newest = self._newest_complete()
        resume = f"the run resumes from {newest[0].name}" if newest else "the run starts again from step 0"
        if full:
            return CheckpointSpaceError(
                f"writing checkpoint {path} failed, the disk is full: {_space_message(self.root, expected)}. "
                f"Free space there (old runs, {self.root / ABANDONED_SUBDIR}, or a lower checkpoint.keep_last, "
                f"now {self.keep_last}) and submit again: {resume} (the partial {path.name} is deleted then)"
            )
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        return CheckpointError(
            f"writing checkpoint {path} failed on rank {dist.rank()}: {type(error).__name__}: {first_line}. "
            f"On a restart {resume}"
        )

    def expected_size(self, engine: Any) -> int:
        """Bytes the next checkpoint will take: the newest complete one's size, else an estimate
        from the parameter count (`_BYTES_PER_TRAINABLE_PARAMETER`). Collective (rank 0 decides)."""

        def measure() -> int:
            newest = self._newest_complete()
            return sum(newest[1].files.values()) if newest else 0

        measured = dist.on_main(measure)
        if measured:
            return measured
        trainable = sum(dist.full_numel(p) for p in engine.module.parameters() if p.requires_grad)
        total = sum(dist.full_numel(p) for p in engine.module.parameters())
        return _BYTES_PER_TRAINABLE_PARAMETER * trainable + _BYTES_PER_PARAMETER * total

    def ensure_space(self, needed: int, what: str = "the next checkpoint") -> int:
        """Raise CheckpointSpaceError on every rank when the run dir's file system has less than
        `needed` bytes free for `what`; returns `needed`. Collective."""

        def check() -> int:
            if shutil.disk_usage(existing_ancestor(self.root)).free < needed:
                newest = self._newest_complete()
                resume = f"resumes from {newest[0].name}" if newest else "starts again from step 0"
                raise CheckpointSpaceError(
                    f"no room for {what} in {self.root}: {_space_message(self.root, needed)}. "
                    f"Free space there (old runs, {self.root / ABANDONED_SUBDIR}, or a lower checkpoint.keep_last, "
                    f"now {self.keep_last}) and submit again: the run {resume}"
                )
            return needed

        return dist.on_main(check)

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
        """The manifest of a complete checkpoint folder, or CheckpointError saying what is wrong.
        Sizes only: `verify` also checks every file's contents."""
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

    def verify(self, path: str | os.PathLike) -> str | None:
        """Why checkpoint `path` cannot be resumed from (incomplete, or a file whose SHA-256 is not
        the one recorded when it was written), or None. Collective: each rank hashes its share
        (the files its rank number wrote), so the time is one rank's share, not the whole."""
        path = Path(path)

        def sizes() -> Manifest | str:
            try:
                return self.validate(path)
            except CheckpointError as error:
                return str(error)

        manifest = dist.on_main(sizes)
        if isinstance(manifest, str):
            return manifest
        rank, world = dist.rank(), dist.world_size()
        problem = None
        for name, expected in manifest.checksums.items():
            if _writer_rank(name, world) != rank:
                continue
            try:
                actual = file_digest(path / name)
            except OSError as error:
                problem = f"checkpoint {path} is unreadable: {name}: {error}"
                break
            if actual != expected:
                problem = (f"checkpoint {path} is corrupt: {name} has {HASH_NAME} {actual[:12]}…, the manifest "
                           f"recorded {expected[:12]}… (changed on disk since it was written)")
                break
        problems = dist.gather_to_main(problem)
        return dist.broadcast_from_main(next((p for p in problems if p), None) if problems is not None else None)

    def _newest_complete(self) -> tuple[Path, Manifest] | None:
        """The newest complete checkpoint and its manifest, or None (rank-local)."""
        for _, path in self._candidates():
            try:
                return path, self.validate(path)
            except CheckpointError:
                continue
        return None

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
        dir meaning its newest usable one), else the newest of this run that verifies, else None.
        Every checkpoint passed over gets one warning line saying why. Collective.

        Anything wrong with an explicit checkpoint folder raises CheckpointError: asking for a
        checkpoint and silently training from scratch would waste the whole allocation.
        """
        if explicit is None:
            return self._newest_verified(self.root)
        chosen, root = dist.on_main(lambda: self._resolve_explicit(Path(explicit)))
        if root is not None:
            chosen = self._newest_verified(root)
            if chosen is None:
                raise CheckpointError(f"checkpoint path {explicit}: it holds no complete checkpoint that verifies "
                                      "(see the warnings above)")
        else:
            problem = self.verify(chosen)
            if problem is not None:
                raise CheckpointError(problem)
        return dist.on_main(lambda: self._warn_if_newer(chosen))

    def _newest_verified(self, root: Path) -> Path | None:
        for path in dist.on_main(lambda: [p for _, p in _candidates_in(root)]):
            problem = self.verify(path)
            if problem is None:
                return path
            if dist.is_main():
                logger.warning("skipping checkpoint: %s", problem)
        return None

    def _warn_if_newer(self, chosen: Path) -> Path:
        step = _step_of(chosen)
        newer = [p.name for p in self.complete_checkpoints() if step is not None and _step_of(p) > step]
        if newer:
            logger.warning("resuming from %s although this run dir has newer complete checkpoints %s: "
                           "they will be set aside, not deleted", chosen, newer)
        return chosen

    def set_aside_newer_than(self, step: int) -> None:
        """Make room for this run's line of training after `step` (the one it resumes from; 0 for
        a fresh start). Checkpoints newer than it belong to a line this run does not continue:
        left in place, a save at the same step would find them "already complete" and skip
        writing, and retention would count them and delete the new ones. Complete (or corrupt)
        ones move to `checkpoints/abandoned/`; unfinished ones (no manifest: a save that was cut
        short, e.g. by a full disk) can never be loaded and are deleted, which gives their space
        back. Collective.

        Nothing here needs free space (a rename within the run's file system, or a delete), and a
        rename that fails anyway falls back to renaming in place; only a checkpoint that can be
        neither moved nor renamed stops the run (CheckpointError), rather than risk it."""

        def clear() -> None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            newer = [path for other, path in _candidates_in(self.root) if other > step]
            for path in [p for p in newer if not (p / MANIFEST_NAME).exists()]:
                logger.warning("deleting unfinished checkpoint %s (no %s: its save was cut short; nothing in it "
                               "can be loaded)", path, MANIFEST_NAME)
                shutil.rmtree(path, ignore_errors=True)
            for path in [p for p in newer if p.exists()]:
                target = self.root / ABANDONED_SUBDIR / f"{path.name}-{stamp}"
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
                except OSError as error:
                    target = path.with_name(f".{path.name}-abandoned-{stamp}")  # not a step_* name any more
                    try:
                        os.replace(path, target)
                    except OSError:
                        raise CheckpointError(
                            f"cannot set aside {path} (newer than the resume point, step {step}): {error}. "
                            f"Move it out of {self.root} by hand and submit again"
                        ) from error
                logger.warning("set aside %s (newer than the resume point, step %d) as %s", path, step, target)

        dist.on_main(clear)

    @classmethod
    def _resolve_explicit(cls, path: Path) -> tuple[Path | None, Path | None]:
        """(checkpoint folder, None) for a folder that is one; (None, folder of step_* folders) for
        a run or checkpoints dir."""
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path}: no such file or directory")
        if (path / MANIFEST_NAME).exists() or _step_of(path) is not None:
            cls.validate(path)
            return path, None
        for root in (path / CHECKPOINTS_SUBDIR, path):
            if root.is_dir() and any(_step_of(p) is not None for p in root.iterdir()):
                return None, root
        raise CheckpointError(
            f"checkpoint path {path}: not a checkpoint folder (no {MANIFEST_NAME}) and no step_* "
            f"checkpoints inside it or its {CHECKPOINTS_SUBDIR}/ folder"
        )

    def ensure_same_model(self, path: Path, preset: str, task: str) -> None:
        """Refuse, before any model is built, a checkpoint of another model (preset or task), as
        its manifest records it. Collective."""

        def check() -> None:
            recorded = self.validate(path).extra.get("model") or {}
            differs = [f"{key} {recorded[key]!r} (this run: {value!r})"
                       for key, value in (("preset", preset), ("task", task))
                       if key in recorded and recorded[key] != value]
            if differs:
                raise CheckpointError(
                    f"checkpoint {path} holds another model: {', '.join(differs)}. Resuming continues the "
                    "same model; start this one from pretrained weights (model.pretrained) or use a "
                    "checkpoint of this preset"
                )

        dist.on_main(check)

    # ------------------------------------------------------------------ finished runs
    @property
    def finished_path(self) -> Path:
        return self.run_dir / FINISHED_NAME

    def mark_finished(self, record: FinishedRun) -> None:
        """Rank 0 writes `finished.json` atomically; collective."""
        dist.on_main(lambda: _write_text_atomically(self.finished_path, json.dumps(asdict(record), indent=1)))

    def finished(self) -> FinishedRun | None:
        """The run's `finished.json` while it still describes the run: its final checkpoint is
        complete and nothing newer was trained since. Collective."""

        def read() -> FinishedRun | None:
            try:
                record = FinishedRun(**json.loads(self.finished_path.read_text()))
            except FileNotFoundError:
                return None
            except (ValueError, TypeError) as error:
                logger.warning("ignoring unreadable %s: %s", self.finished_path, error)
                return None
            final = self.root / record.checkpoint
            newest = next(iter(_candidates_in(self.root)), (None, None))[1]
            try:
                self.validate(final)
            except CheckpointError as error:
                logger.warning("%s names a checkpoint that is gone or damaged; resuming normally: %s",
                               self.finished_path, error)
                return None
            return record if newest == final else None

        return dist.on_main(read)

    # ------------------------------------------------------------------ load
    def load(self, engine: Any, path: str | os.PathLike, expected_config_hash: str | None = None) -> dict[str, Any]:
        """Load `path` into `engine` on every rank and restore RNG states; returns the client state.

        A checkpoint of another model (parameter names or shapes) is refused in one line before
        anything is converted or loaded. One written by a different number of ranks (or ZeRO
        stage) is first converted to DeepSpeed's universal format by rank 0 into
        `checkpoints/universal/<tag>`.
        """
        path = Path(path)
        rank, world = dist.rank(), dist.world_size()
        manifest = dist.on_main(lambda: self.validate(path))
        self._ensure_same_shapes(path, manifest, engine.module)
        if expected_config_hash is not None and manifest.config_hash not in (None, expected_config_hash):
            if rank == 0:
                logger.warning(
                    "checkpoint %s was written with config hash %s, this run's is %s: resuming with "
                    "the new config", path, manifest.config_hash, expected_config_hash,
                )
        zero_stage = int(engine.zero_optimization_stage())
        universal = manifest.world_size != world or manifest.zero_stage != zero_stage
        with weights_only_loads():
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
                try:
                    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
                except pickle.UnpicklingError as error:
                    raise _refused(path, "a DeepSpeed shard", error) from error
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
            restore_rng_state(load_rng_file(rng_file))
        if rank == 0:
            logger.info("resumed from %s at step %d", path, manifest.step)
        client_state.setdefault("step", manifest.step)
        return client_state

    def _ensure_same_shapes(self, path: Path, manifest: Manifest, module: torch.nn.Module) -> None:
        if MODEL_SHAPES_NAME not in manifest.files:
            return  # written before checkpoints recorded shapes: DeepSpeed's own check decides
        built = model_shapes(module)

        def compare() -> None:
            saved = json.loads((path / MODEL_SHAPES_NAME).read_text())
            difference = _shape_difference(saved, built)
            if difference:
                raise CheckpointError(
                    f"checkpoint {path} holds another model than this run builds: {difference}. Resuming "
                    "continues the same model; start this one from pretrained weights (model.pretrained) "
                    "or use a checkpoint of this model"
                )

        dist.on_main(compare)

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
        except pickle.UnpicklingError as error:
            raise _refused(folder, "a DeepSpeed universal shard", error) from error
        finally:
            config.load_universal_checkpoint = previous
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load universal checkpoint {folder}")
        return client_state


def _model_description(config: Any) -> dict[str, Any]:
    """The manifest's record of which model a run trains (from the config stored in the client
    state), for `ensure_same_model`."""
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return {}
    return {"model": {"preset": config["model"].get("preset"), "task": config.get("task")}}
