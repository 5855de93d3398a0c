"""Training metrics: TensorBoard events, a JSON-lines copy, a console line with ETA, MFU, memory.

Only rank 0 writes. The console line is a logging record (logger `piip6b.metrics`): it carries the
log's timestamp and lands in the run's `train.log` with everything else rank 0 logs. On every
start from step S (S = 0 too: a run killed before its first checkpoint starts again from 0),
TensorBoard's `purge_step` drops the events an earlier start wrote after S and `metrics.jsonl`
moves those rows to `metrics.superseded.jsonl`, so each tag is one continuous curve without
duplicated steps and nothing the earlier run wrote is lost (TensorBoard hides the purged events;
they stay in their event files). The metrics are bookkeeping: a file system that refuses the
writes (e.g. full) costs a warning, never the run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from piip6b.progress import format_duration

log = logging.getLogger(__name__)
console_log = logging.getLogger("piip6b.metrics")  # the console lines of logged rows


@dataclass
class LoggingConfig:
    interval: int = 10  # optimizer steps between logged rows
    tensorboard: bool = True
    console: bool = True
    print_groups: bool = True  # print the optimizer parameter-group table at start

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"logging.interval must be >= 1 (steps between logged rows), got {self.interval}")


# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity). Matched by substring of the
# CUDA device name, first match wins.
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("V100", 125e12),  # fp16 tensor cores; V100 has no bf16
)


def cpu_peak_flops(threads: int | None = None) -> float:
    """Nominal fp32 peak of the threads this rank uses: 2 AVX2 FMA units x 8 lanes x 2 FLOP/cycle.

    Only an order of magnitude, so that MFU exists (and is comparable run to run) on CPU test jobs.
    """
    threads = threads or torch.get_num_threads()
    ghz = 2.5
    try:
        import psutil

        freq = psutil.cpu_freq()
        if freq and freq.max:
            ghz = freq.max / 1000
    except Exception:  # cpu_freq is unavailable in some containers
        pass
    return threads * ghz * 1e9 * 32


def device_peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16_FLOPS:
            if key in name:
                return peak
        log.warning("no peak FLOP/s known for %r; MFU is reported against an A100's 312 TFLOP/s", name)
        return 312e12
    return cpu_peak_flops()


def memory_scalars(device: torch.device) -> dict[str, float]:
    """This rank's memory since the last `reset_peak_memory` (the logging window), in GiB.

    GPU: `memory/peak_gib` is the caching allocator's peak allocated, `memory/reserved_gib` its
    peak reserved (what it held from the driver), `memory/alloc_retries` and `memory/ooms` the
    counts since the process started of allocations that had to flush the cache and retry (a
    rising count means fragmentation: the step slows long before it runs out) and of OOMs.
    CPU: `memory/peak_gib` is the process's peak resident set since it started (Linux keeps no
    per-window peak for getrusage), `memory/reserved_gib` its resident set now.
    """
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {
            "memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "memory/alloc_retries": float(stats.get("num_alloc_retries", 0)),
            "memory/ooms": float(stats.get("num_ooms", 0)),
        }
    import psutil

    return {
        "memory/peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,  # Linux: KiB
        "memory/reserved_gib": psutil.Process().memory_info().rss / 2**30,
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for the peaks of `memory_scalars` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


class ThroughputWindow:
    """Time, images and device memory since the last logged row, turned into `perf/*` and
    `memory/*` scalars.

    The loop adds each forward's data-wait, forward+backward and optimizer time; `scalars()` at a
    logging step reports per-step means, images/s over all ranks and the achieved model FLOP/s per
    device (FLOPs of the forward+backward per image, recomputation not counted) with its MFU, and
    this rank's memory over the window (`memory_scalars`). Only the steps' own time is counted:
    an evaluation or a checkpoint between two rows changes neither the speed nor the ETA.
    """

    def __init__(self, world_size: int, flops_per_image: float, peak_flops: float, device: torch.device):
        self.world_size, self.flops_per_image, self.peak_flops = world_size, flops_per_image, peak_flops
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.data_s = self.fwd_bwd_s = self.optim_s = 0.0
        self.images = 0  # per rank
        self.steps = 0
        reset_peak_memory(self.device)

    def add(self, data_s: float, fwd_bwd_s: float, optim_s: float, images: int) -> None:
        self.data_s += data_s
        self.fwd_bwd_s += fwd_bwd_s
        self.optim_s += optim_s
        self.images += images

    def scalars(self) -> dict[str, float]:
        elapsed = max(self.data_s + self.fwd_bwd_s + self.optim_s, 1e-9)
        steps = max(self.steps, 1)
        achieved = self.flops_per_image * self.images / elapsed  # per device
        return {
            "perf/step_s": elapsed / steps,
            "perf/images_per_s": self.images * self.world_size / elapsed,
            "perf/data_s": self.data_s / steps,
            "perf/fwd_bwd_s": self.fwd_bwd_s / steps,
            "perf/optim_s": self.optim_s / steps,
            "perf/tflops_per_device": achieved / 1e12,
            "perf/mfu": achieved / self.peak_flops,
            **memory_scalars(self.device),
        }


class _FailSoft:
    """Forwards method calls to a writer; the first OSError (a full or vanished file system) becomes
    one warning and drops the writer: metrics are bookkeeping, and the run goes on to its next
    checkpoint, whose own space check names the problem."""

    def __init__(self, open_writer: Callable[[], Any], where: Path):
        self._writer, self._where = None, where
        self._writer = self._attempt(open_writer)  # opening writes too (TensorBoard's file header)

    def _attempt(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except OSError as error:
            log.warning("cannot write to %s (%s): no more metrics there in this run; training goes on",
                        self._where, error)
            self._writer = None
            return None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._writer is None:
                return None
            return self._attempt(lambda: getattr(self._writer, name)(*args, **kwargs))

        return call


class MetricsWriter:
    """Rank 0's sink for scalars: TensorBoard, `metrics.jsonl`, console. No-op on other ranks."""

    JSONL = "metrics.jsonl"
    SUPERSEDED = "metrics.superseded.jsonl"

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, is_main: bool, total_steps: int,
                 resume_step: int = 0):
        self.cfg = cfg
        self.enabled = is_main
        self.total_steps = total_steps
        self.run_dir = Path(run_dir)
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._trim_jsonl(resume_step)
        self._jsonl = _FailSoft(lambda: open(self.run_dir / self.JSONL, "a", buffering=1), self.run_dir / self.JSONL)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at steps > resume_step that an earlier start left behind.
            self._tb = _FailSoft(lambda: SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1),
                                 self.run_dir / "tb")

    def _trim_jsonl(self, resume_step: int) -> None:
        path = self.run_dir / self.JSONL
        if not path.exists():
            return
        keep, superseded = [], []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut by a crash mid-write
                superseded.append(line)
                continue
            (keep if int(row.get("step", 0)) <= resume_step else superseded).append(line)
        if not superseded:
            return
        tmp = path.with_suffix(".jsonl.tmp")
        try:
            with open(self.run_dir / self.SUPERSEDED, "a") as f:
                f.write("".join(s + "\n" for s in superseded))
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log.warning("could not move %d rows after step %d from %s to %s (%s): they stay there, "
                        "before this run's rows", len(superseded), resume_step, path, self.SUPERSEDED, error)

    def log(self, step: int, scalars: Mapping[str, float | None], details: Mapping[str, Any] | None = None) -> None:
        """One row at `step`: each scalar a TensorBoard curve, a `metrics.jsonl` field and part of
        the console line. None means "not applicable" (e.g. COCO's AP of a size no object has): no
        TensorBoard point, `null` in JSON, `n/a` on the console. `details` (JSON data, e.g. the
        per-class results) go into the JSON row only."""
        if not self.enabled:
            return
        clean = {k: None if v is None else float(v) for k, v in scalars.items()}
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(key, value, step)
        row = {"step": step, "time": time.time(), **clean, **(details or {})}
        self._jsonl.write(json.dumps(row) + "\n")
        if self.cfg.console:
            console_log.info("%s", self._console_line(step, clean))

    def log_text(self, step: int, tag: str, markdown: str, console_text: str | None = None) -> None:
        """A text entry in TensorBoard's Text tab (markdown: tables and fenced code render), and
        `console_text` (if given) on the console and in the log."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(tag, markdown, step)
        if console_text is not None:
            console_log.info("step %d %s:\n%s", step, tag, console_text)

    def _console_line(self, step: int, s: dict[str, float | None]) -> str:
        head = f"step {step}/{self.total_steps}"
        if "loss" not in s:  # an evaluation (or other non-training) row: print what it holds
            return " | ".join([head, *(f"{k} {_format_value(v)}" for k, v in s.items())])
        terms = ", ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in s.items() if k.startswith("loss/"))
        parts = [head, f"loss {s['loss']:.4f}" + (f" ({terms})" if terms else ""),
                 f"lr {s.get('lr', float('nan')):.3e}", f"gnorm {s.get('grad_norm', float('nan')):.3f}"]
        if "perf/step_s" in s:
            parts.append(f"{s['perf/step_s']:.3f} s/step (data {s['perf/data_s']:.3f} s)")
        if "perf/images_per_s" in s:
            parts.append(f"{s['perf/images_per_s']:.2f} img/s")
        if "perf/mfu" in s:
            parts.append(f"mfu {100 * s['perf/mfu']:.1f}%")
        if "memory/peak_gib" in s:
            memory = f"mem peak {s['memory/peak_gib']:.2f} GiB, reserved {s['memory/reserved_gib']:.2f} GiB"
            for key, name in (("memory/alloc_retries", "alloc retries"), ("memory/ooms", "OOMs")):
                if s.get(key):
                    memory += f", {name} {int(s[key])}"
            parts.append(memory)
        # The training steps' own time: evaluations and checkpoints between rows do not move it.
        eta = s["perf/step_s"] * (self.total_steps - step) if "perf/step_s" in s else float("nan")
        parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def log_images(self, step: int, images: list[tuple[str, torch.Tensor]]) -> None:
        if self.enabled and self._tb is not None:
            for tag, image in images:
                self._tb.add_image(tag, image, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
