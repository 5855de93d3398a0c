"""Data for both tasks: COCO instances and ADE20K datasets with the reference's augmentation,
padding collate, resumable distributed sampling, and the synthetic shapes data set."""

from piip6b.tasks.data.ade import AdeSegmentationDataset
from piip6b.tasks.data.coco import CocoInstanceDataset, load_coco_json
from piip6b.tasks.data.collate import PIXEL_MEAN, PIXEL_STD, PadCollate, denormalize, normalize, single_image_batches
from piip6b.tasks.data.common import STAT_KEYS, DataError, SampleKey
from piip6b.tasks.data.config import DataConfig, DetectionAugConfig, SegmentationAugConfig
from piip6b.tasks.data.loader import build_collate, build_dataloader, build_dataset, dataset_paths
from piip6b.tasks.data.sampler import InferenceSampler, ResumableDistributedSampler
from piip6b.tasks.data.shapes import (
    SEGMENTATION_CLASSES,
    SHAPE_CLASSES,
    ShapesSpec,
    ensure_shapes_dataset,
    write_shapes_dataset,
)

__all__ = [
    "AdeSegmentationDataset",
    "CocoInstanceDataset",
    "DataConfig",
    "DataError",
    "DetectionAugConfig",
    "InferenceSampler",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "PadCollate",
    "ResumableDistributedSampler",
    "SEGMENTATION_CLASSES",
    "SHAPE_CLASSES",
    "STAT_KEYS",
    "SampleKey",
    "SegmentationAugConfig",
    "ShapesSpec",
    "build_collate",
    "build_dataloader",
    "build_dataset",
    "dataset_paths",
    "denormalize",
    "ensure_shapes_dataset",
    "load_coco_json",
    "normalize",
    "single_image_batches",
    "write_shapes_dataset",
]
