"""Operators over data sharded across ranks equal the full-data operator; probes agree.

Two gloo processes on the CPU each hold an unequal shard of one data set (rank 0 one batch
of 5 samples, rank 1 two batches of 4 and 5). Every rank's operator must equal the
operator of the whole data set built in this process, and the probes must return the same
numbers on both ranks even though each rank seeds its generator differently.

Ranks may also differ by design: select the parameters in different orders, hold an empty
shard, or monitor on one rank only; and ranks that disagree on the parameters (or hold no
sample at all) must raise the same error on every rank instead of hanging or summing
entries of different parameters.
"""

import traceback

import pytest
import torch
from torch import nn

from tests._distributed import run_on_ranks
from tests.curvature.test_operators import _StiefelRegression
from torsion.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    SharpnessMonitor,
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


# ------------------------------------------------------------- ranks that differ by design
# One spawn runs every part on both ranks (a spawn costs seconds); a part's error is kept
# as text, so each test reports its own part.


def _selection_in_each_ranks_order(rank: int) -> dict:
    """The same parameters, selected in a different iteration order on each rank (a set's
    order depends on object addresses, which differ between processes)."""
    model = _model()
    tensors = list(model.parameters())
    params = tensors[::-1] if rank == 0 else set(tensors)
    op = HessianOperator(model, nn.MSELoss(), _shard(rank), params)
    names = list(op.unflatten(torch.zeros(op.shape[0], dtype=torch.float64)))
    return {"names": names, "dense": op.to_dense()}


EMPTY_SHARDS = {"no batches": [], "zero samples": (_data()[0][:0], _data()[1][:0])}
EMPTY_SHARD_OPERATORS = {
    **OPERATORS,
    "hessian, graph reuse": lambda *args: HessianOperator(*args, method="graph_reuse"),
}


def _empty_shard_on_rank_1(rank: int) -> dict:
    """Rank 0 holds all the data as one batch (the graph-reuse path), rank 1 nothing."""
    dense = {}
    for form, empty in EMPTY_SHARDS.items():
        shard = _data() if rank == 0 else empty
        for name, build in EMPTY_SHARD_OPERATORS.items():
            dense[name, form] = build(_model(), nn.MSELoss(), shard).to_dense()
    x, y = _data()
    x = torch.cat([x, x[:, :1]], dim=1)  # the Stiefel model takes 4 features
    shard = (x, y) if rank == 0 else (x[:0], y[:0])
    model = _stiefel_model()
    riemannian = HessianOperator(model, nn.MSELoss(), shard, riemannian=True)
    dense["riemannian hessian", "zero samples"] = riemannian.to_dense()
    # an in-place update (to the same values) makes rank 1 recompute the gradient; rank 0's
    # graph holds its own, but both must join the gradient's all-reduce again
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    dense["riemannian hessian", "after an in-place update"] = riemannian.to_dense()
    return dense


def _monitor_on_rank_0_only(rank: int) -> list | None:
    """Rank 0 monitors the full data alone; rank 1 makes no call at all."""
    if rank != 0:
        return None
    monitor = SharpnessMonitor(_model(), nn.MSELoss(), _data(), tol=1e-10, distributed=False)
    return monitor().eigenvalues


DIFFERING_RANKS = {
    "selection": _selection_in_each_ranks_order,
    "empty shard": _empty_shard_on_rank_1,
    "monitor": _monitor_on_rank_0_only,
}


def _differing_ranks(rank: int, world_size: int) -> dict:
    results = {}
    for name, part in DIFFERING_RANKS.items():
        try:
            results[name] = part(rank)
        except Exception:
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def differing_ranks() -> list[dict]:
    return run_on_ranks(_differing_ranks, timeout=120)


def _part(results: list[dict], name: str) -> list:
    for rank, result in enumerate(results):
        if isinstance(result[name], str):
            pytest.fail(f"rank {rank} raised in part {name!r}:\n{result[name]}")
    return [result[name] for result in results]


def test_a_selection_in_each_ranks_order_gives_the_full_data_operator(differing_ranks):
    expected = HessianOperator(_model(), nn.MSELoss(), _data()).to_dense()
    names = [n for n, _ in _model().named_parameters()]
    for rank, result in enumerate(_part(differing_ranks, "selection")):
        assert result["names"] == names, rank
        torch.testing.assert_close(result["dense"], expected, rtol=1e-10, atol=1e-12)


def test_an_empty_shard_adds_nothing_and_joins_every_collective(differing_ranks):
    results = _part(differing_ranks, "empty shard")
    full = {name: build(_model(), nn.MSELoss(), _data()) for name, build in OPERATORS.items()}
    full["hessian, graph reuse"] = full["hessian"]
    x, y = _data()
    x = torch.cat([x, x[:, :1]], dim=1)
    full["riemannian hessian"] = HessianOperator(
        _stiefel_model(), nn.MSELoss(), (x, y), riemannian=True
    )
    expected = {name: op.to_dense() for name, op in full.items()}
    for rank, result in enumerate(results):
        assert len(result) == len(EMPTY_SHARD_OPERATORS) * len(EMPTY_SHARDS) + 2
        for (name, form), dense in result.items():
            torch.testing.assert_close(
                dense, expected[name], rtol=1e-10, atol=1e-12, msg=f"{name}, {form}, r{rank}"
            )


def test_a_monitor_on_one_rank_stays_local(differing_ranks):
    top = _part(differing_ranks, "monitor")[0]
    dense = HessianOperator(_model(), nn.MSELoss(), _data()).to_dense()
    torch.testing.assert_close(top, torch.linalg.eigvalsh(dense)[-1:], rtol=1e-8, atol=0)


# ------------------------------------------------------------------ errors on every rank


def _layouts_that_differ(rank: int) -> dict:
    """Each case: rank 0's and rank 1's model, data and selection disagree."""
    x, y = _data()
    wider = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return {
        "different sizes": (_model(), (x, y), None if rank == 0 else ["2.weight", "2.bias"]),
        # 0.weight has 12 entries, as 0.bias and 2.weight together: the sizes agree
        "same size": (_model(), (x, y), ["0.weight"] if rank == 0 else ["0.bias", "2.weight"]),
        "shapes": (_model() if rank == 0 else wider, (x, y), None),
        "dtype": (
            _model() if rank == 0 else _model().float(),
            (x, y) if rank == 0 else (x.float(), y.float()),
            None,
        ),
        "no sample on any rank": (_model(), [], None),
    }


def _errors_on_rank(rank: int, world_size: int) -> dict:
    errors = {}
    for case, (model, data, params) in _layouts_that_differ(rank).items():
        try:
            HessianOperator(model, nn.MSELoss(), data, params)
            errors[case] = None
        except ValueError as error:
            errors[case] = str(error)
    return errors


def test_ranks_that_disagree_raise_the_same_error_on_every_rank():
    # a short timeout: a rank left waiting in a collective fails the test, not the run
    results = run_on_ranks(_errors_on_rank, timeout=60)
    named = {
        "different sizes": ["'0.weight'", "'0.bias'", "not selected"],
        "same size": ["'0.weight'", "'0.bias'", "'2.weight'"],
        "shapes": ["'0.weight'", "shape (4, 3)", "shape (5, 3)"],
        "dtype": ["torch.float64", "torch.float32"],
        "no sample on any rank": ["empty on every rank"],
    }
    for case, fragments in named.items():
        assert results[0][case] is not None, f"{case}: no error"
        assert results[0][case] == results[1][case], case
        for fragment in fragments:
            assert fragment in results[0][case], (case, results[0][case])
