"""DVC stage `split`: validate every image and write the stratified, seeded train/val/test manifests.

python stages/split.py          # reads seed and split.* from params.yaml
"""

from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config
from stl.data import split_dataset


def main() -> None:
    cfg = load_config()
    split_dataset(
        Path("data/raw"),
        Path("data/split"),
        train=cfg.split.train,
        val=cfg.split.val,
        test=cfg.split.test,
        seed=cfg.seed,
        max_per_class=cfg.split.max_per_class,
    )


if __name__ == "__main__":
    run_stage(main)
