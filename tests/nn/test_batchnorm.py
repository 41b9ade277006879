import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from tests.nn._spd import F64, random_spd
from torsion.linalg import sym_expm, sym_logm, sym_sqrtm
from torsion.manifolds import SPDAffineInvariant, SPDLogCholesky, SPDLogEuclidean
from torsion.nn import SPDBatchNorm

MANIFOLDS = {"airm": SPDAffineInvariant(), "lem": SPDLogEuclidean(), "lcm": SPDLogCholesky()}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _frechet_mean(metric, points):
    return MANIFOLDS[metric].frechet_mean(points, tol=1e-12, max_iter=200).mean


def _dispersion(metric, points, mean):
    return MANIFOLDS[metric].dist(mean.expand_as(points), points).square().mean()


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_training_output_has_the_bias_as_mean_and_scale_as_spread(metric, generator):
    layer = SPDBatchNorm(4, metric, karcher_steps=30, eps=0.0, dtype=F64)
    bias = random_spd(n=4, generator=generator)
    with torch.no_grad():
        layer.bias.copy_(bias)
        layer.scale.fill_(0.7)
    x = random_spd(16, n=4, generator=generator, spread=1.5)
    y = layer(x)
    torch.testing.assert_close(_frechet_mean(metric, y), bias, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(
        _dispersion(metric, y, bias), torch.tensor(0.49, dtype=F64), atol=1e-8, rtol=1e-8
    )


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_running_mean_converges_to_the_distribution_mean(metric, generator):
    """Batches ``X = M * exp(S)`` with ``S`` symmetric about zero: the Fréchet mean is ``M``."""
    mean = random_spd(n=3, generator=generator)
    layer = SPDBatchNorm(3, metric, momentum=0.1, dtype=F64)

    def sample(count):
        s = torch.randn(count, 3, 3, dtype=F64, generator=generator) * 0.3
        s = (s + s.mT) / 2
        if metric == "airm":
            root = sym_sqrtm(mean)
            return root @ sym_expm(s) @ root
        if metric == "lem":
            return sym_expm(sym_logm(mean) + s)
        factor = torch.linalg.cholesky(mean)
        lower = factor.tril(-1) + s.tril(-1)
        diag = factor.diagonal().log() + s.diagonal(dim1=-2, dim2=-1)
        chol = lower + torch.diag_embed(diag.exp())
        return chol @ chol.mT

    for _ in range(150):
        layer(sample(64))
    distance = MANIFOLDS[metric].dist(layer.running_mean, mean)
    assert distance < 0.03, distance
    assert 0.1 < layer.running_var < 1.0


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_eval_mode_uses_the_running_statistics(metric, generator):
    layer = SPDBatchNorm(3, metric, dtype=F64)
    for _ in range(3):
        layer(random_spd(8, n=3, generator=generator))
    layer.eval()
    x = random_spd(5, n=3, generator=generator)
    running = (layer.running_mean.clone(), layer.running_var.clone())
    y = layer(x)
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(
        layer.running_var, running[1]
    )
    # a batch of one is normalised by the running statistics, not its own
    torch.testing.assert_close(layer(x[:1]), y[:1])
    factor = 1 / torch.sqrt(running[1] + layer.eps)
    if metric == "lem":
        torch.testing.assert_close(y, sym_expm(factor * (sym_logm(x) - sym_logm(running[0]))))


def test_gradients_flow_and_are_finite_at_identity_inputs():
    for metric in MANIFOLDS:
        layer = SPDBatchNorm(3, metric, dtype=F64)
        x = torch.eye(3, dtype=F64).repeat(4, 1, 1).requires_grad_()
        layer(x).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(layer.bias.grad).all() and torch.isfinite(layer.scale.grad)


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_gradcheck(metric, generator):
    layer = SPDBatchNorm(3, metric, dtype=F64)
    x = random_spd(4, n=3, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: layer(a), (x,))


def test_state_dict_round_trip_keeps_running_statistics(generator):
    layer = SPDBatchNorm(3, "airm", dtype=F64)
    for _ in range(3):
        layer(random_spd(8, n=3, generator=generator))
    fresh = SPDBatchNorm(3, "airm", dtype=F64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.running_mean, layer.running_mean)
    layer.eval(), fresh.eval()
    x = random_spd(2, n=3, generator=generator)
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_compiled_training_updates_the_running_statistics_in_float64(metric, generator):
    """torch.compile drops in-place updates of a 0-dim float64 buffer (torch 2.13): the
    compiled layer kept ``running_var = 1`` and evaluated with it."""
    eager = SPDBatchNorm(3, metric, momentum=0.3, dtype=F64)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = random_spd(8, n=3, generator=generator)
        torch.testing.assert_close(compiled(x), eager(x))
    assert eager.running_var != 1.0 and eager.running_var.shape == ()
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var, rtol=1e-12, atol=0)
    torch.testing.assert_close(compiled_layer.running_mean, eager.running_mean)
    eager.eval(), compiled_layer.eval()
    x = random_spd(4, n=3, generator=generator)
    torch.testing.assert_close(compiled(x), eager(x))


