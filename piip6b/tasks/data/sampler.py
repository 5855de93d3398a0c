"""Samplers whose position is one integer.

Training reads one GLOBAL sample stream: epoch e is a permutation of the data set seeded by
seed + e, and the epochs follow each other without a gap. Global position p goes to rank
p % world_size, so with B samples per rank a step consumes positions [s*W*B, (s+1)*W*B) whatever
W is. The position is therefore the count of samples consumed by all ranks together: it resumes
exactly, costs nothing to skip to, and survives a change of world size. A data set whose size is
not a multiple of the world size simply wraps into the next epoch: nothing is duplicated or lost.

The training sampler yields `SampleKey`s: the data set index and the seed of that sample's
augmentation, derived from the run's seed and the global position. Augmentation is then a
function of the position alone, not of which loader worker drew it or how long that worker has
run: a resume is bit-exact with any number of workers, and the world size does not change what
the stream holds.

Evaluation uses `InferenceSampler`: rank r gets r, r+W, ...; ranks are padded to equal length
with indices >= len(dataset) (every forward is collective under ZeRO-3, so ranks must run the same
number of batches); the datasets return such indices as wrapped samples marked `is_padding`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from piip6b.seeding import derive_seed
from piip6b.tasks.data.common import SampleKey


class ResumableDistributedSampler(Sampler[SampleKey]):
    """Endless sampler over the global stream (the trainer stops by step count).
    `set_consumed(n)` before building the loader's iterator restarts at global position n."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"ResumableDistributedSampler needs a non-empty data set, got {num_samples} samples")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside world size {num_replicas}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.consumed = 0

    def set_consumed(self, global_samples: int) -> None:
        """Start the next iteration at this global position (samples consumed by all ranks)."""
        if global_samples < 0:
            raise ValueError(f"consumed sample count must be >= 0, got {global_samples}")
        self.consumed = int(global_samples)

    def epoch_of(self, global_samples: int) -> int:
        return global_samples // self.num_samples

    def order(self, epoch: int) -> torch.Tensor:
        """The data set order of `epoch` (identical on every rank and every world size)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def augmentation_seed(self, position: int) -> int:
        return derive_seed(self.seed, "augmentation", position)

    def __iter__(self) -> Iterator[SampleKey]:
        position = self.consumed + self.rank
        epoch, order = -1, None
        while True:
            if position // self.num_samples != epoch:
                epoch = position // self.num_samples
                order = self.order(epoch).tolist()
            yield SampleKey(order[position % self.num_samples], self.augmentation_seed(position))
            position += self.num_replicas


class InferenceSampler(Sampler[int]):
    """Rank r gets indices r, r+W, ... < ceil(N/W)*W; indices >= N are padding (see module doc)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside world size {num_replicas}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.per_rank = -(-num_samples // num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.per_rank * self.num_replicas, self.num_replicas))

    def __len__(self) -> int:
        return self.per_rank
