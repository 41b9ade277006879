import pytest
import torch

from tests.nn._spd import F64, eigvals, random_spd
from torsion.linalg import sym_expm, sym_logm
from torsion.manifolds import SPDAffineInvariant, SPDLogEuclidean
from torsion.nn import SPDConv


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _graph(generator):
    x = random_spd(6, n=5, generator=generator)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0, 2, 2], [1, 2, 3, 4, 0, 3, 1, 1]])  # 5 is isolated
    weight = torch.rand(8, dtype=F64, generator=generator) + 0.1
    return x, edge_index, weight


@pytest.mark.parametrize("aggregation", ["log_euclidean", "affine_invariant"])
def test_outputs_are_spd_and_permutation_equivariant(aggregation, generator):
    conv = SPDConv(5, 3, aggregation, dtype=F64)
    x, edge_index, weight = _graph(generator)
    y = conv(x, edge_index, weight)
    assert y.shape == (6, 3, 3) and (eigvals(y) > 0).all()
    perm = torch.randperm(6, generator=generator)
    inverse = torch.argsort(perm)
    y_perm = conv(x[perm], inverse[edge_index], weight)
    torch.testing.assert_close(y_perm, y[perm])


def _set_step(conv, t):
    with torch.no_grad():
        conv.step.fill_(t)


def test_log_euclidean_aggregation_is_the_closed_form_mean(generator):
    conv = SPDConv(5, 3, dtype=F64)
    _set_step(conv, 1.0)  # the output is then the aggregated mean itself
    x, edge_index, weight = _graph(generator)
    y = conv(x, edge_index, weight)
    messages = conv.message_map(x)
    for node in range(5):
        into = edge_index[1] == node
        logs = sym_logm(messages[edge_index[0, into]])
        w = weight[into]
        expected = sym_expm((w[:, None, None] * logs).sum(0) / w.sum())
        torch.testing.assert_close(y[node], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(y[5], conv.root_map(x[5]))  # isolated: the root term


def test_affine_invariant_aggregation_is_the_weighted_karcher_mean(generator):
    conv = SPDConv(5, 3, "affine_invariant", karcher_steps=30, dtype=F64)
    _set_step(conv, 1.0)
    x, edge_index, weight = _graph(generator)
    y = conv(x, edge_index, weight)
    messages = conv.message_map(x)
    into = edge_index[1] == 1  # three incoming edges, one duplicated
    mean = (
        SPDAffineInvariant()
        .frechet_mean(messages[edge_index[0, into]], weight[into], tol=1e-12, max_iter=200)
        .mean
    )
    torch.testing.assert_close(y[1], mean, atol=1e-9, rtol=0)


def test_step_zero_keeps_the_root_and_gradients_reach_every_parameter(generator):
    conv = SPDConv(5, 3, dtype=F64)
    x, edge_index, weight = _graph(generator)
    _set_step(conv, 0.0)
    torch.testing.assert_close(conv(x, edge_index), conv.root_map(x))
    _set_step(conv, 0.4)
    conv(x, edge_index, weight).square().sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_float32_edge_weights_with_float64_features(generator):
    """PyG's edge attributes are float32 by default: a float64 layer computes in float64
    (the unreached node's clamp to float64's tiny became 0 in float32, then 0 / 0)."""
    conv = SPDConv(5, 3, dtype=F64)
    x, edge_index, weight = _graph(generator)
    out = conv(x, edge_index, weight.float())
    assert out.dtype == F64
    torch.testing.assert_close(out, conv(x, edge_index, weight.float().double()))


def test_empty_graph_and_bad_input(generator):
    conv = SPDConv(5, 3, dtype=F64)
    empty = conv(torch.empty(0, 5, 5, dtype=F64), torch.empty(2, 0, dtype=torch.long))
    assert empty.shape == (0, 3, 3)
    x, edge_index, _ = _graph(generator)
    with pytest.raises(ValueError, match="edge_weight"):
        conv(x, edge_index, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        conv(x, edge_index[0])
    with pytest.raises(ValueError, match="aggregation"):
        SPDConv(5, 3, "mean")


def test_step_is_clamped_to_the_unit_interval(generator):
    conv = SPDConv(5, 3, "affine_invariant", dtype=F64)
    x, edge_index, weight = _graph(generator)
    _set_step(conv, 1.0)
    full = conv(x, edge_index, weight)
    _set_step(conv, 1.7)
    torch.testing.assert_close(conv(x, edge_index, weight), full)
    _set_step(conv, -0.3)
    torch.testing.assert_close(conv(x, edge_index, weight), conv.root_map(x))


@pytest.mark.parametrize(
    ("aggregation", "manifold"),
    [("log_euclidean", SPDLogEuclidean()), ("affine_invariant", SPDAffineInvariant())],
)
def test_combine_is_the_geodesic_step_in_the_aggregations_metric(aggregation, manifold, generator):
    """At ``0 < t < 1`` the output is ``gamma(R_i, A_i; t)`` on the aggregation's own
    geodesic (the endpoints ``t = 0, 1`` cannot tell the two metrics' geodesics apart)."""
    conv = SPDConv(5, 3, aggregation, karcher_steps=40, dtype=F64)
    _set_step(conv, 0.35)
    x, edge_index, weight = _graph(generator)
    y = conv(x, edge_index, weight)
    messages, roots = conv.message_map(x), conv.root_map(x)
    for node in range(5):
        into = edge_index[1] == node
        mean = manifold.frechet_mean(
            messages[edge_index[0, into]], weight[into], tol=1e-13, max_iter=200
        ).mean
        expected = manifold.geodesic(roots[node], mean, 0.35)
        torch.testing.assert_close(y[node], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_affine_invariant_aggregation_takes_exactly_karcher_steps(steps, generator):
    """``karcher_steps`` unit fixed-point steps from the weighted log-Euclidean mean, as
    the manifold's Karcher flow takes them with ``max_iter=karcher_steps``."""
    conv = SPDConv(5, 3, "affine_invariant", karcher_steps=steps, dtype=F64)
    _set_step(conv, 1.0)
    x, edge_index, weight = _graph(generator)
    y = conv(x, edge_index, weight)
    messages = conv.message_map(x)
    into = edge_index[1] == 1
    flow = SPDAffineInvariant().frechet_mean(
        messages[edge_index[0, into]], weight[into], tol=0.0, max_iter=steps
    )
    torch.testing.assert_close(y[1], flow.mean, atol=1e-12, rtol=0)
    further = SPDAffineInvariant().frechet_mean(
        messages[edge_index[0, into]], weight[into], tol=0.0, max_iter=steps + 1
    )
    assert (y[1] - further.mean).abs().max() > 1e-8
