"""One torchrun worker of tests/train/test_ddp.py: train a tiny FAN, then record a hash of its parameters.

    torchrun --standalone --nproc_per_node=2 tests/train/ddp_worker.py SPLIT_DIR RAW_DIR OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402 - after the path set-up

from stl.distributed import cleanup_distributed, get_rank, get_world_size  # noqa: E402
from stl.train import run as run_mod  # noqa: E402


def _param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    split, raw, out = (Path(a) for a in sys.argv[1:4])
    tiny.register_tiny_models()
    seen = {}
    real = run_mod.train_one_epoch

    def capture(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    run_mod.train_one_epoch = capture
    summary = run_mod.train_model(phase="supervised", model_name=tiny.TINY, split_dir=split, raw_dir=raw,
                                  out_dir=out, opts=tiny.tiny_opts(batch_size=4), epochs=2, seed=0,
                                  device="cpu")
    model = seen["model"]
    report = {"rank": get_rank(), "world": get_world_size(), "ddp": type(model).__name__,
              "hash": _param_hash(getattr(model, "module", model)), "summary": summary}
    (out / f"rank{get_rank()}.json").write_text(json.dumps(report))
    cleanup_distributed()


if __name__ == "__main__":
    main()
