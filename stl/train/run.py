"""One training phase from manifests to an exported model: DDP, resume, validation, EMA, logging.

    from stl.train.run import train_model
    summary = train_model(phase="supervised", model_name="fan_tiny_8_p4_hybrid", split_dir=Path("data/split"),
                          raw_dir=Path("data/raw"), out_dir=Path("models"), opts=cfg.train, epochs=30, seed=0)

Run it as one process or under ``torchrun --nproc_per_node=N`` (the stages do this); every rank calls it.
Phases: ``supervised`` (plain), ``labeler`` (STL phase 1, a ``*_token`` model) and ``student`` (STL phase 2,
token labels from the frozen labeler at ``labeler_path``).

Outputs in ``out_dir`` (rank 0, each written atomically):

- ``checkpoints/last.pt`` every epoch and ``checkpoints/best.pt`` when validation top-1 improves (the full
  training state, see :mod:`stl.train.checkpoint`; a DVC ``persist: true`` folder);
- ``model.pt`` (``labeler.pt`` in the labeler phase, or ``export_name``): the best weights, EMA or not,
  loadable with :func:`stl.train.checkpoint.load_trained_model`;
- ``history.json``: one row per epoch (epoch is 0-based): train_loss, lr, val_top1, val_loss, ema_val_top1,
  ema_val_loss, best_top1, epoch_time, images_per_second.

Re-running resumes from ``last.pt`` when its fingerprint (the settings that change the weights, the world
size, the manifests, the labeler and pretrained files) matches and starts fresh otherwise (it prints which
and why); a finished run only re-exports. Changing ``epochs`` starts fresh (the schedule depends on it);
changing workers, threads, channels_last, compile, grad_checkpointing, fused_optimizer or cpu_kernels still
resumes. Data order and augmentation are reseeded from (seed, epoch, rank) at each epoch, so a resumed run
ends with the same weights as an uninterrupted one (bit-exact on CPU with the same ``train.workers``).

Metrics go to the tracker once per epoch, prefixed by the phase (``labeler/val_top1``,
``student/train_loss``), so both STL phases share one MLflow run. A resumed run logs only the new epochs (the
interrupted MLflow run is reopened by the stage); a finished run re-run logs its whole history again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import Mixup
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from stl.config import StlConfig, TrainConfig
from stl.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    is_main_process,
    main_print,
    seed_everything,
)
from stl.io import write_json_atomic
from stl.models.cpu_kernels import keeps_cpu_kernels_setting, use_cpu_kernels
from stl.models.layers import clear_buffer_pool
from stl.models.trained import (
    EXPORT_KEYS,
    FORMAT_VERSION,
    CheckpointError,
    export_model,
    load_file,
    load_trained_model,
)
from stl.train.checkpoint import atomic_save, capture_rng_state, fingerprint, restore_rng_state
from stl.train.engine import PHASES, PhaseLoss, evaluate, train_one_epoch
from stl.train.optim import create_optimizer, create_scheduler

# TrainConfig keys left out of the fingerprint: they do not change what is trained (threads, memory layout,
# recomputation, compilation, loader processes), so changing them (e.g. after running out of memory) still
# resumes; nproc_per_node and epochs are replaced by the actual world size and this phase's epochs.
_NOT_FINGERPRINTED = ("threads", "nproc_per_node", "epochs", "workers", "channels_last", "compile",
                      "grad_checkpointing", "fused_optimizer", "cpu_kernels")


# --- small helpers ------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed per (seed, epoch): data order and augmentation never depend on the run's history."""
    digest = hashlib.sha256(f"stl-epoch:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"train.amp: fp16 needs a CUDA device, but this run uses {device.type}; "
                             "use train.amp: bf16 (or none) on CPU")
        return torch.float16
    raise ValueError(f"train.amp: unknown value {amp!r}; use none, bf16 or fp16")


def _mixup_active(opts: TrainConfig) -> bool:
    return (opts.mixup > 0 or opts.cutmix > 0) and opts.mixup_prob > 0