def test_bad_input():
    with pytest.raises(ValueError, match="metric"):
        SPDBatchNorm(3, "euclidean")
    for eps in [-1e-5, float("nan"), float("inf")]:  # an eigh failure or NaN output later
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            SPDBatchNorm(3, "lcm", eps=eps)
    SPDBatchNorm(3, eps=0)  # eps = 0 (no regularisation) stays allowed
    layer = SPDBatchNorm(3, "lem")  # float32 statistics; a float64 batch changes nothing
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(TypeError, match=r"float32 statistics but got torch\.float64 input"):
        layer(random_spd(4, n=3, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        SPDBatchNorm(3)(torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_running_statistics_follow_the_momentum_update(metric, generator):
    """``running <- geodesic(running, batch mean, momentum)`` (linear in the chart for
    ``"lem"``/``"lcm"``) and ``running_var <- lerp(running_var, dispersion, momentum)``,
    against the manifold's own Fréchet mean, geodesic and distance (a swapped momentum or
    geodesic argument order converged to the same limit in the test above)."""
    manifold = MANIFOLDS[metric]
    layer = SPDBatchNorm(3, metric, momentum=0.25, karcher_steps=40, dtype=F64)
    mean, var = torch.eye(3, dtype=F64), torch.tensor(1.0, dtype=F64)
    for _ in range(2):
        x = random_spd(6, n=3, generator=generator, spread=0.8)
        layer(x)
        batch_mean = _frechet_mean(metric, x)
        mean = manifold.geodesic(mean, batch_mean, 0.25)
        var = 0.75 * var + 0.25 * _dispersion(metric, x, batch_mean)
    torch.testing.assert_close(layer.running_mean, mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(layer.running_var, var, atol=1e-9, rtol=1e-9)


def _log_cholesky_chart(x):
    factor = np.linalg.cholesky(x)
    return np.tril(factor, -1) + np.diag(np.log(np.diag(factor)))


def _from_log_cholesky_chart(phi):
    factor = np.tril(phi, -1) + np.diag(np.exp(np.diag(phi)))
    return factor @ factor.T


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_eval_output_is_the_documented_normalisation(metric, generator):
    """Eval mode: centre at the running mean, scale the log by ``scale / sqrt(var + eps)``,
    bias to ``B``; checked with SciPy's matrix functions and a large ``eps`` (an ``eps``
    added outside the square root differs by far more than rounding)."""
    layer = SPDBatchNorm(3, metric, eps=0.3, dtype=F64)
    running, bias = random_spd(2, n=3, generator=generator)
    with torch.no_grad():
        layer.running_mean.copy_(running)
        layer.running_var.fill_(0.6)
        layer.bias.copy_(bias)
        layer.scale.fill_(0.8)
    layer.eval()
    x = random_spd(4, n=3, generator=generator)
    factor = 0.8 / math.sqrt(0.6 + 0.3)
    r, b = running.numpy(), bias.numpy()
    expected = []
    for a in x.numpy():
        if metric == "airm":
            inv_root = scipy.linalg.fractional_matrix_power(r, -0.5)
            root_b = scipy.linalg.sqrtm(b)
            inner = scipy.linalg.expm(factor * scipy.linalg.logm(inv_root @ a @ inv_root))
            expected.append(root_b @ inner @ root_b)
        elif metric == "lem":
            logs = factor * (scipy.linalg.logm(a) - scipy.linalg.logm(r)) + scipy.linalg.logm(b)
            expected.append(scipy.linalg.expm(logs))
        else:
            phi = factor * (_log_cholesky_chart(a) - _log_cholesky_chart(r))
            expected.append(_from_log_cholesky_chart(phi + _log_cholesky_chart(b)))
    expected = torch.from_numpy(np.real(np.stack(expected)))
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("metric", MANIFOLDS)
def test_input_is_read_through_its_symmetric_part(metric, generator):
    """Like torsion.linalg, every chart reads ``(X + X^T) / 2``: a skew perturbation
    changes neither the output nor the running statistics, and the gradient is symmetric
    (the log-Cholesky chart read one triangle of ``X`` without it)."""
    x = random_spd(5, n=3, generator=generator)
    skew = torch.randn(5, 3, 3, dtype=F64, generator=generator)
    skew = (skew - skew.mT) / 4
    layer = SPDBatchNorm(3, metric, dtype=F64)
    other = copy.deepcopy(layer)
    torch.testing.assert_close(other(x + skew), layer(x))
    torch.testing.assert_close(other.running_mean, layer.running_mean)
    leaf = x.clone().requires_grad_()
    target = torch.randn(5, 3, 3, dtype=F64, generator=generator)
    (grad,) = torch.autograd.grad((layer(leaf) * target).sum(), leaf)
    torch.testing.assert_close(grad, grad.mT)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_airm_batch_mean_is_exactly_karcher_steps_from_the_log_euclidean_mean(steps, generator):
    """With ``momentum=1`` the running mean is the batch mean: ``karcher_steps`` unit
    fixed-point steps from the log-Euclidean mean, as the manifold's Karcher flow takes
    them with ``max_iter=karcher_steps`` (an off-by-one in the step count went unseen with
    30 steps, converged either way)."""
    x = random_spd(8, n=3, generator=generator, spread=0.7)
    layer = SPDBatchNorm(3, "airm", momentum=1.0, karcher_steps=steps, dtype=F64)
    layer(x)
    expected = SPDAffineInvariant().frechet_mean(x, tol=0.0, max_iter=steps).mean
    torch.testing.assert_close(layer.running_mean, expected, atol=1e-12, rtol=1e-12)
    # the steps matter: one step more lands elsewhere
    further = SPDAffineInvariant().frechet_mean(x, tol=0.0, max_iter=steps + 1).mean
    assert (layer.running_mean - further).abs().max() > 1e-6
