"""predict_logits: token-model tuples, the fused formula, and sharding over simulated ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import stl.evaluate.predict as predict_mod
from stl.evaluate.predict import ShardSampler, merge_shards, predict_logits, predict_shard, shard_loader

K, N_TOKENS, DIM = 4, 6, 8


class TinyToken(nn.Module):
    """Returns (cls [B, K], aux [B, N, K]) like a ``*_token`` FAN; dropout makes eval mode observable."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(DIM, N_TOKENS * DIM)
        self.head = nn.Linear(DIM, K)
        self.aux_head = nn.Linear(DIM, K)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.drop(self.tokens(x).view(x.shape[0], N_TOKENS, DIM))
        return self.head(t.mean(dim=1)), self.aux_head(t)


class TinyPlain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture()
def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(23, DIM, generator=g), torch.randint(0, K, (23,), generator=g))


@pytest.fixture()
def model() -> TinyToken:
    torch.manual_seed(0)
    return TinyToken()


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_sampler_disjoint_complete_unpadded(n: int, world_size: int) -> None:
    shards = [list(ShardSampler(n, r, world_size)) for r in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # complete, no duplicate, no padding
    assert [len(ShardSampler(n, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]
    assert shards[0] == list(range(0, n, world_size))


def test_shard_sampler_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(5, 2, 2)


def test_token_model_fused_formula(model: TinyToken, dataset: TensorDataset) -> None:
    model.train()
    out = predict_logits(model, shard_loader(dataset, 5, 0), "cpu", fused_weight=0.5)
    assert model.training  # mode restored
    assert set(out) == {"labels", "logits", "fused_logits"}
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        cls, aux = model(x)
    np.testing.assert_array_equal(out["labels"], y.numpy())
    np.testing.assert_allclose(out["logits"], cls.numpy(), rtol=1e-6, atol=1e-6)
    expected = cls.numpy() + 0.5 * aux.numpy().max(axis=1)
    np.testing.assert_allclose(out["fused_logits"], expected, rtol=1e-6, atol=1e-6)
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (23, K)

    out2 = predict_logits(model, shard_loader(dataset, 5, 0), "cpu", fused_weight=2.0)
    np.testing.assert_allclose(out2["fused_logits"] - out2["logits"], 2.0 * aux.numpy().max(axis=1),
                               rtol=1e-5, atol=1e-5)


def test_plain_model_has_no_fused(dataset: TensorDataset) -> None:
    torch.manual_seed(0)
    out = predict_logits(TinyPlain(), shard_loader(dataset, 8, 0), "cpu")
    assert set(out) == {"labels", "logits"}


def test_bf16_autocast_returns_float32(model: TinyToken, dataset: TensorDataset) -> None:
    ref = predict_logits(model, shard_loader(dataset, 8, 0), "cpu")
    out = predict_logits(model, shard_loader(dataset, 8, 0), "cpu", amp_dtype=torch.bfloat16)
    assert out["logits"].dtype == np.float32 and out["fused_logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_simulated_ranks_merge_to_single_process(model: TinyToken, dataset: TensorDataset,
                                                 world_size: int) -> None:
    single = predict_logits(model, shard_loader(dataset, 4, 0, rank=0, world_size=1), "cpu")
    shards = [predict_shard(model, shard_loader(dataset, 4, 0, rank=r, world_size=world_size), "cpu")
              for r in range(world_size)]
    assert sum(len(s["indices"]) for s in shards) == len(dataset)
    merged = merge_shards(shards)
    assert set(merged) == set(single)
    np.testing.assert_array_equal(merged["labels"], single["labels"])
    for key in ("logits", "fused_logits"):
        np.testing.assert_allclose(merged[key], single[key], rtol=1e-6, atol=1e-6)


def test_predict_logits_gathers_through_distributed(model: TinyToken, dataset: TensorDataset,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2: its own shard plus rank 0's, gathered in rank order, give the full dataset in order."""
    rank0 = predict_shard(model, shard_loader(dataset, 4, 0, rank=0, world_size=2), "cpu")
    monkeypatch.setattr(predict_mod, "gather_objects", lambda obj: [rank0, obj])
    out = predict_logits(model, shard_loader(dataset, 4, 0, rank=1, world_size=2), "cpu")
    np.testing.assert_array_equal(out["labels"], dataset.tensors[1].numpy())
    assert out["logits"].shape == (len(dataset), K)


def test_more_ranks_than_samples(model: TinyToken) -> None:
    ds = TensorDataset(torch.randn(2, DIM), torch.tensor([1, 3]))
    shards = [predict_shard(model, shard_loader(ds, 4, 0, rank=r, world_size=4), "cpu") for r in range(4)]
    merged = merge_shards(shards)
    np.testing.assert_array_equal(merged["labels"], [1, 3])
    assert merged["fused_logits"].shape == (2, K)


def test_unsharded_loaders_on_every_rank_are_rejected(model: TinyToken, dataset: TensorDataset) -> None:
    loader = DataLoader(dataset, batch_size=8)  # sequential: each rank would predict everything
    shards = [predict_shard(model, loader, "cpu") for _ in range(2)]
    with pytest.raises(ValueError, match="partition"):
        merge_shards(shards)


def test_shuffled_loader_is_rejected(model: TinyToken, dataset: TensorDataset) -> None:
    with pytest.raises(ValueError, match="fixed order"):
        predict_shard(model, DataLoader(dataset, batch_size=8, shuffle=True), "cpu")


def test_unexpected_output_is_named(dataset: TensorDataset) -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :K], x[:, :K]

    with pytest.raises(ValueError, match="unexpected model output"):
        predict_logits(Bad(), shard_loader(dataset, 8, 0), "cpu")