def _mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(x) for x in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(x) for x in cfg.get("std", IMAGENET_DEFAULT_STD))
    return mean, std


def _is_token(model_name: str, model: nn.Module | None = None) -> bool:
    from stl.models import is_token_model

    if model is not None:
        return is_token_model(model)
    try:
        return is_token_model(model_name)
    except ValueError:  # not a FAN registry name (e.g. a timm test model)
        return model_name.endswith("_token")


def _resolve_name(model_name: str) -> str:
    """The official name of a FAN name or alias; other timm names (e.g. test models) pass through."""
    from stl.models import resolve_model_name

    try:
        return resolve_model_name(model_name)
    except ValueError:
        return model_name


def _export_name(phase: str, export_name: str | None) -> str:
    return export_name or ("labeler.pt" if phase == "labeler" else "model.pt")


def _write_history(path: Path, history: list[dict]) -> None:
    write_json_atomic(path, history)


def _log_rows(tracker: Any, phase: str, rows: list[dict]) -> None:
    """The single place where per-epoch metrics reach the tracker (rank 0 only)."""
    if tracker is None or not is_main_process():
        return
    for row in rows:
        metrics = {f"{phase}/{k}": v for k, v in row.items()
                   if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
        tracker.log_metrics(metrics, step=int(row["epoch"]))


def load_labeler(path: str | Path, device: str | torch.device, num_classes: int, img_size: int,
                 model_name: str | None = None, classes: Sequence[str] | None = None) -> nn.Module:
    """The frozen token labeler (eval mode, no grad) for the student phase.

    ``path`` is a ``labeler.pt`` written by the labeler phase (its own architecture and classes, which must be
    ``classes`` when given), or a published token-labeler checkpoint whose ``state_dict_ema`` is loaded into
    ``model_name`` (needed then; it must have this dataset's ``num_classes``, since token labels are classes
    of the dataset).
    """
    return _load_labeler(path, device, num_classes, img_size, model_name, classes)[0]


def _load_labeler(path: str | Path, device: str | torch.device, num_classes: int, img_size: int,
                  model_name: str | None, classes: Sequence[str] | None) -> tuple[nn.Module, dict | None]:
    """load_labeler, plus the file's metadata for a project ``labeler.pt`` (None for a published file)."""
    path = Path(path)
    meta = None
    if not path.is_file():
        raise FileNotFoundError(f"token labeler {path} not found: run the train_labeler stage first, or set "
                                "stl.labeler to a published token-labeler checkpoint")
    try:
        obj = load_file(path)
        project_file = all(k in obj for k in EXPORT_KEYS)
    except CheckpointError:
        project_file = False  # published files pickle an argparse.Namespace: stl.models reads those
    if project_file:
        labeler, meta = load_trained_model(path, device)
        if meta["num_classes"] != num_classes:
            raise ValueError(f"token labeler {path} has {meta['num_classes']} classes but the dataset has "
                             f"{num_classes}: retrain it (dvc repro train_labeler)")
        if classes is not None and list(meta["classes"]) != list(classes):
            raise ValueError(f"token labeler {path} labels the classes {list(meta['classes'])} but the "
                             f"dataset's are {list(classes)}: retrain it (dvc repro train_labeler), or, when "
                             "stl.labeler names it, use one trained on these classes or set stl.labeler: ''")
    else:
        from stl.models import load_checkpoint

        if not model_name:
            raise ValueError(f"{path} is a published checkpoint: pass model_name (its architecture)")
        labeler = timm.create_model(model_name, num_classes=num_classes, img_size=img_size)
        info = load_checkpoint(labeler, path, use_ema=True)
        if info.get("dropped") or info.get("initialised"):
            raise ValueError(
                f"token labeler {path}: its heads do not fit {num_classes} classes (not loaded: "
                f"{', '.join(info.get('dropped') or info.get('initialised'))}). A published labeler only "
                "labels its own classes (ImageNet-1k); set stl.labeler: '' to train a labeler on this dataset"
            )
        labeler.to(device)
    if not _is_token("", labeler):
        raise ValueError(f"token labeler {path}: its model returns no token logits (not a *_token model)")
    labeler.eval().requires_grad_(False)
    return labeler, meta


_LABELER_KEYS = ("enabled", "labeler", "labeler_epochs", "aux_weight")


def _phase_stl_settings(phase: str, stl: StlConfig | None) -> dict[str, Any] | None:
    """The STL keys that change this phase's weights: the labeler ignores the student-only keys, so changing
    e.g. ``stl.dense_weight`` does not retrain phase 1 (dvc.yaml lists the same keys for train_labeler)."""
    if stl is None or phase == "supervised":
        return None
    keys = dataclasses.asdict(stl)
    if phase == "labeler":
        return {k: keys[k] for k in _LABELER_KEYS}
    if stl.token_label != "soft":
        del keys["gumbel_tau"]  # a hard label (Gumbel or argmax) does not depend on it
    return keys


def _settings(phase: str, model_name: str, opts: TrainConfig, epochs: int, seed: int, world: int,
              device: torch.device, stl: StlConfig | None) -> dict[str, Any]:
    opts_d = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _NOT_FINGERPRINTED}
    return {
        "phase": phase, "model_name": model_name, "epochs": epochs, "seed": seed, "world_size": world,
        "device": device.type, "train": opts_d,
        "stl": _phase_stl_settings(phase, stl),
    }


