"""DVC stage `download`: build the raw dataset (one folder per class) in data/raw.

python stages/download.py       # reads data.* from params.yaml
"""

from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config
from stl.data import create_raw_dataset


def main() -> None:
    cfg = load_config()
    summary = create_raw_dataset(
        cfg.data.source, Path("data/raw"), sha256=cfg.data.sha256, digits_size=cfg.data.digits_size
    )
    print(f"data/raw: {summary}")


if __name__ == "__main__":
    run_stage(main)
