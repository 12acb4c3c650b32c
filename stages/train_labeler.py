"""DVC stage `train_labeler`: STL phase 1, the token labeler (trained here, or a published one imported).

    torchrun --standalone --nproc_per_node=1 stages/train_labeler.py

Creates the pipeline's MLflow run (models/labeler/mlflow_run.json); with `stl.enabled: false` that is all
it does.
"""

from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config, settings_key, to_flat_dict
from stl.distributed import cleanup_distributed
from stl.tracking import Tracker
from stl.train.run import import_labeler, train_model

OUT, CHECKPOINTS = Path("models/labeler"), Path("checkpoints/labeler")


def main() -> None:
    cfg = load_config()
    key = settings_key(cfg)
    tracker = Tracker.create(
        experiment=cfg.mlflow.experiment,
        configured_uri=cfg.mlflow.tracking_uri,
        resume_file=CHECKPOINTS / "mlflow_run.json",
        settings_key=key,
    )
    with tracker:
        tracker.log_params(to_flat_dict(cfg) | {"model_name": cfg.model_name})
        if not cfg.stl.enabled:
            summary = {"enabled": False}
        elif cfg.stl.labeler:
            summary = import_labeler(
                cfg.stl.labeler,
                model_name=cfg.model_name,
                split_dir=Path("data/split"),
                out_path=OUT / "labeler.pt",
                img_size=cfg.train.img_size,
                device=cfg.device,
            )
        else:
            summary = train_model(
                phase="labeler",
                model_name=cfg.model_name,
                split_dir=Path("data/split"),
                raw_dir=Path("data/raw"),
                out_dir=OUT,
                opts=cfg.train,
                epochs=cfg.stl.labeler_epochs,
                seed=cfg.seed,
                device=cfg.device,
                stl=cfg.stl,
                tracker=tracker,
                export_name="labeler.pt",
                checkpoint_dir=CHECKPOINTS,
            )
        tracker.set_tags({"stl.phase.labeler": "done"})
    tracker.record_stage(OUT, summary, key)
    cleanup_distributed()


if __name__ == "__main__":
    run_stage(main)