def _image_digests(split_dir: Path) -> dict[str, str] | None:
    """The train and val images' digests from the split's contents.json (the manifests only name the files;
    the test images do not change what is trained). None for a split made before contents.json existed."""
    path = split_dir / "contents.json"
    if not path.is_file():
        return None
    contents = json.loads(path.read_text())
    return {split: contents.get(split, "") for split in ("train", "val")}


# --- resume decision ----------------------------------------------------------------------------------------
def _decide(ckpt_dir: Path, fp: str, epochs: int) -> tuple[str, str, dict | None]:
    """('fresh' | 'resume' | 'done', reason, last-checkpoint or None), decided on rank 0."""
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        return "fresh", f"no checkpoint in {ckpt_dir}", None
    try:
        state = load_file(last)
    except CheckpointError as e:
        return "fresh", f"{e}", None
    if state.get("fingerprint") != fp:
        return "fresh", f"{last} was made with other settings or data (fingerprint differs)", None
    if int(state["epoch"]) + 1 >= epochs:
        best = ckpt_dir / "best.pt"
        try:
            best_fp = load_file(best).get("fingerprint")
        except CheckpointError as e:
            return "fresh", f"{last} is finished but {e}", None
        if best_fp != fp:
            return "fresh", f"{last} is finished but {best} belongs to other settings", None
        return "done", f"{last} already finished all {epochs} epochs", state
    return "resume", f"{last} matches these settings", state


