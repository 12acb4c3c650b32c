"""Process-group set-up and rank helpers, the one place that knows about ranks.

Every script runs unchanged as a single process (``python stages/train.py``) or under torchrun
(``torchrun --standalone --nproc_per_node=2 stages/train.py``). Side effects (files, prints, MLflow,
progress bars) happen on rank 0 only, through :func:`is_main_process` and :func:`main_print`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto", threads: int = 0) -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device.

    ``device`` is ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``. NCCL is used on CUDA, gloo on
    CPU. ``threads`` sets torch's intra-op threads; 0 means the machine's cores divided by the local ranks,
    because torchrun sets ``OMP_NUM_THREADS=1`` per worker and CPU training would otherwise crawl.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was asked for but torch sees no CUDA device; use device: auto or cpu"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if dev.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = threads or max(1, cores // max(1, local_world))
        torch.set_num_threads(n)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group cleanly (avoids the NCCL/gloo 'process group not destroyed' warning)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank; before the process group exists, torchrun's ``RANK`` (so rank 0 alone checks
    the tracking server or prints, even before :func:`init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (or without a process group): the only rank that writes, prints or logs."""
    return get_rank() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream (seed + rank) so augmentations differ."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Average a scalar over ranks (the identity without a process group)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device or torch.device("cpu"))
    if get_world_size() > 1:
        if device is None and dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t /= get_world_size()
    return float(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place and returned (the identity without a process group)."""
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group); pickled, so keep it small."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. an MLflow run id or a decision made on rank 0)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
