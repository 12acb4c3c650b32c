"""DVC stage `report`: one self-contained HTML report (reports/report.html), also logged to MLflow.

python stages/report.py
"""

import json
from pathlib import Path

from stl.cli import run_stage
from stl.config import load_config, to_flat_dict
from stl.report.build import build_report
from stl.tracking import Tracker

STUDENT, LABELER = Path("models/student"), Path("models/labeler")


def main() -> None:
    cfg = load_config()
    tracker = Tracker.continue_run(Path("reports/eval/mlflow_run.json"), claim_tag="stl.phase.report")
    with tracker:
        tracker.log_params(to_flat_dict(cfg))
        student = json.loads((STUDENT / "summary.json").read_text())
        summary = {
            "model": cfg.model_name,
            "data": cfg.data.source,
            "STL": cfg.stl.enabled,
            "best validation top-1": student.get("best_top1"),
            "best epoch": student.get("best_epoch"),
            "best weights": student.get("best_source"),
            "MLflow run": tracker.run_id or "",
            "training seconds": student.get("seconds"),
        }
        path = build_report(
            out_path=Path("reports/report.html"),
            eval_dir=Path("reports/eval"),
            metrics_path=Path("reports/metrics.json"),
            raw_dir=Path("data/raw"),
            histories={"labeler": LABELER / "history.json", "student": STUDENT / "history.json"},
            params=to_flat_dict(cfg),
            summary=summary,
            samples=cfg.report.samples,
            figures_dir=Path("reports/figures"),
        )
        tracker.log_artifact(path)
        tracker.log_artifact(Path("reports/figures"), "figures")
        tracker.set_tags({"stl.phase.report": "done"})
    print(f"wrote {path}")


if __name__ == "__main__":
    run_stage(main)