# --- the phase ----------------------------------------------------------------------------------------------
@keeps_cpu_kernels_setting
def train_model(
    *,
    phase: str,
    model_name: str,
    split_dir: Path,
    raw_dir: Path,
    out_dir: Path,
    opts: TrainConfig,
    epochs: int,
    seed: int,
    device: str = "auto",
    stl: StlConfig | None = None,
    labeler_path: Path | None = None,
    tracker: Any = None,
    export_name: str | None = None,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (or resume, or just re-export) one phase; every rank calls it. Returns the summary on all ranks.

    The best epoch is chosen on the better of the EMA and raw weights' validation top-1, except in the labeler
    phase: with EMA on, the labeler is the best EMA checkpoint (as STL trains it).

    Summary: best_top1, best_epoch, best_source ('ema' | 'model'), epochs_run (in this call), seconds,
    images_per_second, resumed_from_epoch (None when fresh), export (path of model.pt / labeler.pt).
    Leaves the process group up (the caller owns :func:`stl.distributed.cleanup_distributed`).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    model_name = _resolve_name(model_name)
    if phase != "supervised" and stl is None:
        raise ValueError(f"the {phase} phase needs the stl settings (stl=cfg.stl)")
    if phase == "student" and labeler_path is None:
        raise ValueError("the student phase needs labeler_path (labeler.pt of the labeler phase, or a "
                         "published token-labeler checkpoint)")
    if phase != "supervised" and not _is_token(model_name):
        raise ValueError(f"the {phase} phase trains a token model ('*_token' name), got {model_name!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    split_dir, raw_dir, out_dir = Path(split_dir), Path(raw_dir), Path(out_dir)
    start_time = time.perf_counter()
    info = init_distributed(device, threads=opts.threads)
    dev = info.device
    use_cpu_kernels(opts.cpu_kernels and dev.type == "cpu")  # warns, keeps torch's ops if they cannot build
    amp_dtype = _amp_dtype(opts.amp, dev)
    mixup_on = _mixup_active(opts)
    if mixup_on and opts.batch_size % 2:
        raise ValueError(
            f"train.batch_size is {opts.batch_size} (images per process): Mixup/CutMix mixes each batch with "
            "its reverse and needs an even per-process batch. Use an even train.batch_size, or turn mixing "
            "off (train.mixup: 0 and train.cutmix: 0)"
        )

    from stl.data import read_classes

    classes = read_classes(split_dir)
    num_classes = len(classes)
    train_csv, val_csv = split_dir / "train.csv", split_dir / "val.csv"
    for f in (train_csv, val_csv):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run the split stage (dvc repro split) first")
    export = _export_name(phase, export_name)
    fp_files: list[Path] = [train_csv, val_csv, split_dir / "classes.json"]
    if labeler_path is not None and phase == "student":
        fp_files.append(Path(labeler_path))
    if opts.pretrained and Path(opts.pretrained).is_file():
        fp_files.append(Path(opts.pretrained))
    settings = _settings(phase, model_name, opts, epochs, seed, info.world_size, dev, stl)
    settings["images"] = _image_digests(split_dir)
    fp = fingerprint(settings, fp_files)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    last_path, best_path, export_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt", out_dir / export

    decision, reason, state = _decide(ckpt_dir, fp, epochs) if is_main_process() else ("", "", None)
    decision, reason = broadcast_object((decision, reason))
    if decision == "done":
        return _finish_done(state, phase, best_path, export_path, out_dir, tracker, reason, start_time)
    if decision == "resume":
        if not is_main_process():
            try:
                state = load_file(last_path)
            except CheckpointError as e:
                raise CheckpointError(f"rank {info.rank}: {e}; out_dir must be on a filesystem every node "
                                      "sees to resume a multi-node run") from None
        main_print(f"[{phase}] resuming from {last_path}: epoch {int(state['epoch']) + 2}/{epochs} "
                   f"({reason})")
    else:
        main_print(f"[{phase}] starting fresh: {reason}")
        state = None

    # Model: identical initialisation on every rank (DDP broadcasts rank 0's weights anyway).
    from stl.models import load_checkpoint  # importing stl.models registers the FAN models with timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=num_classes, drop_path_rate=opts.drop_path,
                              img_size=opts.img_size)
    if opts.pretrained and state is None:
        pinfo = load_checkpoint(model, opts.pretrained, use_ema=opts.pretrained_ema)
        reinit = f"; re-initialised {', '.join(pinfo['initialised'])}" if pinfo.get("initialised") else ""
        main_print(f"[{phase}] fine-tuning from {opts.pretrained} ({pinfo.get('loaded')} tensors{reinit})")
    if opts.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"train.grad_checkpointing: {model_name} does not support it; set it to false")
        model.set_grad_checkpointing(True)
    model.to(dev)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    token_model = _is_token(model_name, model)
    mean, std = _mean_std(model)

    train_loader, sampler, val_loader = _create_loaders(phase, opts, raw_dir, train_csv, val_csv, info, seed,
                                                        mean, std, mixup_on)

    ema = ModelEmaV3(model, decay=opts.ema_decay) if opts.ema else None
    optimizer = create_optimizer(model, name=opts.optimizer, lr=opts.lr, weight_decay=opts.weight_decay,
                                 sophia_rho=opts.sophia_rho, fused=opts.fused_optimizer)
    scheduler = create_scheduler(optimizer, epochs=epochs, updates_per_epoch=len(train_loader),
                                 warmup_epochs=opts.warmup_epochs, warmup_lr=opts.warmup_lr,
                                 min_lr=opts.min_lr)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, num_updates = 0, 0
    best_top1, best_epoch, best_source = -1.0, -1, "model"
    history: list[dict] = []
    resumed_from = None
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        resumed_from = start_epoch
        num_updates = int(state["num_updates"])
        best_top1, best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        best_source = state["best_source"]
        history = list(state["history"])
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng_state(rngs[info.rank])
        scheduler.step_update(num_updates)  # earlier epochs are in the (reopened) MLflow run already
        if tracker is not None and is_main_process():
            tracker.set_tags({f"{phase}.resumed_from_epoch": start_epoch})
        del state

    forward_model: nn.Module = torch.compile(model) if opts.compile else model
    eval_model = forward_model
    if info.distributed:
        find_unused = phase == "supervised" and token_model  # the aux head gets no gradient then
        forward_model = DistributedDataParallel(
            forward_model, device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=find_unused)

    labeler = None
    if phase == "student":
        labeler = load_labeler(labeler_path, dev, num_classes, opts.img_size, model_name, classes)
    loss_fn = PhaseLoss(
        phase=phase, num_classes=num_classes, mixup_active=mixup_on, smoothing=opts.smoothing,
        aux_weight=stl.aux_weight if stl else 1.0, cls_weight=stl.cls_weight if stl else 1.0,
        dense_weight=stl.dense_weight if stl else 1.0, labeler=labeler,
        token_label=stl.token_label if stl else "gumbel", gumbel_tau=stl.gumbel_tau if stl else 1.0,
        token_smoothing=stl.token_smoothing if stl else 0.1,
        grid_mismatch=stl.grid_mismatch if stl else "resample", amp_dtype=amp_dtype,
    )
    mixup_fn = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, prob=opts.mixup_prob,
                     switch_prob=opts.mixup_switch_prob, mode="batch", label_smoothing=opts.smoothing,
                     num_classes=num_classes) if mixup_on else None

    meta = {"model_name": model_name, "num_classes": num_classes, "classes": classes,
            "img_size": opts.img_size, "phase": phase, "epochs": epochs, "mean": list(mean), "std": list(std)}
    train_images, train_seconds = 0.0, 0.0
    for epoch in range(start_epoch, epochs):
        seed_everything(_epoch_seed(seed, epoch), info.rank)
        sampler.set_epoch(epoch)
        metrics, num_updates = train_one_epoch(
            forward_model, train_loader, optimizer, loss_fn, epoch=epoch, epochs=epochs, device=dev,
            num_updates=num_updates, scheduler=scheduler, mixup_fn=mixup_fn, ema=ema, ema_source=model,
            scaler=scaler, amp_dtype=amp_dtype, clip_grad=opts.clip_grad,
            hessian_interval=opts.sophia_hessian_interval if opts.optimizer == "sophiag" else 0,
            channels_last=opts.channels_last)
        scheduler.step(epoch + 1)
        _sync_buffers(model, info)
        if ema is not None:
            _sync_buffers(ema.module, info)
        val = evaluate(eval_model, val_loader, device=dev, amp_dtype=amp_dtype,
                       channels_last=opts.channels_last)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": metrics["train_loss"], "lr": metrics["lr"],
                               "val_top1": val["top1"], "val_loss": val["loss"]}
        epoch_top1, epoch_source = val["top1"], "model"
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device=dev, amp_dtype=amp_dtype,
                               channels_last=opts.channels_last)
            row.update(ema_val_top1=ema_val["top1"], ema_val_loss=ema_val["loss"])
            # the token labeler is the best EMA checkpoint (STL); other phases keep the better weights
            if phase == "labeler" or ema_val["top1"] > epoch_top1:
                epoch_top1, epoch_source = ema_val["top1"], "ema"
        improved = epoch_top1 > best_top1
        if improved:
            best_top1, best_epoch, best_source = epoch_top1, epoch, epoch_source
        row.update(best_top1=best_top1, epoch_time=metrics["epoch_time"],
                   images_per_second=metrics["images_per_second"])
        history.append(row)
        train_images += metrics["train_images"]
        train_seconds += metrics["epoch_time"]

        rngs = gather_objects(capture_rng_state())
        if is_main_process():
            ckpt = {
                "format_version": FORMAT_VERSION, **meta, "fingerprint": fp,
                "model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch, "num_updates": num_updates, "best_top1": best_top1, "best_epoch": best_epoch,
                "best_source": best_source, "rng": rngs, "history": history,
            }
            if improved:
                atomic_save(ckpt, best_path)  # best before last: a finished last.pt always has its best.pt
            atomic_save(ckpt, last_path)
            _write_history(out_dir / "history.json", history)
            _log_rows(tracker, phase, [row])
            ema_txt = f", ema {row['ema_val_top1']:.2f}%" if ema is not None else ""
            main_print(f"[{phase}] epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, val top-1 "
                       f"{row['val_top1']:.2f}%{ema_txt}, best {best_top1:.2f}% ({best_source}, epoch "
                       f"{best_epoch + 1}), {row['epoch_time']:.1f}s")
        barrier()

    clear_buffer_pool()  # the MLP buffers kept between steps; not needed once training is over
    summary = {
        "best_top1": best_top1, "best_epoch": best_epoch, "best_source": best_source,
        "epochs_run": epochs - start_epoch, "seconds": time.perf_counter() - start_time,
        "images_per_second": train_images / train_seconds if train_seconds > 0 else 0.0,
        "resumed_from_epoch": resumed_from, "export": str(export_path),
    }
    if is_main_process():
        _export_best(best_path, export_path, phase)
        _write_history(out_dir / "history.json", history)
        _log_summary(tracker, phase, summary, out_dir / "history.json", epochs)
    return broadcast_object(summary)  # rank 0's timings everywhere; also waits for rank 0's exports


