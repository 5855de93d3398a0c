"""What both datasets share: image decoding with errors that name the file, the bad-data policy,
and the per-sample stats that travel with the batch (so counts survive loader worker processes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

# Keys of the per-sample `stats` dict; the collate sums them into `batch["data_stats"]`.
STAT_KEYS = ("skipped_samples", "degenerate_boxes_dropped")


class DataError(ValueError):
    """A dataset file or annotation that cannot be used; the message names the file and id."""


class SampleKey(NamedTuple):
    """What the training sampler asks a data set for: which sample, and the seed of its
    augmentation (a function of the run's seed and the global sample position alone, so a sample
    is augmented alike whichever worker loads it, after any resume or worker restart)."""

    index: int
    seed: int


def sample_key(key: int | SampleKey) -> SampleKey:
    """A data set key as a SampleKey; a plain index (evaluation, direct access) gets a fixed seed
    of its own, so loading it never draws from, or moves, the caller's random streams."""
    if isinstance(key, tuple):
        return SampleKey(int(key[0]), int(key[1]))
    return SampleKey(int(key), int(key))


def resolve(root: str | Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB [3, H, W] with Pillow (torchvision.io's decoders are
    deprecated from 0.29 on); any failure becomes a DataError naming the file."""
    try:
        with PILImage.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
    except FileNotFoundError as exc:
        raise DataError(f"image {path} does not exist") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for corrupt/truncated files
        raise DataError(f"cannot decode image {path} (corrupt or not an image): {exc}") from exc
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def new_stats(**counts: int) -> dict[str, int]:
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats.update(counts)
    return stats


class BadDataPolicy:
    """Runs `load(index)`; on a DataError either re-raises (`error`) or logs it, counts it and
    moves on to the next index (`skip`), so batches keep their size. Eval-time substitutes are
    marked as padding so no metric counts them twice."""

    def __init__(self, policy: str, num_samples: int, max_consecutive: int = 64):
        if policy not in ("error", "skip"):
            raise ValueError(f"bad-data policy must be 'error' or 'skip', got {policy!r}")
        self.policy, self.num_samples, self.max_consecutive = policy, num_samples, max_consecutive

    def __call__(self, index: int, load: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        if self.policy == "error":
            return load(index)
        failures: list[str] = []
        for attempt in range(min(self.max_consecutive, self.num_samples)):
            candidate = (index + attempt) % self.num_samples
            try:
                sample = load(candidate)
            except DataError as exc:
                logger.warning("skipping sample %d (data.bad_data=skip): %s", candidate, exc)
                failures.append(str(exc))
                continue
            sample["stats"]["skipped_samples"] += len(failures)
            if failures:
                # Another sample stands in: training uses it, evaluation must not count it.
                sample["is_substitute"] = True
            return sample
        raise DataError(
            f"{len(failures)} consecutive samples from index {index} failed to load; the data set "
            f"looks broken rather than holding a few bad files. Last error: {failures[-1]}"
        )
