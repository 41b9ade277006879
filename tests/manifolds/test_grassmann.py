"""Grassmann manifold: the property suite per retraction, plus invariance and oracles.

The suite compares representatives directly. That is sound here: every representative
the suite compares comes from ``expmap``/``retr``/``projx`` of the same base point, and
``logmap(x, y)`` does not depend on the representative of ``y``, so
``geodesic(x, expmap(x, u), 1) = expmap(x, u)`` exactly. (For an arbitrary ``y`` it is a
representative of ``span(y)`` only: see ``test_geodesic_reaches_the_subspace``.)
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch.autograd import gradgradcheck

from torsion.linalg import qr_unique
from torsion.manifolds._grassmann import Grassmann
from torsion.testing import ManifoldSuite


def _orthogonal(p, *, batch=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return qr_unique(torch.randn(*batch, p, p, dtype=torch.float64, generator=generator))[0]


def _projector(x):
    return x @ x.mT


def _pair(shape, norm, *, batch=(5,), seed=0):
    """A point and a horizontal vector of Frobenius norm ``norm``."""
    manifold = Grassmann()
    generator = torch.Generator().manual_seed(seed)
    x = manifold.random(*batch, *shape, dtype=torch.float64, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    return x, u * (norm / manifold.norm(x, u, keepdim=True))


class TestGrassmannQR(ManifoldSuite):
    manifold = Grassmann(retraction="qr")
    point_shape = (6, 3)


class TestGrassmannPolar(ManifoldSuite):
    manifold = Grassmann(retraction="polar")
    point_shape = (7, 2)


class TestGrassmannExp(ManifoldSuite):
    manifold = Grassmann(retraction="exp")
    point_shape = (5, 3)


# ---------------------------------------------------------------------------------------
# Invariance under a change of representative x -> x Q
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (5, 2), (4, 3)])
def test_everything_is_invariant_under_a_change_of_representative(shape):
    p = shape[-1]
    manifold = Grassmann()
    x, u = _pair(shape, 1.1)
    generator = torch.Generator().manual_seed(2)
    y = manifold.expmap(x, 0.7 * manifold.random_tangent(x, generator=generator))
    v = manifold.random_tangent(x, generator=generator)
    q1, q2 = _orthogonal(p, batch=(5,), seed=3), _orthogonal(p, batch=(5,), seed=4)
    xq, yq, uq, vq = x @ q1, y @ q2, u @ q1, v @ q1
    close = torch.testing.assert_close
    close(manifold.dist(xq, yq), manifold.dist(x, y))
    close(_projector(xq), _projector(x))
    close(manifold.inner(xq, uq, vq), manifold.inner(x, u, v))
    close(manifold.logmap(xq, yq), manifold.logmap(x, y) @ q1)
    close(manifold.expmap(xq, uq), manifold.expmap(x, u) @ q1)
    close(manifold.transp(xq, yq, vq), manifold.transp(x, y, v) @ q2)
    for retraction in ("qr", "polar", "exp"):
        retracted = Grassmann(retraction).retr
        close(_projector(retracted(xq, uq)), _projector(retracted(x, u)))
    z = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    close(manifold.proju(xq, z), manifold.proju(x, z))
    close(
        manifold.ehess2rhess(xq, z @ q1, 2 * z @ q1, uq), manifold.ehess2rhess(x, z, 2 * z, u) @ q1
    )
    points = torch.stack([manifold.expmap(x, s * u) for s in (-0.4, 0.1, 0.5)], dim=-3)
    rotated = points @ _orthogonal(p, batch=(5, 3), seed=6)
    close(
        _projector(manifold.frechet_mean(rotated).mean),
        _projector(manifold.frechet_mean(points).mean),
    )


# ---------------------------------------------------------------------------------------
# Distance: an independent oracle and accuracy at the ends of [0, pi/2]
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (7, 2), (5, 3), (4, 1), (3, 3)])
def test_dist_is_the_norm_of_scipy_principal_angles(shape):
    manifold = Grassmann()
    generator = torch.Generator().manual_seed(0)
    x = manifold.random(20, *shape, dtype=torch.float64, generator=generator)
    y = manifold.random(20, *shape, dtype=torch.float64, generator=generator)
    expected = torch.tensor(
        [
            math.hypot(*scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
            for a, b in zip(x, y, strict=True)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(manifold.dist(x, y), expected, rtol=1e-12, atol=1e-12)


def test_dist_is_accurate_for_tiny_and_right_angles():
    manifold = Grassmann()
    x, u = _pair((6, 3), 1.0)
    # arccos of the cosines would return 0 (or ~1e-8 of noise) here.
    torch.testing.assert_close(
        manifold.dist(x, manifold.expmap(x, 1e-9 * u)), torch.full((5,), 1e-9, dtype=torch.float64)
    )
    theta = math.pi / 2 - 1e-10  # arcsin of the sines loses half the digits here
    x = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    y = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        manifold.dist(x, y), torch.tensor(theta, dtype=torch.float64), rtol=1e-15, atol=1e-15
    )
    assert (
        float(manifold.dist(x, torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)))
        == math.pi / 2
    )


@pytest.mark.parametrize("largest", [1e-3, 3e-3, 6e-3, 9e-3, 3e-2, 1e-1])
def test_dist_is_accurate_to_rounding_for_small_angles(largest):
    """Principal angles ``T`` of ``x = Q [I; 0; 0] R1``, ``y = Q [cos T; sin T; 0] R2``,
    against their norm and scipy's ``subspace_angles``, to ``1e-13`` relative: the series
    for ``arctan(sqrt(r)) / sqrt(r)`` may only replace it where its next term, ``r^2 / 5``
    (``r = tan^2``), is below rounding (it was ``1e-9`` relative at angles near ``1e-2``)."""
    n, p = 9, 3
    theta = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64) * largest
    x = torch.zeros(n, p, dtype=torch.float64)
    y = torch.zeros(n, p, dtype=torch.float64)
    x[:p] = torch.eye(p, dtype=torch.float64)
    y[:p], y[p : 2 * p] = torch.diag(theta.cos()), torch.diag(theta.sin())
    q = _orthogonal(n, batch=(), seed=3)
    x, y = q @ x @ _orthogonal(p, batch=(), seed=4), q @ y @ _orthogonal(p, batch=(), seed=5)
    scipy_angles = scipy.linalg.subspace_angles(x.numpy(), y.numpy())
    dist = Grassmann().dist(x, y)
    torch.testing.assert_close(dist, theta.norm(), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        dist, torch.tensor(math.hypot(*scipy_angles), dtype=torch.float64), rtol=1e-13, atol=0
    )


# ---------------------------------------------------------------------------------------
# Logarithm, geodesics and transport
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 3), (7, 2), (4, 3)])
def test_logmap_inverts_expmap_up_to_right_angles(shape):
    manifold = Grassmann()
    x, u = _pair(shape, 1.0, batch=(20,))
    largest = torch.linalg.matrix_norm(u, ord=2)
    u = u * (1.5 / largest)[..., None, None]  # largest principal angle 1.5 < pi/2
    y = manifold.expmap(x, u)
    torch.testing.assert_close(manifold.logmap(x, y), u, rtol=1e-10, atol=1e-10)
    q = _orthogonal(shape[-1], batch=(20,), seed=9)
    torch.testing.assert_close(manifold.logmap(x, y @ q), u, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gap", [1e-4, 1e-6, 1e-7])
def test_logmap_stays_accurate_near_the_cut_locus(gap):
    """Largest principal angle ``pi/2 - gap``, from the closed form: ``x = Q [I; 0; 0] R1``,
    ``y = Q [cos T; sin T; 0] R2`` have ``Log_x(y) = Q [0; T; 0] R1``. The polar factor of
    ``y^T x`` through its Gram matrix was off by ``eps / cos^2`` (9e-5 at ``gap = 1e-6``)."""
    n, p = 12, 3
    theta = torch.tensor([0.3, 1.0, math.pi / 2 - gap], dtype=torch.float64)
    x = torch.zeros(n, p, dtype=torch.float64)
    y = torch.zeros(n, p, dtype=torch.float64)
    log = torch.zeros(n, p, dtype=torch.float64)
    x[:p] = torch.eye(p, dtype=torch.float64)
    y[:p], y[p : 2 * p] = torch.diag(theta.cos()), torch.diag(theta.sin())
    log[p : 2 * p] = torch.diag(theta)
    q = _orthogonal(n, batch=(), seed=3)
    r1, r2 = _orthogonal(p, batch=(), seed=4), _orthogonal(p, batch=(), seed=5)
    result = Grassmann().logmap(q @ x @ r1, q @ y @ r2)
    torch.testing.assert_close(result, q @ log @ r1, rtol=0, atol=1e-9)


def test_logmap_runs_under_vmap_and_keeps_second_derivatives():
    manifold = Grassmann()
    x, u = _pair((6, 3), 1.0, batch=(4,))
    y = manifold.expmap(x, u)
    torch.testing.assert_close(torch.func.vmap(manifold.logmap)(x, y), manifold.logmap(x, y))
    y0 = y[0].clone().requires_grad_()
    assert gradgradcheck(lambda b: manifold.logmap(x[0], b), (y0,))


def test_logmap_derivatives_in_every_mode_are_finite_where_angles_repeat():
    """At ``y = x q`` every singular value of ``y^T x`` is 1, where the SVD's derivatives
    divide by zero: forward mode (a dual tensor, ``torch.func.jvp``) and reverse mode must
    all take the Gram form's, and agree."""
    manifold = Grassmann()
    x, _ = _pair((6, 3), 1.0, batch=())
    y = x @ _orthogonal(3, batch=(), seed=8)
    v = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jacobian = torch.autograd.functional.jacobian(lambda b: manifold.logmap(x, b), y)
    want = torch.einsum("ijkl,kl->ij", jacobian, v)
    _, functional = torch.func.jvp(lambda b: manifold.logmap(x, b), (y,), (v,))
    forward_ad = torch.autograd.forward_ad
    with forward_ad.dual_level():
        dual = forward_ad.unpack_dual(manifold.logmap(x, forward_ad.make_dual(y, v))).tangent
    assert torch.isfinite(want).all()
    torch.testing.assert_close(functional, want)
    torch.testing.assert_close(dual, want)