def _sync_buffers(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): each rank's last forward updated its own.

    DDP re-broadcasts them before the next training forward anyway; this makes validation (each rank scores
    its shard) and the EMA see the weights that rank 0 saves.
    """
    if info.distributed:
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


def _create_loaders(phase: str, opts: TrainConfig, raw_dir: Path, train_csv: Path, val_csv: Path,
                    info: DistInfo, seed: int, mean: tuple, std: tuple,
                    mixup_on: bool) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    """Train loader (DistributedSampler, drop_last with Mixup) and the rank's disjoint validation shard."""
    from stl.data import ManifestDataset, create_transforms

    if phase == "student":
        from stl.data.stl_transforms import create_paired_transform

        train_tf = create_paired_transform(opts.img_size, opts.auto_augment, opts.reprob, opts.hflip,
                                           opts.scale_min, mean, std)
    else:
        train_tf = create_transforms(opts.img_size, True, auto_augment=opts.auto_augment, reprob=opts.reprob,
                                     hflip=opts.hflip, scale_min=opts.scale_min, mean=mean, std=std)
    val_tf = create_transforms(opts.img_size, False, mean=mean, std=std)
    train_ds = ManifestDataset(train_csv, raw_dir, train_tf)
    val_ds = ManifestDataset(val_csv, raw_dir, val_tf)
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed)
    pin = info.device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=opts.batch_size, sampler=sampler, num_workers=opts.workers,
                              pin_memory=pin, drop_last=mixup_on)
    if len(train_loader) == 0:
        raise ValueError(
            f"{train_csv} has {len(train_ds)} images, {len(sampler)} per process: fewer than "
            f"train.batch_size ({opts.batch_size}), and Mixup/CutMix drops incomplete batches. Lower "
            "train.batch_size"
        )
    shard = Subset(val_ds, list(range(info.rank, len(val_ds), info.world_size)))  # disjoint, no padding
    val_loader = DataLoader(shard, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                            pin_memory=pin)
    return train_loader, sampler, val_loader


