"""The whole DAG through real `dvc`, logging to a real `mlflow server` on 127.0.0.1, on tiny settings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

TINY = {
    "split.max_per_class": 30,
    "train.epochs": 1,
    "train.batch_size": 32,
    "train.workers": 0,
    "train.warmup_epochs": 0,
    "stl.labeler_epochs": 1,
    "evaluate.token_maps": 2,
    "evaluate.robustness.corruptions": ["gaussian_noise", "fog"],
    "evaluate.robustness.severities": [1, 3],
    "evaluate.robustness.max_samples": 20,
    "report.samples": 4,
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _set(params: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        params = params[p]
    assert leaf in params, f"params.yaml has no key {dotted}"
    params[leaf] = value


def make_project(dst: Path, overrides: dict[str, object]) -> Path:
    """A git + DVC project made of this checkout's files (tracked and new, not ignored), with params set."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    outputs = {"data", "models", "reports", "checkpoints", "mlflow.db", "mlartifacts"}
    for rel in filter(None, (f.decode() for f in files)):
        src = REPO_ROOT / rel
        if Path(rel).parts[0] in outputs:
            continue
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for key, value in overrides.items():
        _set(params, key, value)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    _run(["git", "init", "-q", "-b", "main"], dst, env)
    _run(
        [
            "git",
            "-c",
            "user.email=ci@example.com",
            "-c",
            "user.name=ci",
            "commit",
            "-qam",
            "init",
            "--allow-empty",
        ],
        dst,
        env,
        check=False,
    )
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "init"], dst, env)
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=root,
        env=_env(),
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str) -> tuple[Path, dict, str]:
    project = make_project(tmp_path_factory.mktemp("project"), TINY)
    env = _env(MLFLOW_TRACKING_URI=mlflow_server)
    started = time.time()
    _run(["dvc", "repro"], project, env)
    return project, env, f"{time.time() - started:.0f}s"


def test_repro_writes_every_declared_output(pipeline: tuple[Path, dict, str]) -> None:
    project, _, _ = pipeline
    for rel in (
        "data/raw/0",
        "data/split/train.csv",
        "data/split/classes.json",
        "models/labeler/labeler.pt",
        "models/student/model.pt",
        "models/student/history.json",
        "reports/eval/confusion.csv",
        "reports/eval/roc_by_class.json",
        "reports/eval/robustness.csv",
        "reports/eval/token_maps.json",
        "reports/report.html",
    ):
        assert (project / rel).exists(), rel
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0.0 <= metrics["test"]["top1"] <= 1.0
    assert {"top5", "macro_f1", "macro_auc", "micro_auc"} <= set(metrics["test"])
    assert "top1" in metrics["test_fused"]
    assert 0.0 <= metrics["robustness"]["mean_corruption_top1"] <= 1.0
    token_maps = json.loads((project / "reports/eval/token_maps.json").read_text())
    assert token_maps["img_size"] == 32 and len(token_maps["maps"]) == 2  # maps drawn over the model's input
    html = (project / "reports/report.html").read_text()
    assert "data:image/png;base64" in html and "Token-label maps" in html
    assert 'src="http' not in html


def test_second_repro_does_nothing_and_dvc_reads_metrics_and_plots(pipeline: tuple[Path, dict, str]) -> None:
    project, env, _ = pipeline
    out = _run(["dvc", "repro"], project, env).stdout
    assert "Data and pipelines are up to date" in out
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    assert "test" in json.dumps(shown) and "top1" in json.dumps(shown)
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], project, env).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {"confusion", "confusion_normalized", "reports/eval/roc_by_class.json"} <= set(plots["data"])


def test_mlflow_server_has_one_run_with_both_phases_the_report_and_a_servable_model(
    pipeline: tuple[Path, dict, str], mlflow_server: str
) -> None:
    import mlflow
    from mlflow import MlflowClient

    project, _, _ = pipeline
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("stl")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], filter_string="params.model = 'fan_tiny_hybrid'")
    assert len(runs) == 1  # (an experiment in another test trains fan_tiny_vit)
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["model"] == "fan_tiny_hybrid"
    assert run.data.tags.get("mlflow.source.git.commit")
    for key in (
        "labeler/train_loss",
        "labeler/val_top1",
        "student/train_loss",
        "student/val_top1",
        "test/top1",
        "test_fused/top1",
        "robustness/mean_corruption_top1",
    ):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "report.html" in artifacts and "evaluation" in artifacts
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert len(models) == 1
    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    batch = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    probs = np.asarray(served.predict(batch))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_exp_run_with_an_alias_changes_the_trained_model(pipeline: tuple[Path, dict, str], tmp_path) -> None:
    source, env, _ = pipeline
    project = tmp_path / "project"  # a copy: the shared project stays as the other tests expect it
    shutil.copytree(source, project, symlinks=True)
    _run(["dvc", "exp", "run", "-S", "model=fan_tiny_vit", "-S", "stl.enabled=false"], project, env)
    import torch

    meta = torch.load(project / "models/student/model.pt", weights_only=True)
    assert meta["model_name"] == "fan_tiny_12_p16_224"
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project, env).stdout)
    assert "fan_tiny_vit" in json.dumps(shown)


def test_unreachable_tracking_server_fails_before_training(tmp_path: Path) -> None:
    project = make_project(tmp_path, TINY)
    port = _free_port()
    proc = _run(
        [sys.executable, "stages/train_labeler.py"],
        project,
        _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
        check=False,
    )
    assert proc.returncode == 1
    assert f"cannot reach the MLflow tracking server http://127.0.0.1:{port}" in proc.stderr
    assert not (project / "checkpoints/labeler/last.pt").exists()


def test_a_bad_param_stops_the_stage_with_one_clear_line(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"train.lr": -1.0})
    proc = _run([sys.executable, "stages/download.py"], project, _env(), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: train.lr: -1.0 is out of range; must be > 0.0 and <= 10.0"
    )
    assert not (project / "data/raw").exists()