def test_qr_and_polar_retractions_are_the_same_second_order_retraction():
    # Both return a basis of span(x + u); its projector meets the geodesic's to O(t^3).
    x, u = _pair((6, 2), 1.0, batch=())
    exp = Grassmann().expmap

    def gap(retraction, t):
        return float(
            (_projector(Grassmann(retraction).retr(x, t * u)) - _projector(exp(x, t * u))).norm()
        )

    for retraction in ("qr", "polar"):
        assert gap(retraction, 0.02) / gap(retraction, 0.01) > 7
    torch.testing.assert_close(
        _projector(Grassmann("qr").retr(x, u)), _projector(Grassmann("polar").retr(x, u))
    )


def test_geodesic_reaches_the_subspace_not_the_representative():
    manifold = Grassmann()
    x, u = _pair((6, 3), 1.0)
    y = manifold.expmap(x, u) @ _orthogonal(3, batch=(5,), seed=2)
    end = manifold.geodesic(x, y, 1.0)
    torch.testing.assert_close(_projector(end), _projector(y))
    assert not torch.allclose(end, y)


def test_transport_is_the_parallel_transport_of_edelman_arias_smith():
    # Edelman, Arias & Smith (1998), with D = U S V^T:
    # (-x V sin(S) U^T + U cos(S) U^T + I - U U^T) v at the representative expmap(x, D),
    # rotated to the representative y.
    manifold = Grassmann()
    x, d = _pair((7, 3), 1.2)
    y = manifold.expmap(x, d) @ _orthogonal(3, batch=(5,), seed=4)
    v = manifold.random_tangent(x, generator=torch.Generator().manual_seed(1))
    delta = manifold.logmap(x, y)
    left, s, right_h = torch.linalg.svd(delta, full_matrices=False)
    eye = torch.eye(7, dtype=torch.float64)
    operator = (
        -x @ right_h.mT @ torch.diag_embed(s.sin()) @ left.mT
        + left @ torch.diag_embed(s.cos()) @ left.mT
        + eye
        - left @ left.mT
    )
    endpoint = manifold.expmap(x, delta)
    expected = operator @ v @ (endpoint.mT @ y)
    torch.testing.assert_close(manifold.transp(x, y, v), expected, rtol=1e-10, atol=1e-10)
    # The geodesic's own velocity is transported to its velocity at y, -Log_y(x) ...
    torch.testing.assert_close(manifold.transp(x, y, delta), -manifold.logmap(y, x))
    # ... and transporting back along the same geodesic is the identity.
    torch.testing.assert_close(manifold.transp(y, x, manifold.transp(x, y, v)), v)


