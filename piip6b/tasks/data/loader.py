"""Datasets and loaders from a `DataConfig`: the one place that knows the standard layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from piip6b.tasks.data.ade import AdeSegmentationDataset
from piip6b.tasks.data.coco import CocoInstanceDataset
from piip6b.tasks.data.collate import PadCollate
from piip6b.tasks.data.common import DataError, resolve
from piip6b.tasks.data.config import DataConfig
from piip6b.tasks.data.sampler import InferenceSampler, ResumableDistributedSampler
from piip6b.tasks.data.transforms import build_detection_transforms, build_segmentation_transforms

SPLITS = ("train", "val")
# (images, annotations) relative to data.root when the config leaves them empty.
STANDARD_LAYOUT = {
    "detection": {
        "train": ("train2017", "annotations/instances_train2017.json"),
        "val": ("val2017", "annotations/instances_val2017.json"),
    },
    "segmentation": {
        "train": ("images/training", "annotations/training"),
        "val": ("images/validation", "annotations/validation"),
    },
}


def dataset_paths(cfg: DataConfig, task: str, split: str) -> tuple[Path, Path]:
    if task not in STANDARD_LAYOUT:
        raise ValueError(f"unknown task {task!r}; expected one of {list(STANDARD_LAYOUT)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not cfg.root:
        raise DataError(
            "data.root is not set: point it at the COCO / ADE20K folder, or write the synthetic "
            "data set with `piip6b make-shapes OUT` and use OUT/coco or OUT/ade"
        )
    default_images, default_annotations = STANDARD_LAYOUT[task][split]
    images = getattr(cfg, f"{split}_images") or default_images
    annotations = getattr(cfg, f"{split}_annotations") or default_annotations
    return resolve(cfg.root, images), resolve(cfg.root, annotations)


def build_dataset(cfg: DataConfig, task: str, split: str, *, num_classes: int | None = None) -> Dataset:
    """`task`: detection (COCO instances) or segmentation (ADE20K layout, whose label values are
    checked against `num_classes`, required for it); `split`: train or val."""
    images, annotations = dataset_paths(cfg, task, split)
    train = split == "train"
    if task == "detection":
        return CocoInstanceDataset(
            images,
            annotations,
            transforms=build_detection_transforms(cfg.detection, train),
            train=train,
            bad_data=cfg.bad_data,
            min_box_size=cfg.detection.min_box_size,
        )
    if num_classes is None:
        raise ValueError("build_dataset: a segmentation data set needs num_classes (segmentation.num_classes)")
    seg = cfg.segmentation
    return AdeSegmentationDataset(
        images,
        annotations,
        num_classes=num_classes,
        transforms=build_segmentation_transforms(seg, train),
        train=train,
        bad_data=cfg.bad_data,
        reduce_zero_label=seg.reduce_zero_label,
        ignore_index=seg.ignore_index,
    )


def build_collate(cfg: DataConfig, task: str, split: str) -> PadCollate:
    seg = cfg.segmentation
    min_size = seg.crop_size if task == "segmentation" and split == "train" else None
    return PadCollate(cfg.size_divisor, ignore_index=seg.ignore_index, min_size=min_size)


def build_dataloader(
    dataset: Dataset,
    cfg: DataConfig,
    collate: PadCollate,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    consumed_samples: int = 0,
) -> DataLoader:
    """Training: endless loader starting at global position `consumed_samples` (read it back as
    `loader.sampler`); evaluation: one padded pass (see InferenceSampler)."""
    if train:
        sampler = ResumableDistributedSampler(len(dataset), world_size, rank, seed=seed, shuffle=True)
        sampler.set_consumed(consumed_samples)
    else:
        sampler = InferenceSampler(len(dataset), world_size, rank)
    # Augmentation draws come with each sample (SampleKey); the loader's own generator only seeds
    # its workers. It must exist: without it, creating the iterator would draw from the trainer's
    # random stream, which a resumed run has restored to a point the uninterrupted run drew earlier.
    generator = torch.Generator().manual_seed(hash((seed, rank, consumed_samples)) % (2**63))
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else cfg.val_batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=generator,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )
