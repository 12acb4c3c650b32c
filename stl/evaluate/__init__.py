"""Evaluation: predictions over a split (sharded over ranks without padding), metrics and DVC plot files."""

from stl.evaluate.metrics import compute_metrics, scalar_metrics, softmax, write_evaluation
from stl.evaluate.predict import ShardSampler, merge_shards, predict_logits, predict_shard, shard_loader

__all__ = [
    "ShardSampler",
    "compute_metrics",
    "merge_shards",
    "predict_logits",
    "predict_shard",
    "scalar_metrics",
    "shard_loader",
    "softmax",
    "write_evaluation",
]
