"""Data: build the raw dataset (sources), validate and split it (split), and read it back (datasets).

    create_raw_dataset("digits", Path("data/raw"))                      # or an http(s) archive + sha256
    split_dataset(Path("data/raw"), Path("data/split"), 0.7, 0.15, 0.15, seed=0)
    ManifestDataset(Path("data/split/train.csv"), Path("data/raw"), create_transforms(32, train=True))
"""

from stl.data.datasets import (
    ManifestDataset,
    create_transforms,
    load_display_image,
    load_image_rgb,
    read_classes,
    to_rgb,
)
from stl.data.sources import (
    IMAGE_EXTENSIONS,
    DataSourceError,
    create_raw_dataset,
    find_class_root,
)
from stl.data.split import SPLITS, split_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DataSourceError",
    "ManifestDataset",
    "create_raw_dataset",
    "create_transforms",
    "find_class_root",
    "load_display_image",
    "load_image_rgb",
    "read_classes",
    "split_dataset",
    "to_rgb",
]
