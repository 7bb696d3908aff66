"""DLRM dense tower: shapes, the dot interaction against loops, gradients, init, the protocol."""

import numpy as np
import pytest
import torch
from torch import nn

from worker.data_options import SyntheticConfig
from worker.features import keys_from_values
from worker.metrics import auc
from worker.model import DenseTower, DLRMDenseTower, check_dense_tower
from worker.model_config import ModelConfig
from worker.synthetic import Split, SyntheticData

SMALL = ModelConfig(num_dense=5, num_sparse=3, dim=4, bottom_sizes=(8,), top_sizes=(6,), seed=1)


def inputs(config: ModelConfig, batch_size: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch_size, config.num_dense, generator=generator)
    embeddings = torch.randn(batch_size, config.num_sparse, config.dim, generator=generator)
    return dense, embeddings


def test_output_shape_and_dtype():
    model = DLRMDenseTower(SMALL)
    logits = model(*inputs(SMALL))
    assert logits.shape == (7,) and logits.dtype == torch.float32
    assert model.top[0].in_features == 4 + 6  # dim + (F + 1) F / 2 with F = 3
    assert isinstance(model, DenseTower)


def test_dot_interaction_matches_explicit_loops():
    model = DLRMDenseTower(SMALL)
    dense, embeddings = inputs(SMALL, batch_size=2)
    expected = []
    for i in range(2):
        x = model.bottom(dense[i : i + 1])[0]
        vectors = [x] + [embeddings[i, f] for f in range(SMALL.num_sparse)]
        dots = [torch.dot(vectors[a], vectors[b]) for a in range(len(vectors)) for b in range(a + 1, len(vectors))]
        expected.append(model.top(torch.cat([x, torch.stack(dots)]).unsqueeze(0))[0, 0])
    torch.testing.assert_close(model(dense, embeddings), torch.stack(expected))


def test_gradients_reach_the_embeddings_and_every_parameter():
    model = DLRMDenseTower(SMALL)
    dense, embeddings = inputs(SMALL)
    embeddings.requires_grad_(True)
    model(dense, embeddings).sum().backward()
    assert embeddings.grad is not None and embeddings.grad.shape == (7, 3, 4)
    assert embeddings.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    # Finite differences on one embedding entry agree with autograd.
    with torch.no_grad():
        bumped = embeddings.detach().clone()
        bumped[2, 1, 3] += 1e-3
        numeric = (model(dense, bumped).sum() - model(dense, embeddings.detach()).sum()) / 1e-3
    assert numeric.item() == pytest.approx(embeddings.grad[2, 1, 3].item(), rel=2e-2, abs=1e-3)


def test_init_is_deterministic_from_the_seed():
    torch.manual_seed(123)
    a = DLRMDenseTower(SMALL).state_dict()
    torch.manual_seed(456)
    b = DLRMDenseTower(SMALL).state_dict()
    c = DLRMDenseTower(ModelConfig(**{**SMALL.__dict__, "seed": 2})).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["bottom.0.weight"], c["bottom.0.weight"])


def test_shape_errors_name_the_argument():
    model = DLRMDenseTower(SMALL)
    dense, embeddings = inputs(SMALL)
    with pytest.raises(ValueError, match="dense"):
        model(dense[:, :4], embeddings)
    with pytest.raises(ValueError, match="embeddings"):
        model(dense, embeddings[:, :2])
    with pytest.raises(ValueError, match="embeddings"):
        model(dense, embeddings[:3])
    with pytest.raises(ValueError, match="dim"):
        ModelConfig(dim=0)
    with pytest.raises(ValueError, match="top_sizes"):
        ModelConfig(top_sizes=(4, 0))
    with pytest.raises(ValueError, match=r"^num_dense: makes a layer 65,537 wide"):
        ModelConfig(num_dense=65537)
    with pytest.raises(ValueError, match=r"^num_sparse: makes a layer 65,719 wide"):
        ModelConfig(num_sparse=362, dim=16)  # 16 + 363 * 362 / 2


class MeanPoolTower(nn.Module):
    """A user's replacement: mean of the embeddings, concatenated with dense, then a linear layer."""

    def __init__(self, num_dense: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_dense + dim, 1)

    def forward(self, dense: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([dense, embeddings.mean(dim=1)], dim=1)).squeeze(1)


def test_a_custom_tower_follows_the_protocol():
    check_dense_tower(MeanPoolTower(5, 4), num_dense=5, num_sparse=3, dim=4)
    check_dense_tower(DLRMDenseTower(SMALL), num_dense=5, num_sparse=3, dim=4)

    class Unsqueezed(MeanPoolTower):
        def forward(self, dense, embeddings):
            return super().forward(dense, embeddings).unsqueeze(1)

    class Detached(MeanPoolTower):
        def forward(self, dense, embeddings):
            return super().forward(dense, embeddings.detach())

    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        check_dense_tower(Unsqueezed(5, 4), num_dense=5, num_sparse=3, dim=4)
    with pytest.raises(ValueError, match="embeddings"):
        check_dense_tower(Detached(5, 4), num_dense=5, num_sparse=3, dim=4)


@pytest.mark.parametrize("tower", ["dlrm", "custom"])
def test_tower_learns_the_planted_signal(tower):
    """The trainer's loop in miniature: an nn.Embedding over every key stands in for the PS."""
    data = SyntheticData(
        SyntheticConfig(num_dense=4, num_sparse=4, num_keys=50, global_batch_size=256, num_batches=100, seed=5)
    )
    config = ModelConfig(num_dense=4, num_sparse=4, dim=8, bottom_sizes=(16,), top_sizes=(16,), seed=0)
    model = DLRMDenseTower(config) if tower == "dlrm" else MeanPoolTower(4, 8)
    all_keys = np.sort(np.concatenate([keys_from_values(np.arange(50, dtype=np.uint64), f) for f in range(4)]))
    torch.manual_seed(0)
    table = nn.Embedding(all_keys.shape[0], 8)
    nn.init.normal_(table.weight, std=0.1)

    def lookup(sparse: np.ndarray) -> torch.Tensor:
        return table(torch.from_numpy(np.searchsorted(all_keys, sparse)))

    optimizer = torch.optim.Adam(list(model.parameters()), lr=0.01)
    row_optimizer = torch.optim.Adagrad(table.parameters(), lr=0.1)
    for t in range(100):
        batch = data.global_batch(t)
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch.dense, lookup(batch.sparse)), batch.labels)
        optimizer.zero_grad()
        row_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row_optimizer.step()
    held_out = data.global_batch(0, Split.EVAL)
    with torch.no_grad():
        scores = model(held_out.dense, lookup(held_out.sparse))
    best = auc(held_out.labels.numpy(), data.true_logits(held_out.dense.numpy(), held_out.sparse))
    learned = auc(held_out.labels.numpy(), scores.numpy())
    assert learned > best - 0.06
