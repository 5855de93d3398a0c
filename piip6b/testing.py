"""Support for the tests and benchmarks (detectron2 keeps `utils/testing.py` for the same reason).

- The feature task: random images, a tiny backbone and a mean-square feature loss, i.e. the whole
  engine path (sharding, optimiser, checkpoints, metrics) without a detection or segmentation head.
- `tiny_experiment`: the config tree of a small run on that task.
- `run_ranks`: run a function on N local ranks, each a fresh process joined by env:// variables
  (as torchrun would start them), with a timeout; the caller judges what the ranks returned.
- Synthetic pretrained ViT files, and what loading them must produce.
- `small_filesystem` / `fill_filesystem`: a real file system that runs full (tmpfs; root only).
- Measuring a rank: the bytes it sends through each kind of collective (`CollectiveCounter`) and
  its resident memory over phases of a step (`RSSSampler`).

Nothing here is used by training itself.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from piip6b import dist

if TYPE_CHECKING:
    from piip6b.tasks.data.common import SampleKey

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ the feature task
class RandomImages(torch.utils.data.Dataset):
    """`n` images of `size`², each a deterministic function of its index (any order, any rank)."""

    def __init__(self, n: int, size: int, seed: int = 1000):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | SampleKey) -> torch.Tensor:
        # Imported here: the data package pulls in torchvision (and with it triton), which tests
        # that check what a bare `import piip6b.testing` loads must not see.
        from piip6b.tasks.data.common import sample_key

        index = sample_key(key).index
        return torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(self.seed + index))


class FeatureLoss(nn.Module):
    """Backbone + a linear head on the pooled last map; loss terms: the mean square of the pyramid
    and of the head's output (the head gives the optimiser a non-backbone parameter group)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, 4)
        self.calls = 0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        feats = self.backbone(batch["images"])
        pooled = feats[-1].float().mean(dim=(2, 3))
        head_out = F.linear(pooled, self.head.weight.float(), self.head.bias.float())
        return {"loss_feat": sum(f.float().pow(2).mean() for f in feats), "loss_head": head_out.pow(2).mean()}


class FeatureTask:
    """The `Task` protocol (piip6b.tasks.base) on `RandomImages`; no validation split."""

    name = "features"

    def __init__(self, n: int = 16, size: int = 64):
        self.n, self.size = n, size
        self.model: FeatureLoss | None = None

    def build_model(self, backbone: nn.Module) -> FeatureLoss:
        self.model = FeatureLoss(backbone)
        return self.model

    def build_dataset(self, split: str):
        return RandomImages(self.n, self.size) if split == "train" else None

    def collate(self, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack(samples)}

    eval_collate = collate  # no validation split; the protocol asks for one


