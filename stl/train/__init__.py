"""Training: loops, optimizers (AdamW, SophiaG), schedules, checkpoints and the phase orchestration.

    from stl.train import train_model, load_trained_model
    summary = train_model(phase="supervised", model_name=..., split_dir=..., raw_dir=..., out_dir=...,
                          opts=cfg.train, epochs=cfg.train.epochs, seed=cfg.seed)
    model, meta = load_trained_model(out_dir / "model.pt")

STL: ``phase="labeler"`` trains the token labeler (exports ``labeler.pt``), ``phase="student"`` trains on its
token labels (``labeler_path=...``). The losses and token labels are in ``stl.train.losses`` and
``stl.train.token_labels``.
"""

from stl.models.trained import CheckpointError, load_trained_model
from stl.train.engine import NonFiniteLossError
from stl.train.run import load_labeler, train_model

__all__ = ["CheckpointError", "NonFiniteLossError", "load_labeler", "load_trained_model", "train_model"]
