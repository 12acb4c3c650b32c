"""DVC stage `evaluate`: test-split metrics, ROC, confusion matrix, robustness and token-label maps.

    torchrun --standalone --nproc_per_node=2 stages/evaluate.py   # sharded; the metrics equal one process's

Writes reports/metrics.json (DVC metrics) and reports/eval/ (plots, tables, figures); logs them to MLflow.
"""

from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config, to_flat_dict
from stl.distributed import cleanup_distributed
from stl.evaluate.infer import keep_freed_memory
from stl.evaluate.run import evaluate_model
from stl.tracking import Tracker

STUDENT, LABELER, OUT, METRICS = (
    Path("models/student"),
    Path("models/labeler"),
    Path("reports/eval"),
    Path("reports/metrics.json"),
)


def main() -> None:
    cfg = load_config()
    keep_freed_memory()  # this process only runs inference: reuse freed activations batch after batch
    ev, rob = cfg.evaluate, cfg.evaluate.robustness
    tracker = Tracker.continue_run(STUDENT / "mlflow_run.json", claim_tag="stl.phase.evaluate")
    with tracker:
        tracker.log_params(to_flat_dict(cfg))
        scalars = evaluate_model(
            model_path=STUDENT / "model.pt",
            split_dir=Path("data/split"),
            raw_dir=Path("data/raw"),
            out_dir=OUT,
            metrics_path=METRICS,
            batch_size=ev.batch_size,
            fused_weight=ev.fused_weight,
            device=cfg.device,
            labeler_path=LABELER / "labeler.pt" if (LABELER / "labeler.pt").is_file() else None,
            token_maps=ev.token_maps,
            robustness=rob.enabled,
            corruptions=rob.corruptions,
            severities=rob.severities,
            max_samples=rob.max_samples,
            seed=cfg.seed,
            tracker=tracker,
        )
        tracker.log_metrics(
            {f"{group}/{k}": v for group, values in scalars.items() for k, v in values.items()}
        )
        tracker.log_artifact(OUT, "evaluation")
        tracker.log_artifact(METRICS)
        tracker.set_tags({"stl.phase.evaluate": "done"})
        tracker.save(OUT / "mlflow_run.json")
    cleanup_distributed()


if __name__ == "__main__":
    run_stage(main)