def tiny_experiment(run_dir: str | Path, **sections: Any) -> dict:
    """The config tree (for `build_dataclass(ExperimentConfig, ...)`) of a 6-step ZeRO-3 bf16 run
    of the tiny PIIP-H6B on the feature task; `sections` update the named sections key by key."""
    cfg: dict[str, Any] = {
        "name": "tiny", "run_dir": str(run_dir), "seed": 3, "task": "detection",
        "model": {"preset": "piip_h6b_tiny", "img_sizes": [32, 64]},
        "data": {"batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "layer_decay": 0.9, "clip_grad_norm": 1.0},
        "schedule": {"policy": "constant", "max_iters": 6, "warmup_iters": 2},
        "engine": {"zero_stage": 3, "bf16": True},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "logging": {"interval": 1, "print_groups": True},
        "evaluation": {"at_end": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def train_feature_task(tree: dict, n: int = 16) -> int:
    """One rank of `piip6b.train.train` on the feature task (a `run_ranks` target)."""
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, tree)
    return train(cfg, task=FeatureTask(n=n, size=max(cfg.model.img_sizes)))


# ------------------------------------------------------------------------------ running ranks
def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a CPU child process: one thread (ranks share the cores), DeepSpeed's CPU
    accelerator with this checkout's op cache, the checkout importable, and no env:// rank
    variables inherited from the caller (`extra` may set them, and anything else)."""
    env = {key: value for key, value in os.environ.items() if key not in dist.ENV_VARS}
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(paths),
               PYTHONWARNINGS="ignore::FutureWarning")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


@dataclass
class RanksResult:
    returncodes: list[int]  # per rank: 0, 1 (an exception), or negative (killed: the timeout)
    results: list[Any]  # per rank: what the function returned (JSON), None if it did not return
    logs: list[str]  # per rank: stdout and stderr
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.returncodes)

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-chars:]}"
                         for r, (c, log) in enumerate(zip(self.returncodes, self.logs)))

    def check(self) -> list[Any]:
        """The ranks' results; AssertionError with every rank's log tail unless all returned."""
        assert self.ok, ("timed out\n" if self.timed_out else "") + self.tails()
        return self.results


def run_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2, timeout: float = 240,
              env: dict[str, str] | None = None) -> RanksResult:
    """Run `fn(*args)` on `nproc` local ranks and wait (at most `timeout` s, then kill them all).

    `fn` must be a module-level function (its module is imported afresh in each rank, by name, or
    from its file) and `args` and its return value JSON data. Each rank is a new interpreter with
    RANK/WORLD_SIZE/MASTER_* set as torchrun sets them; `fn` joins the group itself (e.g. through
    `piip6b.engine.distributed.init_distributed`, or `piip6b.train.train`).
    """
    module = sys.modules[fn.__module__]
    port = dist.free_port()
    with tempfile.TemporaryDirectory(prefix="piip6b_ranks_") as tmp:
        procs, outs = [], []
        for rank in range(nproc):
            out = Path(tmp) / f"rank{rank}.json"
            log = open(Path(tmp) / f"rank{rank}.log", "w")
            rank_env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                 LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                 **(env or {}))
            cmd = [sys.executable, "-m", "piip6b.testing", fn.__module__, getattr(module, "__file__", "") or "",
                   fn.__qualname__, json.dumps(list(args)), str(out)]
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
            log.close()
            outs.append(out)
        deadline = time.monotonic() + timeout
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results = [json.loads(out.read_text()) if out.is_file() else None for out in outs]
        logs = [(Path(tmp) / f"rank{rank}.log").read_text(errors="replace") for rank in range(nproc)]
    return RanksResult([p.returncode for p in procs], results, logs, timed_out)


def _import(module_name: str, file: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError:
        if not file:
            raise
    # A test module: importable by its file's folder (pytest's rootdir-relative import rule).
    sys.path.insert(0, str(Path(file).parent))
    return importlib.import_module(module_name)


def _rank_main(argv: list[str]) -> int:
    module_name, file, qualname, args, out = argv
    fn: Any = _import(module_name, file)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    result = fn(*json.loads(args))
    Path(out).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------ a full disk
@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """A private tmpfs of `size_bytes` at `mount_point` for the duration (a real file system that
    fills up and answers ENOSPC, as a cluster's scratch does). Needs root (CAP_SYS_ADMIN): raises
    PermissionError saying so when mounting is not allowed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs at {mount_point} (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)


def fill_filesystem(folder: Path, leave_bytes: int = 0) -> Path:
    """Write `folder/filler` until about `leave_bytes` are left free (to the file system's block);
    returns the filler, whose removal gives the space back."""
    filler = folder / "filler"
    block = os.statvfs(folder).f_frsize
    with open(filler, "ab") as handle:
        while (free := shutil.disk_usage(folder).free) > leave_bytes:
            try:
                handle.write(bytes(max(block, min(free - leave_bytes, 1 << 20))))
                handle.flush()
            except OSError:  # ENOSPC: full to the last block
                break
    return filler


# ------------------------------------------------------------------------------ pretrained files
# The synthetic "pretraining" position grid; the tiny presets' own grid is 4, so loading resizes.
PRETRAIN_GRID = 5


def branch_shapes(model: nn.Module, prefix: str) -> dict[str, torch.Size]:
    """Shapes of one branch's state dict (names relative to `prefix`, e.g. "branch1.")."""
    return {k[len(prefix):]: v.shape for k, v in model.state_dict().items() if k.startswith(prefix)}


def pretrained_vit(shapes: dict[str, torch.Size], *, cls_slot: bool, kernel: int = 14, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for one branch in timm/InternVL names, at 'pretraining' resolution (patch
    `kernel`, a PRETRAIN_GRID² position grid, with or without a cls slot)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "pos_embed":
            shape = (1, int(cls_slot) + PRETRAIN_GRID * PRETRAIN_GRID, shape[-1])
        elif name == "patch_embed.proj.weight":
            shape = (shape[0], 3, kernel, kernel)
        out[name] = torch.randn(shape, generator=g)
    return out


def expected_pos_embed(src: torch.Tensor, dst_tokens: int) -> torch.Tensor:
    """What loading must make of a pretrained position table, computed the plain way: bicubic grid
    resize, cls slot kept iff the target has one."""
    dim = src.shape[-1]
    src_cls = src.shape[1] != PRETRAIN_GRID * PRETRAIN_GRID
    grid = src[:, int(src_cls):].reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, dim).permute(0, 3, 1, 2)
    side_with_cls = int((dst_tokens - 1) ** 0.5)
    side = side_with_cls if side_with_cls ** 2 == dst_tokens - 1 else int(dst_tokens ** 0.5)
    dst_cls = side * side != dst_tokens
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return torch.cat([src[:, :1], grid], 1) if dst_cls else grid


def expected_branch(sd: dict[str, torch.Tensor], model_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The branch's state dict that loading the pretrained `sd` must produce."""
    exp = {}
    for name, shape in model_shapes.items():
        if name == "pos_embed":
            exp[name] = expected_pos_embed(sd[name], shape[1])
        elif name == "patch_embed.proj.weight":
            exp[name] = F.interpolate(sd[name], size=shape[2:], mode="bicubic", align_corners=False)
        elif name in sd:
            exp[name] = sd[name]
        else:
            assert re.fullmatch(r"blocks\.\d+\.(ls[12]\.gamma|gamma_[12])", name), name
            exp[name] = torch.ones(shape)
    return exp


# ------------------------------------------------------------------------------ measuring a rank
# Collectives by kind, with the argument (by position in torch's signature) whose bytes are the
# collective's payload: the whole tensor an all-gather assembles or a reduce-scatter reduces, the
# tensor an all-reduce, reduce or broadcast carries. Several names reach the same kernel (the
# deprecated `all_gather_into_tensor` calls `all_gather_single` in torch 2.14, not in 2.11); only
# the outermost wrapped call on a thread counts, so every version counts each collective once.
_COLLECTIVES: dict[str, tuple[str, int]] = {
    "all_gather_single": ("all_gather", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "all_gather": ("all_gather", 0),
    "all_gather_coalesced": ("all_gather", 0),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter": ("reduce_scatter", 1),
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "reduce": ("reduce", 0),
    "broadcast": ("broadcast", 0),
    "all_to_all_single": ("all_to_all", 1),
}


def _payload_bytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 0


class CollectiveCounter:
    """Bytes and calls per collective kind that this process issues through `torch.distributed`.

    Counted at torch's own functions, under whatever calls them (DeepSpeed's ZeRO partitioning and
    optimizers, `piip6b.dist`), with one convention for every kind: the payload is the whole
    tensor the collective assembles (all-gather) or reduces (reduce-scatter, all-reduce, reduce),
    or the one it sends (broadcast). A ring moves (N-1)/N of that per rank for an all-gather or a
    reduce-scatter, twice that for an all-reduce.

    DeepSpeed's `comms_logger` was the other candidate; it sees only calls made through
    `deepspeed.comm`, records the first tensor argument (the shard, for a reduce-scatter) and
    synchronises the device after every op. `install()` must run before DeepSpeed creates its
    communication backend, which keeps references to torch's functions.
    """

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._local = threading.local()
        self._originals: list[tuple[Any, str, Callable]] = []

    def install(self) -> CollectiveCounter:
        import inspect

        import torch.distributed as torch_dist
        from torch.distributed import distributed_c10d

        for name, (kind, position) in _COLLECTIVES.items():
            original = getattr(distributed_c10d, name, None)
            if original is None:
                continue
            parameter = list(inspect.signature(original).parameters)[position]
            wrapper = self._wrap(original, kind, position, parameter)
            for namespace in (distributed_c10d, torch_dist):
                if getattr(namespace, name, None) is original:
                    self._originals.append((namespace, name, original))
                    setattr(namespace, name, wrapper)
        return self

    def uninstall(self) -> None:
        for namespace, name, original in reversed(self._originals):
            setattr(namespace, name, original)
        self._originals.clear()

    def _wrap(self, original: Callable, kind: str, position: int, parameter: str) -> Callable:
        import functools

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "inside", False):
                return original(*args, **kwargs)
            payload = args[position] if len(args) > position else kwargs.get(parameter)
            self.bytes[kind] += _payload_bytes(payload)
            self.calls[kind] += 1
            self._local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self._local.inside = False

        return counted

    def snapshot(self) -> dict[str, int]:
        """Bytes per kind so far (a copy; subtract two snapshots for one step's figures)."""
        return dict(self.bytes)


class RSSSampler:
    """Peak resident set size of this process per named phase, sampled by a thread.

    `ru_maxrss` only knows the peak of the whole life, and `tracemalloc` does not see torch's
    allocations; sampling every `interval_s` catches any peak that lasts longer than that (an
    optimizer temporary of a few hundred MB lives for tens of milliseconds on a CPU). `phase(name)`
    starts a new phase; `peaks` maps each phase to the highest RSS seen while it ran.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._current = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _record(self) -> None:
        value = self.rss()
        with self._lock:
            if value > self.peaks.get(self._current, 0):
                self.peaks[self._current] = value

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval_s)

    def start(self) -> RSSSampler:
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        self._record()  # the old phase's last value, then the new phase's first
        with self._lock:
            self._current = name
        self._record()

    def stop(self) -> dict[str, int]:
        self._record()
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
