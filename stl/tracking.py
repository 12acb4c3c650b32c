"""MLflow tracking: one run per pipeline run, shared by the stages, written by rank 0 only.

The first training stage creates the run and records its id in a small JSON out file; later stages reopen
it from that file, so the labeler's and the student's per-epoch metrics, the evaluation, the figures and the
report all land in one run. The default store is an absolute ``sqlite:///<project>/mlflow.db`` (the project
is ``DVC_ROOT`` under ``dvc exp run``, so queued and temp experiments log to the real project, not a deleted
copy):

    mlflow ui --backend-store-uri sqlite:///mlflow.db      # then open http://127.0.0.1:5000

``MLFLOW_TRACKING_URI`` (e.g. a team's ``mlflow server``) wins over ``mlflow.tracking_uri`` in params.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from stl.distributed import is_main_process, main_print
from stl.io import write_json_atomic

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; raised before any training starts."""


def project_root() -> Path:
    """The real project root: ``DVC_ROOT`` under DVC (also in temp experiment copies), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(configured: str = "") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else params' ``mlflow.tracking_uri``, else sqlite in the project."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return f"sqlite:///{project_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if not Path(rel).is_absolute():
            return f"sqlite:///{project_root() / rel}"
    return uri


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with what to do, when an http(s) tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-configured server)
            if resp.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {resp.status} at /health")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise TrackingError(
            f"cannot reach the MLflow tracking server {uri} ({e}); start it, fix MLFLOW_TRACKING_URI or "
            "mlflow.tracking_uri in params.yaml, or unset both to log to sqlite:///mlflow.db in the project"
        ) from None


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=project_root()
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


class Tracker:
    """An MLflow run seen from one process: every method is a no-op except on rank 0.

    Use :meth:`create` in the first training stage, :meth:`open` in later ones, and :meth:`finish` at the end
    of each stage (``FAILED`` when it raised), so an interrupted stage is visible in the UI.
    """

    def __init__(self, run_id: str | None, uri: str, experiment_id: str | None = None) -> None:
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self._client = None
        if run_id is not None and is_main_process():
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def active(self) -> bool:
        return self._client is not None

    # --- creation -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, *, experiment: str, configured_uri: str = "", run_name: str | None = None,
               tags: dict[str, str] | None = None, resume_file: Path | None = None,
               settings_key: str = "") -> Tracker:
        """Start a run (rank 0) and return a tracker; other ranks get an inactive one.

        ``resume_file`` names a file in a persisted folder: when it holds a run that did not finish (the stage
        was interrupted) and was made with the same ``settings_key`` (a hash of the params), that run is
        reopened instead of starting a new one; a failed run with other settings is left alone.
        """
        uri = resolve_tracking_uri(configured_uri)
        if not is_main_process():
            return cls(None, uri)
        check_tracking_server(uri)
        resumed = cls._reopen_unfinished(resume_file, uri, settings_key)
        if resumed is not None:
            return resumed
        return cls._new_run(uri, experiment, run_name, tags, resume_file, settings_key)

    @classmethod
    def _new_run(cls, uri: str, experiment: str, run_name: str | None, tags: dict[str, str] | None,
                 resume_file: Path | None, settings_key: str) -> Tracker:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            # A local store keeps artifacts in the project, never in the cwd of a temp experiment copy.
            location = None if uri.startswith(("http://", "https://", "databricks")) else \
                (project_root() / "mlartifacts").as_uri()
            exp_id = client.create_experiment(experiment, artifact_location=location)
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        all_tags = {"mlflow.source.git.commit": _git_commit(), **(tags or {})}
        if os.environ.get("DVC_EXP_NAME"):
            all_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        run = client.create_run(exp_id, run_name=run_name or os.environ.get("DVC_EXP_NAME"),
                                tags={k: v for k, v in all_tags.items() if v})
        tracker = cls(run.info.run_id, uri, exp_id)
        if resume_file is not None:
            tracker.save(resume_file, settings_key)
        return tracker

    @classmethod
    def _reopen_unfinished(cls, resume_file: Path | None, uri: str, settings_key: str) -> Tracker | None:
        """The run in ``resume_file`` if it did not finish and has these settings (an interrupted stage)."""
        if resume_file is None or not resume_file.is_file():
            return None
        info = json.loads(resume_file.read_text())
        if info.get("uri") != uri or info.get("settings_key", "") != settings_key:
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(info["run_id"])
        except MlflowException:  # deleted: start a new one
            return None
        if run.info.status == "FINISHED":
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        return cls(run.info.run_id, uri, run.info.experiment_id)

    @classmethod
    def continue_run(cls, run_file: Path, *, claim_tag: str, resume_file: Path | None = None,
                     settings_key: str = "") -> Tracker:
        """Continue the run an earlier stage of this pipeline run started, or start a linked one.

        A stage re-run after an interruption reopens its own unfinished run (``resume_file``). Otherwise the
        run in ``run_file`` is continued unless it already carries ``claim_tag`` (this stage already ran in
        it: the earlier stages were cached and this is a new pipeline run); then a new run is started in the
        same experiment and store, tagged ``stl.previous_run_id`` with the earlier run's id.
        """
        if not run_file.is_file():
            raise TrackingError(f"{run_file}: no MLflow run file; run the earlier stages first (dvc repro)")
        info = json.loads(run_file.read_text())
        uri = info["uri"]
        if not is_main_process():
            return cls(None, uri)
        check_tracking_server(uri)
        resumed = cls._reopen_unfinished(resume_file, uri, settings_key)
        if resumed is not None:
            return resumed
        tracker = cls(info["run_id"], uri, info.get("experiment_id"))
        tags = tracker.get_tags()
        if claim_tag not in tags:
            tracker._client.update_run(tracker.run_id, status="RUNNING")
            if resume_file is not None:
                tracker.save(resume_file, settings_key)
            return tracker
        experiment = tracker._client.get_experiment(info["experiment_id"]).name
        return cls._new_run(uri, experiment, None, {"stl.previous_run_id": info["run_id"]}, resume_file,
                            settings_key)

    def save(self, run_file: Path, settings_key: str = "") -> None:
        """Record the run id (rank 0) so the next stages reopen the same run."""
        if self.active:
            write_json_atomic(run_file, {"run_id": self.run_id, "uri": self.uri,
                                         "experiment_id": self.experiment_id, "settings_key": settings_key})

    def record_stage(self, out_dir: Path, summary: dict[str, Any], settings_key: str = "") -> None:
        """Rank 0: a training stage's ``summary.json`` and the run file the next stage continues."""
        if self.active:
            write_json_atomic(out_dir / "summary.json", summary, default=str)
            self.save(out_dir / "mlflow_run.json", settings_key)

    def finish(self, failed: bool = False) -> None:
        if self.active:
            self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """End the stage's part of the run: FINISHED, or FAILED when the stage raised."""
        self.finish(failed=exc_type is not None)

    # --- logging --------------------------------------------------------------------------------------------
    def get_tags(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.tags) if self.active else {}

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once; keys already in the run (a resumed or reopened run) are left as they are."""
        if not self.active:
            return
        from mlflow.entities import Param

        have = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v)[:6000])
        if changed:  # MLflow cannot re-log a param; keep the run honest about it
            main_print(f"note: MLflow run {self.run_id} keeps its logged values of {', '.join(changed)}; "
                       "these settings differ in this stage (see the stl.changed_params tag)")
            self.set_tags({"stl.changed_params": ",".join(changed)[:5000]})
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self._client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import math
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(rows), 500):
            self._client.log_batch(self.run_id, metrics=rows[i : i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, example: Any, name: str = "model") -> None:
        """Log a torch model (pickled module, loadable as a class) with a signature and an input example."""
        if not self.active:
            return
        import mlflow
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            out = model(example)
            out = out[0] if isinstance(out, tuple) else out
            signature = infer_signature(example.numpy(), out.detach().numpy())
            mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                signature=signature,
                input_example=example.numpy(),
            )