# ---------------------------------------------------------------------------------------
# Gradients: finite at repeated principal angles, exact against finite differences
# ---------------------------------------------------------------------------------------


def test_gradients_are_finite_at_repeated_angles():
    manifold = Grassmann()
    x, u = _pair((6, 3), 1.0, batch=())
    u = u.clone()
    u[:, 1:] = 0.0  # two zero principal angles, one non-zero
    cases = [(x, x.clone()), (x, manifold.expmap(x, u))]
    for a, b in cases:
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        for value in (manifold.dist(a, b), manifold.logmap(a, b).sum(), manifold.dist2(a, b)):
            grads = torch.autograd.grad(value, (a, b))
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("repeated", [False, True])
def test_dist_and_logmap_gradients_match_finite_differences(repeated):
    manifold = Grassmann()
    x, u = _pair((6, 3), 0.9, batch=(), seed=3)
    if repeated:
        u = u @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    y = manifold.expmap(x, u)
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    dx = manifold.random_tangent(x, generator=generator)
    dy = manifold.random_tangent(y, generator=generator)

    def objectives(a, b):
        return manifold.dist(a, b), (manifold.logmap(a, b) * weight).sum()

    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    h = 1e-6
    for index, value in enumerate(objectives(xg, yg)):
        gx, gy = torch.autograd.grad(value, (xg, yg))
        along_x = (
            objectives(manifold.expmap(x, h * dx), y)[index]
            - objectives(manifold.expmap(x, -h * dx), y)[index]
        ) / (2 * h)
        along_y = (
            objectives(x, manifold.expmap(y, h * dy))[index]
            - objectives(x, manifold.expmap(y, -h * dy))[index]
        ) / (2 * h)
        torch.testing.assert_close((gx * dx).sum(), along_x, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close((gy * dy).sum(), along_y, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Sampling, dimension, options and bad input
# ---------------------------------------------------------------------------------------


def test_random_subspaces_are_uniform():
    # For a uniform subspace the projector has mean (p / n) I.
    x = Grassmann().random(
        4000, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        _projector(x).mean(0), 0.4 * torch.eye(5, dtype=torch.float64), atol=0.02, rtol=0
    )


def test_dim_and_repr():
    assert Grassmann().dim((6, 3)) == 9
    assert Grassmann().dim((4, 4)) == 0
    assert "Grassmann(retraction='polar')" in repr(Grassmann("polar"))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="retraction must be one of"):
        Grassmann("cayley")
    manifold = Grassmann()
    x = manifold.random(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= p"):
        manifold.random(2, 5)
    with pytest.raises(ValueError, match="n >= p"):
        manifold.dist(x.mT, x.mT)
    with pytest.raises(ValueError, match=r"`y` has matrix shape \(5, 1\)"):
        manifold.logmap(x, x[..., :1])
    with pytest.raises(TypeError, match="float32 or float64"):
        manifold.expmap(x, x.to(torch.float16))
    checked = Grassmann(check=True)
    with pytest.raises(ValueError, match="not horizontal: x\\^T u should vanish"):
        checked.expmap(x, x)
    with pytest.raises(ValueError, match="deviates from the identity by 3"):
        checked.dist(2 * x, x)
    ok, reason = manifold.check_vector_on_tangent(x, x, explain=True)
    assert not ok and "not horizontal" in reason


@pytest.mark.gpu
def test_cuda_matches_cpu():
    manifold = Grassmann()
    x, u = _pair((7, 3), 1.0)
    y = manifold.expmap(x, u)
    cuda = torch.device("cuda")
    for method, args in [
        ("expmap", (x, u)),
        ("logmap", (x, y)),
        ("dist", (x, y)),
        ("transp", (x, y, u)),
    ]:
        expected = getattr(manifold, method)(*args)
        actual = getattr(manifold, method)(*(a.to(cuda) for a in args))
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-9, atol=1e-9)
