"""Operators over data sharded across ranks equal the full-data operator; probes agree.

Two gloo processes on the CPU each hold an unequal shard of one data set (rank 0 one batch
of 5 samples, rank 1 two batches of 4 and 5). Every rank's operator must equal the
operator of the whole data set built in this process, and the probes must return the same
numbers on both ranks even though each rank seeds its generator differently.
"""

import pytest
import torch
from torch import nn

from tests._distributed import run_on_ranks
from tests.curvature.test_operators import _StiefelRegression
from torsion.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    diagonal,
    eigsh,
    spectral_density,
    trace,
)

pytestmark = pytest.mark.slow


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(14, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(14, 2, dtype=torch.float64, generator=generator)
    return x, y


def _shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    if rank == 0:
        return [(x[:5], y[:5])]
    return [(x[5:9], y[5:9]), (x[9:], y[9:])]


OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": EmpiricalFisherOperator,
}


def _on_rank(rank: int, world_size: int) -> dict:
    model, loss = _model(), nn.MSELoss()
    shard = _shard(rank)
    # one batch on rank 0 takes the graph-reuse path; two batches on rank 1 do not
    dense = {name: cls(model, loss, shard).to_dense() for name, cls in OPERATORS.items()}
    op = HessianOperator(model, loss, shard)
    probes = _probes(op, seed=100 + rank)  # each rank seeds differently on purpose
    local = HessianOperator(model, loss, shard, distributed=False)
    return {
        "dense": dense,
        "distributed": op.distributed,
        "local": local.to_dense(),
        **probes,
    }


def _probes(op, seed: int) -> dict:
    def generator():
        return torch.Generator().manual_seed(seed)

    return {
        "eigenvalues": eigsh(op, k=2, tol=1e-10, generator=generator()).eigenvalues,
        "trace": trace(op, 12, method="hutchinson", generator=generator()).estimate,
        # operator algebra keeps the all-reduce (and so the shared random vectors)
        "trace of a combination": trace(
            op + 0.5 * op, 12, method="hutchinson", generator=generator()
        ).estimate,
        "diagonal": diagonal(op, 6, generator=generator()).estimate["2.bias"],
        "density": spectral_density(op, 3, 6, generator=generator())[1],
    }


def test_sharded_operators_equal_the_full_data_operator_and_probes_agree():
    results = run_on_ranks(_on_rank, world_size=2)
    model, loss = _model(), nn.MSELoss()
    full = _data()
    for name, cls in OPERATORS.items():
        expected = cls(model, loss, full).to_dense()
        for rank, result in enumerate(results):
            torch.testing.assert_close(
                result["dense"][name], expected, rtol=1e-10, atol=1e-12, msg=f"{name} r{rank}"
            )
    assert all(result["distributed"] for result in results)
    # distributed=False: rank 0's operator is its own shard's
    x, y = _data()
    torch.testing.assert_close(
        results[0]["local"], HessianOperator(model, loss, (x[:5], y[:5])).to_dense()
    )
    # the probes draw rank 0's random vectors on every rank: the results are rank 0's
    # probes of the full-data operator, identical on every rank
    expected = _probes(HessianOperator(model, loss, full), seed=100)
    for key, value in expected.items():
        assert torch.equal(results[0][key], results[1][key]), key
        torch.testing.assert_close(results[0][key], value, rtol=1e-9, atol=1e-12, msg=key)


def _stiefel_model() -> nn.Module:
    return _StiefelRegression(torch.Generator().manual_seed(2))


def _riemannian_on_rank(rank: int, world_size: int) -> torch.Tensor:
    x, y = _data()
    x = torch.cat([x, x[:, :1]], dim=1)  # the Stiefel model takes 4 features
    shard = (x[:3], y[:3]) if rank == 0 else (x[3:], y[3:])
    return HessianOperator(_stiefel_model(), nn.MSELoss(), shard, riemannian=True).to_dense()


def test_riemannian_operator_all_reduces_gradient_and_products():
    results = run_on_ranks(_riemannian_on_rank, world_size=2)
    x, y = _data()
    x = torch.cat([x, x[:, :1]], dim=1)
    op = HessianOperator(_stiefel_model(), nn.MSELoss(), (x, y), riemannian=True)
    expected = op.to_dense()
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_distributed_true_without_a_process_group_says_so():
    x, y = _data()
    with pytest.raises(RuntimeError, match="init_process_group"):
        HessianOperator(_model(), nn.MSELoss(), (x, y), distributed=True)
