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

from stl.distributed import is_main_process
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
    def create(
        cls,
        *,
        experiment: str,
        configured_uri: str = "",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        resume_file: Path | None = None,
    ) -> Tracker:
        """Start a run (rank 0) and return a tracker; other ranks get an inactive one.

        ``resume_file`` names a file in a persisted folder: when it holds a run that did not finish (the stage
        was interrupted), that run is reopened instead of starting a new one.
        """
        uri = resolve_tracking_uri(configured_uri)
        if not is_main_process():
            return cls(None, uri)
        check_tracking_server(uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        resumed = cls._reopen_unfinished(resume_file, uri)
        if resumed is not None:
            return resumed
        all_tags = {"mlflow.source.git.commit": _git_commit(), **(tags or {})}
        if os.environ.get("DVC_EXP_NAME"):
            all_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        run = client.create_run(
            exp_id,
            run_name=run_name or os.environ.get("DVC_EXP_NAME"),
            tags={k: v for k, v in all_tags.items() if v},
        )
        tracker = cls(run.info.run_id, uri, exp_id)
        if resume_file is not None:
            tracker.save(resume_file)
        return tracker

    @classmethod
    def open(cls, run_file: Path) -> Tracker:
        """Reopen the pipeline's run recorded by an earlier stage in ``run_file``."""
        if not run_file.is_file():
            raise TrackingError(f"{run_file}: no MLflow run file; run the training stage first (dvc repro)")
        info = json.loads(run_file.read_text())
        if not is_main_process():
            return cls(None, info["uri"])
        check_tracking_server(info["uri"])
        tracker = cls(info["run_id"], info["uri"], info.get("experiment_id"))
        tracker._client.update_run(info["run_id"], status="RUNNING")
        return tracker

    @classmethod
    def _reopen_unfinished(cls, resume_file: Path | None, uri: str) -> Tracker | None:
        """The run recorded in ``resume_file`` if it did not finish (its stage was interrupted), reopened."""
        if resume_file is None or not resume_file.is_file():
            return None
        info = json.loads(resume_file.read_text())
        if info.get("uri") != uri:
            return None
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            run = client.get_run(info["run_id"])
        except Exception:  # noqa: BLE001 - a deleted run simply means: start a new one
            return None
        if run.info.status == "FINISHED":
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        return cls(run.info.run_id, uri, run.info.experiment_id)

    @classmethod
    def continue_run(cls, run_file: Path, *, claim_tag: str, resume_file: Path) -> Tracker:
        """Continue the run an earlier stage of this pipeline run started, or start a linked one.

        A stage re-run after an interruption reopens its own unfinished run (``resume_file``). Otherwise the
        run in ``run_file`` is continued unless it already carries ``claim_tag`` (this stage ran in it
        before: the earlier stage was cached and this is a new pipeline run); then a new run is started in
        the same experiment, tagged with the earlier run's id.
        """
        if not run_file.is_file():
            raise TrackingError(f"{run_file}: no MLflow run file; run the earlier stages first (dvc repro)")
        info = json.loads(run_file.read_text())
        if not is_main_process():
            return cls(None, info["uri"])
        resumed = cls._reopen_unfinished(resume_file, info["uri"])
        if resumed is not None:
            return resumed
        tracker = cls.open(run_file)
        if claim_tag not in tracker.get_tags():
            tracker.save(resume_file)
            return tracker
        tracker.finish()
        from mlflow import MlflowClient

        exp = MlflowClient(tracking_uri=info["uri"]).get_experiment(info["experiment_id"])
        new = cls.create(
            experiment=exp.name, configured_uri=info["uri"], tags={"stl.labeler_run_id": info["run_id"]}
        )
        new.save(resume_file)
        return new

    def save(self, run_file: Path) -> None:
        """Record the run id (rank 0) so the next stages reopen the same run."""
        if self.active:
            write_json_atomic(
                run_file, {"run_id": self.run_id, "uri": self.uri, "experiment_id": self.experiment_id}
            )

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
