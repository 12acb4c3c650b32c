"""torchrun worker for test_distributed_eval: evaluate_model on a tiny token model, sharded over the ranks.

    torchrun --standalone --nproc_per_node=2 eval_worker.py MODEL SPLIT RAW OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stl.distributed import cleanup_distributed  # noqa: E402
from stl.evaluate.run import evaluate_model  # noqa: E402
from tests.train.tiny import register_tiny_models  # noqa: E402

if __name__ == "__main__":
    register_tiny_models()
    model, split, raw, out = map(Path, sys.argv[1:5])
    evaluate_model(model_path=model, split_dir=split, raw_dir=raw, out_dir=out / "eval",
                   metrics_path=out / "metrics.json", batch_size=4, fused_weight=0.5, device="cpu")
    cleanup_distributed()
