"""The evaluate stage script (stages/evaluate.py) beyond what the full-DAG test sees."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _Stop(Exception):
    pass


def test_the_evaluate_stage_keeps_freed_memory_before_its_work(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's process only runs inference, so it keeps freed memory for the next batch (the output is
    the same either way: only this call shows it)."""
    spec = importlib.util.spec_from_file_location("evaluate_stage", ROOT / "stages" / "evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(stage, "keep_freed_memory", lambda: calls.append("keep_freed_memory") or True)

    def continue_run(*args, **kwargs):
        calls.append("tracker")
        raise _Stop

    monkeypatch.setattr(stage.Tracker, "continue_run", continue_run)
    with pytest.raises(_Stop):
        stage.main()
    assert calls == ["keep_freed_memory", "tracker"]
