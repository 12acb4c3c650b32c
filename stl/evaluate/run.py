"""The evaluate stage's work: test-split metrics, robustness and token-label maps of the trained model.

    python stages/evaluate.py                                         # one process
    torchrun --standalone --nproc_per_node=2 stages/evaluate.py       # sharded; identical metrics

Predictions are sharded over ranks without padding and gathered in dataset order, so the metrics equal the
single-process ones exactly. Robustness and token maps run on rank 0 (they are small and seeded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from stl.data import ManifestDataset, create_transforms, load_display_image
from stl.distributed import init_distributed, is_main_process, main_print
from stl.evaluate.metrics import compute_metrics, scalar_metrics, softmax, write_evaluation, write_json
from stl.evaluate.predict import predict_logits, shard_loader
from stl.evaluate.robustness import (
    evaluate_robustness,
    robustness_metrics,
    write_robustness,
    write_robustness_disabled,
)
from stl.models import is_token_model, load_trained_model
from stl.models.outputs import FUSED_WEIGHT, prediction_logits, token_grid


def token_map(model: torch.nn.Module, image: torch.Tensor) -> dict[str, Any]:
    """Per-token class and confidence of a token model's aux head for one normalised image [3, H, W]."""
    with torch.inference_mode():
        _, aux = model(image.unsqueeze(0))
    probs = aux.float().softmax(-1)[0]  # [N, K]
    conf, cls = probs.max(-1)
    h, w = token_grid(tuple(image.shape[-2:]), probs.shape[0])
    return {"classes": cls.reshape(h, w).tolist(), "confidence": conf.reshape(h, w).tolist()}


class ProbabilityModel(torch.nn.Module):
    """The served form of a trained model: RGB images in 0..1 [B, 3, H, W] -> class probabilities [B, K].

    Normalises inside, and for token models uses the fused prediction (cls + w * max over tokens of aux), so
    ``mlflow.pyfunc.load_model(...).predict(batch)`` needs nothing but the pixels.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        fused_weight: float = FUSED_WEIGHT,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.fused_weight = fused_weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model((images.float() - self.mean) / self.std)
        return prediction_logits(out, self.fused_weight).softmax(-1)


class _LazyImages(Sequence):
    """Test images decoded on first access, so a robustness sample cap does not decode the whole split."""

    def __init__(self, paths: Sequence[Path], img_size: int) -> None:
        self.paths, self.img_size = list(paths), img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        return load_display_image(self.paths[i], self.img_size)


def evaluate_model(
    *,
    model_path: Path,
    split_dir: Path,
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    batch_size: int,
    fused_weight: float,
    device: str = "auto",
    workers: int = 0,
    labeler_path: Path | None = None,
    token_maps: int = 0,
    robustness: bool = False,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (),
    max_samples: int = 0,
    seed: int = 0,
    tracker: Any = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model_path`` on ``split_dir/test.csv``; write ``metrics_path`` and ``out_dir`` (rank 0).

    With a ``tracker``, the model is logged to MLflow as a :class:`ProbabilityModel` (with a signature).
    Returns the scalar metric groups (``test``, ``test_fused`` for token models, ``robustness``) on rank 0,
    an empty dict elsewhere.
    """
    info = init_distributed(device)
    model, meta = load_trained_model(model_path, info.device)
    mean, std, img_size = meta["mean"], meta["std"], meta["img_size"]
    classes = meta["classes"]
    transform = create_transforms(img_size, train=False, mean=mean, std=std)
    dataset = ManifestDataset(split_dir / "test.csv", raw_dir, transform=transform)
    if list(dataset.classes) != list(classes):
        raise ValueError(
            f"{model_path}: the model's classes {classes} differ from {split_dir}/classes.json "
            f"{list(dataset.classes)}; re-run training (dvc repro)"
        )
    loader = shard_loader(dataset, batch_size, workers)
    pred = predict_logits(model, loader, info.device, fused_weight=fused_weight)
    if not is_main_process():
        return {}  # the rest (metrics, robustness, files) is rank 0's; waiting ranks could hit NCCL's timeout

    labels = pred["labels"]
    results = {"test": compute_metrics(labels, pred["logits"], classes)}
    if "fused_logits" in pred:
        results["test_fused"] = compute_metrics(labels, pred["fused_logits"], classes)
    extra: dict[str, dict[str, Any]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)

    if robustness:
        images = _LazyImages(dataset.paths, img_size)  # only the sampled subset is decoded
        normalise = create_transforms(img_size, train=False, mean=mean, std=std)

        def predict_fn(batch: list[Image.Image]) -> np.ndarray:
            x = torch.stack([normalise(im) for im in batch]).to(info.device)
            with torch.inference_mode():
                logits = prediction_logits(model(x), fused_weight)
            return logits.argmax(-1).cpu().numpy()

        main_print(f"robustness: {len(corruptions)} corruptions x {len(severities)} severities")
        result = evaluate_robustness(
            predict_fn,
            images,
            labels,
            list(corruptions),
            list(severities),
            max_samples=max_samples,
            seed=seed,
            batch_size=batch_size,
        )
        write_robustness(result, out_dir)
        extra["robustness"] = robustness_metrics(result)
    else:
        write_robustness_disabled(out_dir)

    if token_maps and is_token_model(meta["model_name"]):
        labeler = load_trained_model(labeler_path, info.device)[0] if labeler_path else None
        maps = []
        for i in range(min(token_maps, len(dataset))):
            x = dataset[i][0].to(info.device)
            entry = {"path": dataset.rel_paths[i], "label": int(labels[i]), "student": token_map(model, x)}
            if labeler is not None:
                entry["labeler"] = token_map(labeler, x)
            maps.append(entry)
        write_json(out_dir / "token_maps.json", {"classes": classes, "img_size": img_size, "maps": maps})

    probs = softmax(pred["logits"])
    write_evaluation(
        out_dir,
        metrics_path,
        results,
        labels,
        probs.argmax(1),
        probs,
        dataset.rel_paths,
        classes,
        extra_metrics=extra,
    )
    write_json(out_dir / "model_meta.json", dict(meta))
    if tracker is not None:
        example = torch.stack([TF.to_tensor(load_display_image(p, img_size)) for p in dataset.paths[:2]])
        tracker.log_model(ProbabilityModel(model.cpu(), mean, std, fused_weight), example)
    scalars = {g: scalar_metrics(r) for g, r in results.items()} | extra
    main_print(
        json.dumps(
            {
                g: {
                    k: v
                    for k, v in s.items()
                    if k in ("top1", "macro_f1", "macro_auc", "mean_corruption_top1")
                }
                for g, s in scalars.items()
            }
        )
    )
    return scalars
