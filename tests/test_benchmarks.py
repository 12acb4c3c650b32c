"""The model benchmark runs end to end and prints its table (tiny sizes; timings are not checked).

    pytest tests/test_benchmarks.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_models.py")


def test_benchmark_prints_a_row_per_impl_and_mode() -> None:
    kernels = shutil.which("c++") is not None or shutil.which("g++") is not None  # --cpu-kernels builds them
    cmd = [sys.executable, SCRIPT, "--models",
           "fan_tiny_12_p16_224", "--batch-size", "2", "--img-size", "32", "--threads", "1", "--iters", "1",
           "--warmup", "0", "--fused-adamw", *(["--cpu-kernels"] if kernels else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ours")]
    impls = ["ours", *(["ours+cpu-kernels"] if kernels else []), "ours+fused-adamw",
             *(["ours+cpu-kernels+fused-adamw"] if kernels else [])]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (impl, mode) for impl in impls for mode in ("fp32", "bf16")
    ], out
    for row in rows:
        params, eval_ips, train_ips, rss = (float(v) for v in (row[2], row[3], row[4], row[-1]))
        assert params == 7.32 and eval_ips > 0 and train_ips > 0 and rss > 0.1, row


def test_benchmark_refuses_a_reference_dir_without_fan_py(tmp_path: Path) -> None:
    cmd = [sys.executable, SCRIPT, "--reference", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no fan.py" in proc.stderr
