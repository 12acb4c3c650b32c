"""End-to-end phases on ~40 generated 32 px images with a tiny FAN: outputs, resume, re-run, errors, STL.

    pytest tests/train/test_run.py -q
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch

from stl.config import StlConfig
from stl.models import cpu_kernels
from stl.models.trained import export_model, load_file, load_trained_model
from stl.train import run as run_mod
from stl.train.run import train_model

from .tiny import TINY, TINY_TOKEN, make_split, register_tiny_models, tiny_opts


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    register_tiny_models()
    return make_split(tmp_path_factory.mktemp("data"), n_per_class=20)


class _Recorder:
    """A stand-in for stl.tracking.Tracker that remembers what was logged."""

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.tags: dict = {}
        self.artifacts: list[Path] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((metrics, step))

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))


def _train(data: tuple[Path, Path], out: Path, epochs: int = 2, phase: str = "supervised",
           model: str = TINY, **kw) -> dict:
    split, raw = data
    opts = kw.pop("opts", None) or tiny_opts()
    return train_model(phase=phase, model_name=model, split_dir=split, raw_dir=raw, out_dir=out, opts=opts,
                       epochs=epochs, seed=0, device="cpu", **kw)


def test_supervised_run_writes_outputs_and_rerun_is_noop(data, tmp_path: Path, capsys) -> None:
    tracker = _Recorder()
    out = tmp_path / "out"
    summary = _train(data, out, tracker=tracker)
    assert summary["epochs_run"] == 2 and summary["resumed_from_epoch"] is None
    assert summary["best_source"] in ("ema", "model") and 0 <= summary["best_top1"] <= 100
    assert summary["images_per_second"] > 0 and summary["export"] == str(out / "model.pt")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "history.json", "model.pt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert {"train_loss", "lr", "val_top1", "val_loss", "ema_val_top1", "epoch_time"} <= set(history[0])
    model, meta = load_trained_model(out / "model.pt")
    assert meta["classes"] == ["bright", "dark"] and meta["num_classes"] == 2 and meta["img_size"] == 32
    assert meta["source"] == summary["best_source"] and meta["epoch"] == summary["best_epoch"]
    assert meta["phase"] == "supervised" and len(meta["mean"]) == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)

    last = load_file(out / "checkpoints" / "last.pt")
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "num_updates", "best_top1",
            "best_epoch", "best_source", "rng", "fingerprint", "model_name", "num_classes", "classes",
            "img_size", "phase"} <= set(last)
    assert last["epoch"] == 1 and last["num_updates"] == 2 * 3  # 24 train images / batch 8, drop_last

    steps = [s for m, s in tracker.metrics if "supervised/train_loss" in m]
    assert steps == [0, 1]
    assert all(k.startswith("supervised/") for m, _ in tracker.metrics for k in m)
    assert tracker.artifacts == [out / "history.json"]

    (out / "model.pt").unlink()
    capsys.readouterr()
    again = _train(data, out)
    assert again["epochs_run"] == 0 and again["best_top1"] == summary["best_top1"]
    assert "nothing to train" in capsys.readouterr().out
    assert (out / "model.pt").is_file()


def _crash_at(epoch_to_fail: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = run_mod.train_one_epoch

    def crashing(*args, **kwargs):
        if kwargs["epoch"] == epoch_to_fail:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "train_one_epoch", crashing)


@pytest.mark.parametrize("optimizer", ["adamw", "sophiag"])
def test_resume_equals_uninterrupted_bit_exact(data, tmp_path: Path, monkeypatch, capsys, optimizer) -> None:
    opts = tiny_opts(optimizer=optimizer, sophia_hessian_interval=2, clip_grad=1.0)
    straight = _train(data, tmp_path / "straight", epochs=3, opts=opts)

    with monkeypatch.context() as m:
        _crash_at(2, m)
        with pytest.raises(KeyboardInterrupt):
            _train(data, tmp_path / "resumed", epochs=3, opts=opts)
    assert load_file(tmp_path / "resumed" / "checkpoints" / "last.pt")["epoch"] == 1
    capsys.readouterr()
    resumed = _train(data, tmp_path / "resumed", epochs=3, opts=opts)
    text = capsys.readouterr().out
    assert "resuming from" in text and "epoch 3/3" in text
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 1

    a = load_file(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert a["num_updates"] == b["num_updates"] and a["history"][-1]["lr"] == b["history"][-1]["lr"]
    assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]]
    assert straight["best_top1"] == resumed["best_top1"]
    ea = load_file(tmp_path / "straight" / "model.pt")["state_dict"]
    eb = load_file(tmp_path / "resumed" / "model.pt")["state_dict"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_message_and_changed_settings_start_fresh(data, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_at(1, m)
        with pytest.raises(KeyboardInterrupt):
            _train(data, out, epochs=2)
    capsys.readouterr()
    with monkeypatch.context() as m:  # layout/recompute settings do not change what is trained: resume
        _crash_at(1, m)
        with pytest.raises(KeyboardInterrupt):
            _train(data, out, epochs=2, opts=tiny_opts(channels_last=True, grad_checkpointing=True))
    assert "resuming from" in capsys.readouterr().out
    summary = _train(data, out, epochs=2, opts=tiny_opts(lr=5e-4))
    text = capsys.readouterr().out
    assert "starting fresh" in text and "fingerprint differs" in text
    assert summary["epochs_run"] == 2


def test_changed_images_under_the_same_names_start_fresh(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from stl.data import split_dataset

    register_tiny_models()
    data = make_split(tmp_path / "data", n_per_class=10)
    split, raw = data
    _train(data, tmp_path / "out", epochs=1)
    first = (split / "train.csv").read_text().splitlines()[1].split(",")[0]
    Image.new("RGB", (32, 32), (7, 7, 7)).save(raw / first)  # a corrected image, same file name
    split_dataset(raw, split, 0.6, 0.2, 0.2, seed=0)
    capsys.readouterr()
    summary = _train(data, tmp_path / "out", epochs=1)
    assert "fingerprint differs" in capsys.readouterr().out and summary["epochs_run"] == 1
    first_test = (split / "test.csv").read_text().splitlines()[1].split(",")[0]
    Image.new("RGB", (32, 32), (9, 9, 9)).save(raw / first_test)  # a test image does not change training
    split_dataset(raw, split, 0.6, 0.2, 0.2, seed=0)
    assert _train(data, tmp_path / "out", epochs=1)["epochs_run"] == 0


def test_odd_batch_with_mixup_is_refused(data, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.batch_size is 7 .*even"):
        _train(data, tmp_path, opts=tiny_opts(batch_size=7))
    # without mixing an odd batch is fine
    summary = _train(data, tmp_path / "ok", epochs=1, opts=tiny_opts(batch_size=7, mixup=0.0, cutmix=0.0))
    assert summary["epochs_run"] == 1


def test_bad_settings_are_refused(data, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        _train(data, tmp_path, opts=tiny_opts(amp="fp16"))
    with pytest.raises(ValueError, match="Lower train.batch_size"):
        _train(data, tmp_path, opts=tiny_opts(batch_size=64))
    with pytest.raises(ValueError, match="token model"):
        _train(data, tmp_path, phase="labeler", stl=StlConfig())


def test_bf16_finetune_without_ema(data, tmp_path: Path, capsys) -> None:
    torch.manual_seed(1)
    source = timm.create_model(TINY, num_classes=3, img_size=32)
    pretrained = tmp_path / "pretrained.pt"
    export_model(pretrained, model_name=TINY, num_classes=3, classes=["a", "b", "c"], img_size=32,
                 state_dict=source.state_dict(), source="model", epoch=0, val_top1=0.0, phase="supervised",
                 mean=(0.5,) * 3, std=(0.5,) * 3)
    opts = tiny_opts(amp="bf16", ema=False, auto_augment="", reprob=0.0, pretrained=str(pretrained))
    summary = _train(data, tmp_path / "out", epochs=1, opts=opts)
    text = capsys.readouterr().out
    assert "fine-tuning from" in text and "re-initialised head.weight" in text  # 3-class head -> 2 classes
    assert summary["best_source"] == "model"
    last = load_file(tmp_path / "out" / "checkpoints" / "last.pt")
    assert last["ema"] is None and last["model"]["head.weight"].shape == (2, 32)


def test_stl_labeler_then_student(data, tmp_path: Path) -> None:
    stl = dataclasses.replace(StlConfig(), labeler_epochs=1)
    tracker = _Recorder()
    lab = _train(data, tmp_path / "labeler", epochs=1, phase="labeler", model=TINY_TOKEN, stl=stl,
                 tracker=tracker)
    labeler_file = tmp_path / "labeler" / "labeler.pt"
    assert labeler_file.is_file() and not (tmp_path / "labeler" / "model.pt").exists()
    assert load_file(labeler_file)["phase"] == "labeler" and lab["epochs_run"] == 1
    assert lab["best_source"] == load_file(labeler_file)["source"] == "ema"  # STL: the best EMA checkpoint
    student = _train(data, tmp_path / "student", epochs=1, phase="student", model=TINY_TOKEN, stl=stl,
                     labeler_path=labeler_file, tracker=tracker)
    assert student["epochs_run"] == 1
    _, meta = load_trained_model(tmp_path / "student" / "model.pt")
    assert meta["phase"] == "student"
    keys = {k for m, _ in tracker.metrics for k in m}
    assert "labeler/train_loss" in keys and "student/val_top1" in keys


def test_load_labeler_published_checkpoint(tmp_path: Path) -> None:
    """A timm-0.5-style file (pickled argparse.Namespace, state_dict_ema) loads frozen; wrong K is refused."""
    import argparse

    register_tiny_models()
    torch.manual_seed(0)
    src = timm.create_model(TINY_TOKEN, num_classes=2, img_size=32)
    path = tmp_path / "published.pth.tar"
    torch.save({"epoch": 3, "arch": TINY_TOKEN, "state_dict": src.state_dict(),
                "state_dict_ema": src.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    labeler = run_mod.load_labeler(path, "cpu", num_classes=2, img_size=32, model_name=TINY_TOKEN)
    assert not labeler.training and not any(p.requires_grad for p in labeler.parameters())
    assert all(torch.equal(a, b) for a, b in zip(labeler.state_dict().values(), src.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match="heads do not fit 5 classes"):
        run_mod.load_labeler(path, "cpu", num_classes=5, img_size=32, model_name=TINY_TOKEN)
    with pytest.raises(FileNotFoundError, match="train_labeler"):
        run_mod.load_labeler(tmp_path / "nope.pt", "cpu", num_classes=2, img_size=32)


def test_import_labeler_exports_a_published_labeler_for_the_student(data, tmp_path: Path) -> None:
    """stl.labeler = a published file: validated and written as labeler.pt, which the student phase reads."""
    import argparse

    register_tiny_models()
    split, _ = data
    src = timm.create_model(TINY_TOKEN, num_classes=2, img_size=32)
    path = tmp_path / "published.pth.tar"
    torch.save({"state_dict_ema": src.state_dict(), "args": argparse.Namespace(model=TINY_TOKEN)}, path)
    out = tmp_path / "labeler" / "labeler.pt"
    run_mod.import_labeler(path, model_name=TINY_TOKEN, split_dir=split, out_path=out, img_size=32,
                           device="cpu")
    labeler = run_mod.load_labeler(out, "cpu", num_classes=2, img_size=32)
    assert all(torch.equal(a, b) for a, b in zip(labeler.state_dict().values(), src.state_dict().values(),
                                                 strict=True))
    assert load_file(out)["phase"] == "labeler"


def test_import_labeler_keeps_a_project_labelers_architecture_and_checks_classes(data, tmp_path) -> None:
    register_tiny_models()
    split, _ = data
    src = timm.create_model(TINY_TOKEN, num_classes=2, img_size=32)
    other = tmp_path / "other" / "labeler.pt"
    export_model(other, model_name=TINY_TOKEN, num_classes=2, classes=["bright", "dark"], img_size=32,
                 state_dict=src.state_dict(), source="ema", epoch=3, val_top1=0.9, phase="labeler",
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = tmp_path / "labeler" / "labeler.pt"
    # the stage passes the student's architecture; a project file keeps its own
    run_mod.import_labeler(other, model_name="fan_tiny_8_p4_hybrid_token", split_dir=split, out_path=out,
                           img_size=64, device="cpu")
    meta = load_file(out)
    assert (meta["model_name"], meta["img_size"], tuple(meta["mean"])) == (TINY_TOKEN, 32, (0.5, 0.5, 0.5))
    run_mod.load_labeler(out, "cpu", num_classes=2, img_size=32, classes=["bright", "dark"])
    renamed = tmp_path / "renamed" / "labeler.pt"
    export_model(renamed, model_name=TINY_TOKEN, num_classes=2, classes=["x", "y"], img_size=32,
                 state_dict=src.state_dict(), source="ema", epoch=3, val_top1=0.9, phase="labeler",
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"labels the classes \['x', 'y'\] but the dataset's are"):
        run_mod.import_labeler(renamed, model_name=TINY_TOKEN, split_dir=split, out_path=tmp_path / "l.pt",
                               img_size=32, device="cpu")
    assert not (tmp_path / "l.pt").exists()


def test_only_settings_that_change_the_weights_are_fingerprinted() -> None:
    stl, hot = StlConfig(), StlConfig(gumbel_tau=3.0)
    assert run_mod._phase_stl_settings("student", stl) == run_mod._phase_stl_settings("student", hot)  # hard
    soft, soft_hot = StlConfig(token_label="soft"), StlConfig(token_label="soft", gumbel_tau=3.0)
    assert run_mod._phase_stl_settings("student", soft) != run_mod._phase_stl_settings("student", soft_hot)
    dense = StlConfig(dense_weight=2.0)
    assert run_mod._phase_stl_settings("labeler", stl) == run_mod._phase_stl_settings("labeler", dense)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cpu_kernels_option_trains_with_them_and_restores_the_setting(data, tmp_path: Path, monkeypatch,
                                                                       amp: str) -> None:
    calls: list[torch.dtype] = []  # the activations' dtype per BatchNorm the kernels ran
    forward = cpu_kernels.bn_train_forward

    def counted(x, *args, **kwargs):
        calls.append(x.dtype)
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "bn_train_forward", counted)
    assert not cpu_kernels.cpu_kernels_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="stl: the fused CPU kernels")  # they build here
        summary = _train(data, tmp_path / "out", epochs=1, opts=tiny_opts(cpu_kernels=True, amp=amp))
    assert calls and summary["epochs_run"] == 1
    assert set(calls) == {torch.bfloat16 if amp == "bf16" else torch.float32}
    assert not cpu_kernels.cpu_kernels_enabled()  # a later run in this process gets torch's ops again
