"""Throughput and peak memory of the FAN models: ours (``stl.models``) and, optionally, the reference.

Usage::

    python benchmarks/benchmark_models.py \\
        [--models fan_tiny_12_p16_224 fan_tiny_8_p4_hybrid ...] [--batch-size 16] [--img-size 224] \\
        [--threads 2] [--iters 5] [--warmup 2] [--modes fp32 bf16] \\
        [--reference PATH] [--compile] [--fused-adamw] [--cpu-kernels]

For every model a markdown table is printed with one row per (implementation, mode): parameters (M),
eval images/s (forward under ``inference_mode``), training-step images/s (forward, cross-entropy, backward,
``torch.optim.AdamW`` step; the cls logits of token models) and the peak RSS (GB) of the process. Modes:
``fp32`` and ``bf16`` (CPU autocast to bfloat16 around forward and loss; weights and optimizer in fp32).

Method. Every (implementation, model, mode) runs in its own worker subprocess, so the peak RSS
(``ru_maxrss``) is that configuration's alone. The workers of one model are alive together and are driven one
step at a time, round-robin (ours and the reference alternating, step by step): ``--warmup`` untimed then
``--iters`` timed eval passes, then the same for training steps; the fastest step of each is reported. So a
load change on the machine hits every configuration alike. Inputs are random images and labels (timing does
not depend on the data). With the reference measured, the ``x ref fp32`` columns give each row's throughput
over the reference's fp32.

The reference (https://github.com/NVlabs/FAN, ``models/fan.py`` and ``models/convnext_utils.py``) is not
part of this repository and nothing of it is copied here. To measure it, prepare a directory OUTSIDE this
repository::

    git clone https://github.com/NVlabs/FAN /tmp/FAN
    mkdir -p /tmp/fanref && cp /tmp/FAN/models/fan.py /tmp/FAN/models/convnext_utils.py /tmp/fanref/
    # minimal fixes for timm 1.0 in /tmp/fanref/fan.py:
    #   - delete the line ``from .swin_utils import _create_fan_swin_transformer``
    #   - delete every ``@register_model`` decorator (the names would clash with timm's own FAN models)

and pass ``--reference /tmp/fanref``. The directory is imported as a package (``fan.py`` imports
``.convnext_utils``); its models are built from the reference's ``FAN`` and ``ConvNeXt`` classes with the
architecture arguments of our registry (its ``build_model_with_cfg`` wrappers do not run under timm 1.0).
The reference has no ``*_token`` models; those are measured for ours only.

``--fused-adamw`` adds rows ``ours+fused-adamw``: our model with ``torch.optim.AdamW(fused=True)``, what
``train.fused_optimizer: true`` uses. ``--cpu-kernels`` adds rows ``ours+cpu-kernels``: our model with
``stl.models.use_cpu_kernels(True)`` (the CPU kernels of ``train.cpu_kernels: true``; they serve training, so
its eval figures measure the same code as ``ours``). With both flags, rows ``ours+cpu-kernels+fused-adamw``
have both options on. The ``ours``, ``ours+cpu-kernels`` and ``reference`` rows keep the loop AdamW, so they
compare the models alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_MODELS = ("fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid")
OURS, REFERENCE, OURS_FUSED, OURS_KERNELS = "ours", "reference", "ours+fused-adamw", "ours+cpu-kernels"
OURS_ALL = "ours+cpu-kernels+fused-adamw"  # both options on: what a user who asks for speed on a CPU runs
_REF_PACKAGE = "_fan_reference"


# worker (one configuration per process) ---------------------------------------------------------------------


def _import_reference(path: Path) -> tuple[ModuleType, ModuleType]:
    """Import ``fan.py`` and ``convnext_utils.py`` from ``path`` as submodules of a synthetic package."""
    spec = importlib.machinery.ModuleSpec(_REF_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    package = importlib.util.module_from_spec(spec)
    sys.modules[_REF_PACKAGE] = package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated timm import paths
        fan = importlib.import_module(f"{_REF_PACKAGE}.fan")
        cnx = importlib.import_module(f"{_REF_PACKAGE}.convnext_utils")
    return fan, cnx


def _build_reference(name: str, path: Path, img_size: int) -> Any:
    """The reference model for one of our registered names, from our registry's architecture arguments."""
    from stl.models.fan import FAN_MODEL_ARGS  # the plain dict; importing it registers ours, not theirs

    args = dict(FAN_MODEL_ARGS[name])
    if args.pop("return_dense", False):
        raise ValueError(f"{name}: the reference has no token models")
    fan, cnx = _import_reference(path)
    hybrid_depths = args.pop("hybrid_depths", None)
    depth = args["depth"]
    kwargs: dict[str, Any] = dict(args, img_size=img_size, sr_ratio=[1] * (depth + 1), num_classes=1000)
    if hybrid_depths is not None:
        dims = [128, 256, 512, 1024]  # only the first len(hybrid_depths) are built
        kwargs["backbone"] = cnx.ConvNeXt(depths=list(hybrid_depths), dims=dims, use_head=False)
    if isinstance(kwargs.get("num_heads"), tuple):
        kwargs["num_heads"] = list(kwargs["num_heads"])
    return fan.FAN(**kwargs)


