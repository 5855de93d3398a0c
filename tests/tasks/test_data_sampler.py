"""ResumableDistributedSampler: one global stream, position = samples consumed by all ranks."""

from __future__ import annotations

import itertools

import pytest
import torch

from piip6b.tasks.data import DataConfig, InferenceSampler, ResumableDistributedSampler, build_dataloader
from piip6b.tasks.data.common import sample_key


def take(sampler, n):
    """The data set indices of the sampler's first `n` keys."""
    return [key.index for key in itertools.islice(iter(sampler), n)]


def global_stream(num_samples, world, seed, consumed, steps, batch):
    """What all ranks read in `steps` steps of `batch` per rank, in global order."""
    per_rank = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(num_samples, world, rank, seed=seed)
        sampler.set_consumed(consumed)
        per_rank.append(take(sampler, steps * batch))
    stream = []
    for step in range(steps):
        for i in range(batch):
            for rank in range(world):
                stream.append(per_rank[rank][step * batch + i])
    return stream, per_rank


@pytest.mark.parametrize("num_samples, world", [(10, 3), (12, 4), (7, 2), (5, 8)])
def test_each_epoch_is_a_permutation_split_across_ranks_without_dup_or_loss(num_samples, world):
    epochs = 3
    total = epochs * num_samples
    per_rank = [take(ResumableDistributedSampler(num_samples, world, r, seed=1), -(-total // world)) for r in range(world)]
    stream = [per_rank[p % world][p // world] for p in range(total)]
    for e in range(epochs):
        epoch = stream[e * num_samples : (e + 1) * num_samples]
        assert sorted(epoch) == list(range(num_samples))
    assert stream[:num_samples] != stream[num_samples : 2 * num_samples] or num_samples < 4  # reshuffled


def test_stream_is_independent_of_the_world_size():
    one, _ = global_stream(23, 1, seed=5, consumed=0, steps=24, batch=4)
    four, _ = global_stream(23, 4, seed=5, consumed=0, steps=6, batch=4)
    assert one == four


def test_resuming_at_a_position_equals_the_uninterrupted_run():
    full, _ = global_stream(17, 2, seed=3, consumed=0, steps=20, batch=3)
    resumed, _ = global_stream(17, 2, seed=3, consumed=7 * 2 * 3, steps=13, batch=3)
    assert resumed == full[7 * 2 * 3 :]


def test_world_size_change_two_to_one_continues_the_same_global_order():
    uninterrupted, _ = global_stream(11, 1, seed=9, consumed=0, steps=30, batch=2)
    before, _ = global_stream(11, 2, seed=9, consumed=0, steps=5, batch=2)  # 5 steps x 2 ranks x 2
    after, _ = global_stream(11, 1, seed=9, consumed=20, steps=20, batch=2)
    assert before + after == uninterrupted


def test_seed_changes_order_and_shuffle_off_is_sequential():
    assert take(ResumableDistributedSampler(50, 1, 0, seed=0), 50) != take(ResumableDistributedSampler(50, 1, 0, seed=1), 50)
    assert take(ResumableDistributedSampler(4, 2, 1, shuffle=False), 4) == [1, 3, 1, 3]


def test_far_position_costs_nothing():
    sampler = ResumableDistributedSampler(118_287, 512, 511, seed=0)
    sampler.set_consumed(16 * 90_000)
    index = next(iter(sampler)).index
    position = 16 * 90_000 + 511
    assert index == sampler.order(position // 118_287)[position % 118_287].item()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="rank 2"):
        ResumableDistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match="non-empty"):
        ResumableDistributedSampler(0, 1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        ResumableDistributedSampler(3).set_consumed(-1)


@pytest.mark.parametrize("num_samples, world", [(10, 3), (5, 8), (9, 3)])
def test_inference_sampler_covers_each_index_once_with_marked_padding(num_samples, world):
    shares = [list(InferenceSampler(num_samples, world, r)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same number of batches on every rank
    flat = sorted(i for s in shares for i in s)
    real = [i for i in flat if i < num_samples]
    assert real == list(range(num_samples))
    assert len(flat) - len(real) == len(shares[0]) * world - num_samples


class _IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 13

    def __getitem__(self, key):
        return sample_key(key).index


def test_loader_resumes_from_consumed_samples():
    cfg = DataConfig(batch_size=2, num_workers=0)
    ds = _IndexDataset()

    def batches(consumed, rank, n):
        loader = build_dataloader(ds, cfg, torch.utils.data.default_collate, train=True, rank=rank, world_size=2,
                                  seed=4, consumed_samples=consumed)
        return [b.tolist() for b in itertools.islice(iter(loader), n)]

    full = [batches(0, r, 8) for r in range(2)]
    resumed = [batches(3 * 4, r, 5) for r in range(2)]  # 3 steps x 2 ranks x 2
    assert [full[r][3:] for r in range(2)] == resumed


def test_augmentation_seeds_follow_the_global_position():
    """A sample's augmentation seed is a function of (seed, global position): the same for any
    world size and after a resume, different for every position (issue 14, item 20)."""

    def keys(world, consumed, count):
        per_rank = []
        for rank in range(world):
            sampler = ResumableDistributedSampler(13, world, rank, seed=4)
            sampler.set_consumed(consumed)
            per_rank.append(list(itertools.islice(iter(sampler), count)))
        return [per_rank[p % world][p // world] for p in range(world * count)]

    one = keys(1, 0, 40)
    assert keys(4, 0, 10) == one and keys(2, 12, 14) == one[12:]
    assert len({key.seed for key in one}) == 40  # every position its own draw, also the same index again
    assert ResumableDistributedSampler(13, 1, 0, seed=5).augmentation_seed(0) != one[0].seed  # and every run seed