def _export_best(best_path: Path, export_path: Path, phase: str) -> dict:
    """Write model.pt / labeler.pt from checkpoints/best.pt (its EMA or model weights, whichever won)."""
    best = load_file(best_path)
    source = best["best_source"]
    weights = best["ema"] if source == "ema" else best["model"]
    export_model(export_path, model_name=best["model_name"], num_classes=best["num_classes"],
                 classes=best["classes"], img_size=best["img_size"], state_dict=weights, source=source,
                 epoch=best["best_epoch"], val_top1=best["best_top1"], phase=phase, mean=best["mean"],
                 std=best["std"])
    return best


def _log_summary(tracker: Any, phase: str, summary: dict, history_path: Path, epochs: int) -> None:
    if tracker is None or not is_main_process():
        return
    tracker.log_metrics({f"{phase}/best_top1": summary["best_top1"],
                         f"{phase}/best_epoch": summary["best_epoch"]}, step=epochs - 1)
    tracker.set_tags({f"{phase}.best_source": summary["best_source"]})
    tracker.log_artifact(history_path)


def _finish_done(state: dict | None, phase: str, best_path: Path, export_path: Path, out_dir: Path,
                 tracker: Any, reason: str, start_time: float) -> dict:
    """A finished run re-run: no training, only the exports (rank 0) and the summary (every rank)."""
    summary = None
    if is_main_process():
        assert state is not None
        main_print(f"[{phase}] nothing to train: {reason}; re-exporting {export_path}")
        _export_best(best_path, export_path, phase)
        history = list(state["history"])
        _write_history(out_dir / "history.json", history)
        _log_rows(tracker, phase, history)
        ips = [r["images_per_second"] for r in history if "images_per_second" in r]
        summary = {
            "best_top1": float(state["best_top1"]), "best_epoch": int(state["best_epoch"]),
            "best_source": state["best_source"], "epochs_run": 0, "seconds": time.perf_counter() - start_time,
            "images_per_second": sum(ips) / len(ips) if ips else 0.0, "resumed_from_epoch": None,
            "export": str(export_path),
        }
        _log_summary(tracker, phase, summary, out_dir / "history.json", int(state["epochs"]))
    return broadcast_object(summary)