def run_worker(cfg: dict[str, Any]) -> None:
    """Serve one (impl, model, mode) over stdin/stdout: one timed step per ``eval``/``train`` line.

    Prints ``{"params": n}`` once the model is built, the seconds of each step, and ``{"rss_gb": x}`` (peak
    RSS of this process) on ``done``, then exits.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    if cfg["impl"] == REFERENCE:
        model = _build_reference(cfg["model"], Path(cfg["reference"]), cfg["img_size"])
    else:
        import timm

        import stl.models  # registers the FAN names

        if cfg["impl"] in (OURS_KERNELS, OURS_ALL) and not stl.models.use_cpu_kernels(True):
            raise SystemExit("--cpu-kernels: the kernels could not be built (see the warning above)")
        model = timm.create_model(cfg["model"], num_classes=1000, img_size=cfg["img_size"])
    params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if cfg["compile"] else model
    bf16 = cfg["mode"] == "bf16"
    batch, size = cfg["batch_size"], cfg["img_size"]
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    fused = cfg["impl"] in (OURS_FUSED, OURS_ALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)

    def eval_step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            step_model(x)

    def train_step() -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = step_model(x)
            if isinstance(out, tuple):  # token models: (cls_logits, aux_logits)
                out = out[0]
            loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"eval": eval_step, "train": train_step}
    print(json.dumps({"params": params}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            break
        start = time.perf_counter()
        steps[command]()
        print(json.dumps(time.perf_counter() - start), flush=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_gb": peak_kb * 1024 / 1e9}), flush=True)


# driver -----------------------------------------------------------------------------------------------------


class _Worker:
    """A worker subprocess for one configuration, driven one step at a time."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        threads = str(cfg["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.cfg['impl']} {self.cfg['model']} {self.cfg['mode']} worker died")
        return json.loads(line)

    def ready(self) -> int:
        return self._read()["params"]

    def step(self, phase: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(phase + "\n")
        self.proc.stdin.flush()
        return self._read()

    def finish(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        rss = self._read()["rss_gb"]
        self.proc.wait()
        return rss


def measure(cfgs: list[dict[str, Any]], warmup: int, iters: int) -> list[dict[str, Any]]:
    """Run the configurations (one worker process each) with their timed steps interleaved.

    All workers are alive at once (idle ones wait on stdin); the eval passes, then the training steps, go
    round-robin over the workers, so a load change on the machine hits every configuration alike.
    """
    workers = [_Worker(cfg) for cfg in cfgs]
    results = [dict(params=w.ready()) for w in workers]
    for phase in ("eval", "train"):
        for _ in range(warmup):
            for w in workers:
                w.step(phase)
        best = [float("inf")] * len(workers)
        for _ in range(iters):
            for i, w in enumerate(workers):
                best[i] = min(best[i], w.step(phase))
        for r, b, cfg in zip(results, best, cfgs, strict=True):
            r[phase] = cfg["batch_size"] / b
    for r, w in zip(results, workers, strict=True):
        r["rss_gb"] = w.finish()
    return results


def format_table(model: str, results: dict[tuple[str, str], dict[str, Any]], modes: list[str]) -> str:
    """Markdown table of one model's results keyed by (impl, mode)."""
    ref = results.get((REFERENCE, "fp32"))
    lines = [f"### {model}", ""]
    header = ["impl", "mode", "params (M)", "eval img/s", "train img/s"]
    if ref is not None:
        header += ["eval x ref fp32", "train x ref fp32"]
    header.append("peak RSS (GB)")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for impl in (REFERENCE, OURS, OURS_KERNELS, OURS_FUSED, OURS_ALL):
        for mode in modes:
            r = results.get((impl, mode))
            if r is None:
                continue
            row = [impl, mode, f"{r['params'] / 1e6:.2f}", f"{r['eval']:.2f}", f"{r['train']:.2f}"]
            if ref is not None:
                row += [f"{r['eval'] / ref['eval']:.2f}x", f"{r['train'] / ref['train']:.2f}x"]
            row.append(f"{r['rss_gb']:.2f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed steps per configuration (best is kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--modes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--reference", type=Path, default=None, help="directory with the reference fan.py")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (both impls)")
    p.add_argument("--fused-adamw", action="store_true", help="add rows: ours with the fused AdamW kernel")
    p.add_argument("--cpu-kernels", action="store_true", help="add rows: ours with stl's fused CPU kernels")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.reference is not None and not (args.reference / "fan.py").is_file():
        raise SystemExit(f"--reference {args.reference}: no fan.py there (see this script's docstring)")
    print(
        f"batch {args.batch_size}, {args.img_size} px, {args.threads} threads, "
        f"best of {args.iters} interleaved steps after {args.warmup} warm-up"
        f"{', torch.compile' if args.compile else ''}; "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    from stl.models import is_token_model

    for model in args.models:
        impls = [OURS] + [OURS_KERNELS] * args.cpu_kernels + [OURS_FUSED] * args.fused_adamw
        impls += [OURS_ALL] * (args.cpu_kernels and args.fused_adamw)
        if args.reference is not None and not is_token_model(model):
            impls.insert(0, REFERENCE)
        keys = [(impl, mode) for mode in args.modes for impl in impls]
        cfgs = [
            dict(
                impl=impl,
                model=model,
                mode=mode,
                batch_size=args.batch_size,
                img_size=args.img_size,
                threads=args.threads,
                compile=args.compile,
                reference=str(args.reference) if args.reference else None,
            )
            for impl, mode in keys
        ]
        results = dict(zip(keys, measure(cfgs, args.warmup, args.iters), strict=True))
        print(
            f"\n{format_table(model, results, args.modes)}\n\nload average: {os.getloadavg()}\n", flush=True
        )


if __name__ == "__main__":
    main()
