"""The MLflow run hand-off between stages (stl.tracking.Tracker) against a real local sqlite store.

    pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stl.tracking import Tracker, TrackingError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # artifacts of a local store go into the project


def _status(tracker: Tracker) -> str:
    return tracker._client.get_run(tracker.run_id).info.status


def test_later_stages_continue_the_run_until_a_stage_ran_in_it(store: str, tmp_path: Path) -> None:
    with Tracker.create(experiment="handoff", configured_uri=store) as first:
        first.save(tmp_path / "run.json")
    assert _status(first) == "FINISHED"
    with Tracker.continue_run(tmp_path / "run.json", claim_tag="stl.phase.evaluate") as second:
        assert second.run_id == first.run_id and _status(second) == "RUNNING"
        second.set_tags({"stl.phase.evaluate": "done"})
    # the same stage again (earlier stages cached, a new pipeline run): a new run linked to the old one
    with Tracker.continue_run(tmp_path / "run.json", claim_tag="stl.phase.evaluate") as third:
        assert third.run_id != first.run_id
        assert third.get_tags()["stl.previous_run_id"] == first.run_id
        assert third.experiment_id == first.experiment_id
    with pytest.raises(TrackingError, match="no MLflow run file"):
        Tracker.continue_run(tmp_path / "missing.json", claim_tag="x")


def test_an_interrupted_stage_reopens_its_run_only_with_the_same_settings(store: str, tmp_path: Path) -> None:
    resume = tmp_path / "checkpoints" / "mlflow_run.json"
    interrupted = Tracker.create(experiment="resume", configured_uri=store, resume_file=resume,
                                 settings_key="a")
    interrupted.finish(failed=True)  # the stage raised
    again = Tracker.create(experiment="resume", configured_uri=store, resume_file=resume, settings_key="a")
    assert again.run_id == interrupted.run_id and _status(again) == "RUNNING"
    again.finish()
    after_success = Tracker.create(experiment="resume", configured_uri=store, resume_file=resume,
                                   settings_key="a")
    assert after_success.run_id != interrupted.run_id  # a finished run is never reopened
    after_success.finish(failed=True)
    other = Tracker.create(experiment="resume", configured_uri=store, resume_file=resume, settings_key="b")
    assert other.run_id != after_success.run_id  # other params: a new run, the failed one left alone
    other.finish()


def test_params_keep_their_first_value_and_say_so_and_metrics_skip_non_finite(store: str, capsys) -> None:
    with Tracker.create(experiment="logging", configured_uri=store) as tracker:
        tracker.log_params({"train.lr": 0.001, "seed": 0})
        tracker.log_params({"train.lr": 0.002, "train.epochs": 3})
        tracker.log_metrics({"val_top1": 91.5, "loss": math.nan, "grad": math.inf, "flag": True}, step=2)
        run = tracker._client.get_run(tracker.run_id)
    assert run.data.params == {"train.lr": "0.001", "seed": "0", "train.epochs": "3"}
    assert run.data.tags["stl.changed_params"] == "train.lr"
    assert "keeps its logged values of train.lr" in capsys.readouterr().out
    assert run.data.metrics == {"val_top1": 91.5}
    history = tracker._client.get_metric_history(tracker.run_id, "val_top1")
    assert [m.step for m in history] == [2]
