"""Logits of a whole split, on one process or sharded over torchrun ranks, identical either way.

``DistributedSampler`` pads the last shard by repeating samples, which would count some test images twice.
Here each rank takes a disjoint strided shard without padding (:class:`ShardSampler`), returns its global
indices with its arrays (:func:`predict_shard`), and :func:`predict_logits` gathers every shard and puts the
rows back in dataset order (:func:`merge_shards`), so the metrics are exactly those of a single process.

Token models (``*_token``) return ``(cls_logits [B, K], aux_logits [B, N, K])``. Only what the metrics need is
kept: the class-token logits and the fused logits ``cls + w * max_tokens(aux)`` the STL reference reports;
the [N_images, N_tokens, K] token logits are never stored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from stl.distributed import gather_objects, get_rank, get_world_size
from stl.models.outputs import FUSED_WEIGHT, fused_logits, split_outputs


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` below ``n``: disjoint, complete over ranks, never padded."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, "
                             f"world_size={world_size}")
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def shard_loader(dataset: Dataset, batch_size: int, workers: int, *, rank: int | None = None,
                 world_size: int | None = None, pin_memory: bool = False,
                 collate_fn: Any = None) -> DataLoader:
    """An evaluation DataLoader over this rank's :class:`ShardSampler` shard (rank and world size from the
    process group unless given)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    sampler = ShardSampler(len(dataset), rank, world_size)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, shuffle=False,
                      drop_last=False, pin_memory=pin_memory, collate_fn=collate_fn)


def predict_shard(model: nn.Module, loader: DataLoader, device: torch.device | str,
                  amp_dtype: torch.dtype | None = None,
                  fused_weight: float = FUSED_WEIGHT) -> dict[str, np.ndarray]:
    """This rank's predictions: ``indices`` (global, from the loader's sampler), ``labels``, ``logits`` and,
    for token models, ``fused_logits``; all numpy, logits float32.

    The loader must iterate in a known order (a :class:`ShardSampler` or a sequential sampler), otherwise rows
    could not be matched with dataset indices. The model runs in eval mode under ``torch.inference_mode``;
    its train/eval mode is restored afterwards. A DDP wrapper is unwrapped: its forward would sync buffers
    every batch, and unpadded shards give ranks different batch counts (a hang).
    """
    sampler = loader.sampler
    if not isinstance(sampler, (ShardSampler, SequentialSampler)):
        raise ValueError(f"predict_shard: the loader's sampler is {type(sampler).__name__}; predictions "
                         "need a fixed order: build the loader with stl.evaluate.predict.shard_loader "
                         "(no shuffle)")
    indices = np.fromiter(iter(sampler), dtype=np.int64)
    device = torch.device(device)
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = net.training
    net.eval()
    labels: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    fused: list[np.ndarray] = []
    token_model: bool | None = None
    try:
        with torch.inference_mode():
            for batch in loader:
                images, target = batch[0], batch[1]
                images = images.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = net(images)
                cls, aux = split_outputs(out)
                if token_model is None:
                    token_model = aux is not None
                elif token_model != (aux is not None):
                    raise ValueError("predict_shard: the model returned a tuple for some batches only")
                cls = cls.float()
                logits.append(cls.cpu().numpy())
                if aux is not None:
                    fused.append(fused_logits(cls, aux, fused_weight).cpu().numpy())
                labels.append(torch.as_tensor(target).reshape(-1).cpu().numpy().astype(np.int64))
    finally:
        net.train(was_training)
    n = sum(len(x) for x in labels)
    if n != len(indices):
        raise ValueError(f"predict_shard: the loader yielded {n} samples but its sampler lists "
                         f"{len(indices)}; drop_last must be False")
    k = logits[0].shape[1] if logits else 0
    result = {
        "indices": indices,
        "labels": np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        "logits": np.concatenate(logits) if logits else np.zeros((0, k), dtype=np.float32),
    }
    if token_model:
        result["fused_logits"] = np.concatenate(fused)
    return result


def merge_shards(shards: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-rank shards and sort rows by global index; the indices must be exactly 0..N-1.

    Returns the same keys without ``indices``. Empty shards (more ranks than samples) are fine; a rank whose
    arrays differ in keys or K from the others is an error.
    """
    shards = [s for s in shards if len(s["indices"])] or list(shards[:1])
    if not shards:
        raise ValueError("merge_shards: no shards")
    keys = [key for key in shards[0] if key != "indices"]
    for s in shards[1:]:
        if sorted(s) != sorted(shards[0]):
            raise ValueError(f"merge_shards: shards disagree on their arrays: {sorted(s)} "
                             f"vs {sorted(shards[0])}")
    indices = np.concatenate([s["indices"] for s in shards])
    order = np.argsort(indices, kind="stable")
    if not np.array_equal(indices[order], np.arange(len(indices))):
        raise ValueError("merge_shards: the ranks' indices are not a partition of 0..N-1 (duplicates or "
                         "gaps); build each rank's loader with shard_loader so each sample is predicted once")
    return {key: np.concatenate([s[key] for s in shards])[order] for key in keys}


def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device | str,
                   amp_dtype: torch.dtype | None = None,
                   fused_weight: float = FUSED_WEIGHT) -> dict[str, np.ndarray]:
    """Predictions for the whole dataset in dataset order, on every rank: ``labels [N]``, ``logits [N, K]``
    and, for token models, ``fused_logits [N, K]`` (``cls + fused_weight * max over tokens of aux``).

    Under torchrun give each rank ``shard_loader(dataset, ...)``; the result equals a single process's.
    """
    shard = predict_shard(model, loader, device, amp_dtype=amp_dtype, fused_weight=fused_weight)
    return merge_shards(gather_objects(shard))