def import_labeler(path: str | Path, *, model_name: str, split_dir: Path, out_path: Path, img_size: int,
                   device: str = "auto") -> dict[str, Any]:
    """Validate a token labeler from elsewhere and export it as ``labeler.pt``: a published checkpoint (its
    ``state_dict_ema``, loaded into ``model_name``) or another project's ``labeler.pt`` (kept with its own
    architecture and metadata; its classes must be this dataset's). The student phase feeds it the
    student's teacher views (every FAN model normalises with ImageNet's mean and std).

    The student phase then reads it like a labeler trained here. Returns a short summary.
    """
    from stl.data import read_classes

    info = init_distributed(device)
    classes = read_classes(split_dir)
    model_name = _resolve_name(model_name)
    labeler, meta = _load_labeler(path, info.device, len(classes), img_size, model_name, classes)
    if meta is not None:
        model_name, img_size, mean, std = meta["model_name"], meta["img_size"], meta["mean"], meta["std"]
    else:
        mean, std = _mean_std(labeler)
    if is_main_process():
        export_model(out_path, model_name=model_name, num_classes=len(classes), classes=classes,
                     img_size=img_size, state_dict=labeler.state_dict(), source="ema", epoch=-1,
                     val_top1=float("nan"), phase="labeler", mean=mean, std=std)
    return {"imported": str(path), "model_name": model_name, "export": str(out_path)}
