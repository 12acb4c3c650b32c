"""DVC stage `train`: the student (STL phase 2 on the labeler's token labels, or plain supervised training).

    torchrun --standalone --nproc_per_node=2 stages/train.py      # DDP; gloo on CPU, NCCL on GPU

Continues the MLflow run of train_labeler when it is this pipeline run's (else starts one linked to it).
"""

from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config, settings_key, to_flat_dict
from stl.distributed import cleanup_distributed
from stl.tracking import Tracker
from stl.train.run import train_model

OUT, CHECKPOINTS, LABELER = Path("models/student"), Path("checkpoints/student"), Path("models/labeler")


def main() -> None:
    cfg = load_config()
    key = settings_key(cfg)
    tracker = Tracker.continue_run(
        LABELER / "mlflow_run.json",
        claim_tag="stl.phase.student",
        resume_file=CHECKPOINTS / "mlflow_run.json",
        settings_key=key,
    )
    with tracker:
        tracker.log_params(to_flat_dict(cfg) | {"model_name": cfg.model_name})
        summary = train_model(
            phase="student" if cfg.stl.enabled else "supervised",
            model_name=cfg.model_name,
            split_dir=Path("data/split"),
            raw_dir=Path("data/raw"),
            out_dir=OUT,
            opts=cfg.train,
            epochs=cfg.train.epochs,
            seed=cfg.seed,
            device=cfg.device,
            stl=cfg.stl,
            labeler_path=LABELER / "labeler.pt" if cfg.stl.enabled else None,
            tracker=tracker,
            checkpoint_dir=CHECKPOINTS,
        )
        tracker.set_tags({"stl.phase.student": "done"})
    tracker.record_stage(OUT, summary, key)
    cleanup_distributed()


if __name__ == "__main__":
    run_stage(main)
