"""Stiefel manifold: the property suite for every metric x retraction, plus oracles.

Oracles: dense ``n x n`` formulations (Cayley transform, matrix exponential of the
canonical metric), geoopt's Stiefel classes where the mathematics coincide, the geodesic
equation, and finite differences.
"""

from __future__ import annotations

import math
import warnings

import geoopt
import pytest
import torch

from torsion.manifolds import Grassmann, trusted_inputs
from torsion.manifolds._stiefel import Stiefel
from torsion.testing import ManifoldSuite

_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-3}  # as the suite's


def _points_and_tangent(manifold, shape, norm, *, batch=(4,), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = manifold.random(*batch, *shape, dtype=torch.float64, generator=generator)
    u = manifold.random_tangent(x, generator=generator)
    return x, u * (norm / manifold.norm(x, u, keepdim=True))


# ---------------------------------------------------------------------------------------
# The property suite, every metric x retraction (shapes vary: n > 2p, n = 2p, n < 2p)
# ---------------------------------------------------------------------------------------


# The Euclidean logarithm is a local Newton shooting method (no closed form or global
# algorithm is known); independent Haar points on St(6, 3) lie 2.5-4 apart, beyond the
# injectivity radius, so suite tests that need several points draw them within this
# distance of a common centre. The canonical metric passes with independent points.
EUCLIDEAN_LOG_SPREAD = 0.6


class TestStiefelEuclideanQR(ManifoldSuite):
    point_spread = EUCLIDEAN_LOG_SPREAD
    manifold = Stiefel(metric="euclidean", retraction="qr")
    point_shape = (6, 3)
    parallel_transport = False
    second_order_retraction = False  # documented first order for this metric


class TestStiefelEuclideanPolar(ManifoldSuite):
    point_spread = EUCLIDEAN_LOG_SPREAD
    manifold = Stiefel(metric="euclidean", retraction="polar")
    point_shape = (5, 3)
    parallel_transport = False


class TestStiefelEuclideanCayley(ManifoldSuite):
    point_spread = EUCLIDEAN_LOG_SPREAD
    manifold = Stiefel(metric="euclidean", retraction="cayley")
    point_shape = (7, 2)
    parallel_transport = False
    second_order_retraction = False  # documented first order for this metric


class TestStiefelEuclideanExp(ManifoldSuite):
    point_spread = EUCLIDEAN_LOG_SPREAD
    manifold = Stiefel(metric="euclidean", retraction="exp")
    point_shape = (4, 3)
    parallel_transport = False


class TestStiefelCanonicalQR(ManifoldSuite):
    manifold = Stiefel(metric="canonical", retraction="qr")
    point_shape = (6, 3)
    parallel_transport = False
    second_order_retraction = False  # documented first order for this metric


class TestStiefelCanonicalPolar(ManifoldSuite):
    manifold = Stiefel(metric="canonical", retraction="polar")
    point_shape = (5, 3)
    parallel_transport = False
    second_order_retraction = False  # documented first order for this metric


class TestStiefelCanonicalCayley(ManifoldSuite):
    manifold = Stiefel(metric="canonical", retraction="cayley")
    point_shape = (7, 2)
    parallel_transport = False


class TestStiefelCanonicalExp(ManifoldSuite):
    manifold = Stiefel(metric="canonical", retraction="exp")
    point_shape = (4, 3)
    parallel_transport = False


# ---------------------------------------------------------------------------------------
# Dense and geoopt oracles
# ---------------------------------------------------------------------------------------


def _dense_generator(x, u):
    """The skew ``n x n`` matrix ``W = (P u) x^T - x (P u)^T``, ``P = I - x x^T / 2``."""
    pu = u - 0.5 * x @ (x.mT @ u)
    return pu @ x.mT - x @ pu.mT


@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_cayley_retraction_matches_the_dense_cayley_transform(metric):
    manifold = Stiefel(metric=metric, retraction="cayley")
    x, u = _points_and_tangent(manifold, (7, 3), 1.3)
    w = _dense_generator(x, u)
    eye = torch.eye(7, dtype=torch.float64)
    dense = torch.linalg.solve(eye - w / 2, (eye + w / 2) @ x)
    torch.testing.assert_close(manifold.retr(x, u), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3), (5, 3), (6, 3), (4, 1)])
def test_canonical_expmap_matches_the_dense_matrix_exponential(shape):
    # The canonical geodesic is expm(t W) x (Edelman, Arias & Smith 1998).
    manifold = Stiefel(metric="canonical")
    x, u = _points_and_tangent(manifold, shape, 2.0)
    dense = torch.linalg.matrix_exp(_dense_generator(x, u)) @ x
    torch.testing.assert_close(manifold.expmap(x, u), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3), (5, 3)])
def test_euclidean_expmap_solves_the_geodesic_equation(shape):
    # Embedded-metric geodesics satisfy Y'' + Y (Y'^T Y') = 0 (Edelman et al. 1998).
    manifold = Stiefel(metric="euclidean")
    x, u = _points_and_tangent(manifold, shape, 1.5)
    h = 1e-3
    ys = [manifold.expmap(x, t * u) for t in (0.5 - h, 0.5, 0.5 + h)]
    velocity = (ys[2] - ys[0]) / (2 * h)
    acceleration = (ys[2] - 2 * ys[1] + ys[0]) / h**2
    residual = acceleration + ys[1] @ (velocity.mT @ velocity)
    assert residual.abs().max() < 1e-5


def test_geoopt_retractions_and_exponential_agree_where_the_same():
    x, u = _points_and_tangent(Stiefel(), (6, 3), 0.8)
    canonical, euclidean = geoopt.CanonicalStiefel(), geoopt.EuclideanStiefel()
    # geoopt's canonical "retr" (and "expmap") is Wen & Yin's Cayley transform, solved n x n,
    # of W = v x^T - x v^T built from its argument v as from a Euclidean gradient; it is
    # ours at v = (I - x x^T / 2) u, which gives the same W (and velocity u).
    for metric in ("canonical", "euclidean"):
        ours = Stiefel(metric=metric, retraction="cayley")
        v = u - 0.5 * x @ (x.mT @ u)
        torch.testing.assert_close(ours.retr(x, u), canonical.retr(x, v), rtol=1e-12, atol=1e-12)
    ours = Stiefel(metric="euclidean", retraction="qr")
    torch.testing.assert_close(ours.retr(x, u), euclidean.retr(x, u), rtol=1e-12, atol=1e-12)
    # geoopt's EuclideanStiefel.expmap is Edelman et al.'s [X, U] form of the same geodesic.
    torch.testing.assert_close(ours.expmap(x, u), euclidean.expmap(x, u), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours.inner(x, u, 2 * u), euclidean.inner(x, u, 2 * u))
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.egrad2rgrad(x, g), euclidean.egrad2rgrad(x, g))
    ours = Stiefel(metric="canonical")
    torch.testing.assert_close(ours.inner(x, u, 2 * u), canonical.inner(x, u, 2 * u))
    torch.testing.assert_close(ours.egrad2rgrad(x, g), canonical.egrad2rgrad(x, g))


@pytest.mark.parametrize(
    ("metric", "second_order", "first_order"),
    [("euclidean", "polar", ["qr", "cayley"]), ("canonical", "cayley", ["qr", "polar"])],
)
def test_retraction_orders(metric, second_order, first_order):
    # ||R_x(tu) - Exp_x(tu)|| = O(t^3) for a second-order retraction, O(t^2) otherwise:
    # halving t divides the gap by about 8, respectively 4.
    x, u = _points_and_tangent(Stiefel(metric=metric), (6, 2), 1.0, batch=())

    def ratio(retraction):
        manifold = Stiefel(metric=metric, retraction=retraction)
        gaps = [(manifold.retr(x, t * u) - manifold.expmap(x, t * u)).norm() for t in (0.02, 0.01)]
        return float(gaps[0] / gaps[1])

    assert ratio(second_order) > 7
    for retraction in first_order:
        assert ratio(retraction) < 5


# ---------------------------------------------------------------------------------------
# The logarithm
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "norm", "rtol"),
    [
        ("canonical", 2.5, 1e-9),
        ("euclidean", 2.0, 1e-9),
        ("canonical", 1e-7, 1e-6),
        ("euclidean", 1e-7, 1e-6),
    ],
)
@pytest.mark.parametrize("shape", [(7, 3), (6, 3), (5, 3), (6, 1)])
def test_logmap_inverts_expmap_near_and_far(metric, norm, rtol, shape):
    manifold = Stiefel(metric=metric)
    x, u = _points_and_tangent(manifold, shape, norm, batch=(8,), seed=1)
    y = manifold.expmap(x, u)
    torch.testing.assert_close(manifold.logmap(x, y), u, rtol=rtol, atol=rtol * norm)
    torch.testing.assert_close(manifold.dist(x, y), torch.full((8,), norm, dtype=torch.float64))


def test_euclidean_logmap_uses_matrix_free_newton_for_larger_p():
    # p = 16 has 376 unknowns, beyond the dense-Jacobian limit: conjugate gradients instead.
    manifold = Stiefel(metric="euclidean")
    x, u = _points_and_tangent(manifold, (40, 16), 1.5, batch=(2,))
    torch.testing.assert_close(manifold.logmap(x, manifold.expmap(x, u)), u, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_logmap_in_float32_is_computed_in_float64(metric):
    manifold = Stiefel(metric=metric)
    x, u = _points_and_tangent(manifold, (6, 3), 1.5)
    y = manifold.expmap(x, u)
    delta = manifold.logmap(x.float(), y.float())
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_orthogonal_group_has_two_components(metric):
    # St(p, p) = O(p): the logarithm is the matrix logarithm within a component ...
    manifold = Stiefel(metric=metric)
    x, u = _points_and_tangent(manifold, (3, 3), 1.0)
    torch.testing.assert_close(manifold.logmap(x, manifold.expmap(x, u)), u)
    # ... and there is no geodesic between the components.
    flip = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="two connected components"):
        manifold.logmap(x, x @ flip)


def test_logmap_warns_when_it_does_not_converge():
    manifold = Stiefel(metric="canonical", max_iter=1)
    x, u = _points_and_tangent(manifold, (6, 3), 2.5)
    with pytest.warns(RuntimeWarning, match="did not converge in 1 iterations"):
        manifold.logmap(x, manifold.expmap(x, u))


@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
@pytest.mark.parametrize("shape", [(6, 2), (5, 3)])
def test_logmap_and_dist_gradients_match_finite_differences(metric, shape):
    # logmap: implicit differentiation of Exp_x(Log_x(y)) = y; dist: -Log_x(y) / d.
    manifold = Stiefel(metric=metric)
    x, u = _points_and_tangent(manifold, shape, 1.2, batch=(), seed=2)
    y = manifold.expmap(x, u)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(shape, dtype=torch.float64, generator=generator)
    dx = manifold.random_tangent(x, generator=generator)
    dy = manifold.random_tangent(y, generator=generator)

    def objectives(a, b):
        return (manifold.logmap(a, b) * weight).sum(), manifold.dist(a, b)

    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    for index, value in enumerate(objectives(xg, yg)):
        gx, gy = torch.autograd.grad(value, (xg, yg))
        h = 1e-6
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


def test_dist_gradient_is_zero_not_nan_at_coincident_points():
    manifold = Stiefel(metric="canonical")
    x = manifold.random(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(manifold.dist(xg, x), xg)
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------
# Sampling, dimension, options and bad input
# ---------------------------------------------------------------------------------------


def test_random_is_haar_distributed():
    # For Haar X on St(n, p): E[X X^T] = (p / n) I, E[X] = 0.
    manifold = Stiefel()
    x = manifold.random(4000, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        (x @ x.mT).mean(0), 0.4 * torch.eye(5, dtype=torch.float64), atol=0.02, rtol=0
    )
    assert x.mean(0).abs().max() < 0.03
    again = manifold.random(
        (4000, 5, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(x, again)
    assert x.is_contiguous() and Grassmann().random(7, 3).is_contiguous()  # row-major
    assert Stiefel().random(2, 1).stride() == (1, 1)  # DDP buckets compare raw strides


def test_dim_and_repr():
    assert Stiefel().dim((6, 3)) == 12
    assert Stiefel().dim((4, 4)) == 6
    assert Stiefel().dim((5, 1)) == 4
    assert "Stiefel(metric='canonical', retraction='cayley')" in repr(
        Stiefel("canonical", "cayley")
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "riemannian"}, "metric must be one of"),
        ({"retraction": "svd"}, "retraction must be one of"),
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Stiefel(**kwargs)


def test_bad_input_raises_clear_errors():
    manifold = Stiefel()
    x = manifold.random(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= p"):
        manifold.random(2, 3)
    with pytest.raises(ValueError, match="n >= p"):
        manifold.dim((2, 3))
    with pytest.raises(ValueError, match="n >= p"):
        manifold.expmap(x.mT, x.mT)
    with pytest.raises(ValueError, match=r"`u` has matrix shape \(5, 2\)"):
        manifold.retr(x, x[..., :2])
    with pytest.raises(TypeError, match="float32 or float64"):
        manifold.proju(x, torch.ones(5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        manifold.inner(x, [[0.0]])


def test_checking_reports_readable_reasons():
    manifold = Stiefel(check=True)
    x = manifold.random(5, 3, dtype=torch.float64)
    bad = x.clone()
    bad[..., 0] *= 1.3
    with pytest.raises(ValueError, match=r"x\^T x deviates from the identity by 0\.69"):
        manifold.logmap(bad, x)
    with pytest.raises(ValueError, match="not tangent"):
        manifold.expmap(x, x)
    ok, reason = Stiefel().check_point_on_manifold(bad, explain=True)
    assert not ok and "deviates from the identity by 0.69" in reason
    ok, reason = Stiefel().check_vector_on_tangent(x, x, explain=True)
    assert not ok and "x^T u + u^T x should vanish" in reason
    # Checking is off by default: no host synchronisation, no value errors.
    assert torch.isfinite(Stiefel().expmap(x, x)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_cuda_matches_cpu(metric):
    manifold = Stiefel(metric=metric, retraction="cayley")
    x, u = _points_and_tangent(manifold, (7, 3), 1.0)
    y = manifold.expmap(x, u)
    cuda = torch.device("cuda")
    for method, args in [
        ("expmap", (x, u)),
        ("retr", (x, u)),
        ("logmap", (x, y)),
        ("dist", (x, y)),
    ]:
        expected = getattr(manifold, method)(*args)
        actual = getattr(manifold, method)(*(a.to(cuda) for a in args))
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-9, atol=1e-9)
    point = manifold.random(2, 7, 3, dtype=torch.float32, device=cuda)
    assert point.device.type == "cuda" and point.dtype == torch.float32
    assert math.isfinite(float(manifold.dist(point[0], point[1])))


def test_check_weight_manifold_is_the_one_layer_option_validator():
    from torsion.manifolds import WEIGHT_MANIFOLDS, check_weight_manifold

    assert WEIGHT_MANIFOLDS == ("stiefel",)
    assert check_weight_manifold(None, "Layer") is None
    assert check_weight_manifold("stiefel", "Layer") == "stiefel"
    for bad in ("Stiefel", "grassmann", "", 1, Stiefel()):
        with pytest.raises(ValueError, match=r"^Layer: weight_manifold must be None or 'stiefel'"):
            check_weight_manifold(bad, "Layer")


@pytest.mark.parametrize("cls", [Stiefel, Grassmann])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_projx_of_a_rank_deficient_matrix_is_a_point(cls, dtype):
    """A zero or rank-deficient matrix has no unique closest point; ``projx`` still returns
    an orthonormal frame (the polar factor alone maps the null directions to zero), and on
    a full-rank matrix it is the polar factor ``U V^T`` of the SVD."""
    column = torch.tensor([[1.0], [2.0], [0.0], [-1.0], [3.0]], dtype=torch.float64)
    cases = [
        torch.zeros(5, 2, dtype=torch.float64),
        column.expand(5, 3),  # three equal columns
        torch.cat([column, torch.zeros(5, 1, dtype=torch.float64)], dim=1),
    ]
    manifold = cls()
    for x in cases:
        y = manifold.projx(x.to(dtype))
        assert manifold.check_point_on_manifold(y), x
    # a point geoopt's ProductManifold can view (QR's factor is column-major)
    product = geoopt.ProductManifold((manifold, (5, 2)), (geoopt.Euclidean(), (3,)))
    packed = product.projx(torch.randn(2, 13, dtype=torch.float64))
    assert manifold.check_point_on_manifold(product.take_submanifold_value(packed, 0))
    full = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(full, full_matrices=False)
    torch.testing.assert_close(manifold.projx(full), u @ vh, rtol=0, atol=1e-12)


def test_trusted_inputs_skips_type_and_shape_checks_but_not_value_checks():
    stiefel = Stiefel()
    wide = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= p"):
        stiefel.proju(wide, wide)
    with trusted_inputs():
        stiefel.proju(wide, wide)  # not checked: computed as given
        off = 2.0 * torch.eye(5, 2, dtype=torch.float64)
        with pytest.raises(ValueError, match="expects a point"):
            Stiefel(check=True).proju(off, off)
    with pytest.raises(ValueError, match="n >= p"):  # the checks are back after the block
        stiefel.proju(wide, wide)


@pytest.mark.parametrize("manifold", [Stiefel(), Grassmann()], ids=["stiefel", "grassmann"])
@pytest.mark.parametrize(
    ("option", "value"), [("max_iter", -1), ("step", math.nan), ("step", 0.0), ("tol", math.nan)]
)
def test_karcher_flow_options_are_checked_up_front(manifold, option, value):
    """The base Karcher flow ran with ``step=nan`` (a NaN mean, 'not converged') or
    ``max_iter=-1`` (no iteration at all) without a word."""
    points = manifold.random(4, 6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"frechet_mean: {option} must be"):
        manifold.frechet_mean(points, **{option: value})


def test_euclidean_logmap_warns_when_it_lands_on_a_longer_geodesic():
    """Far apart, the Euclidean shooting converged to a geodesic 37 times longer than the
    canonical geodesic joining the same points (whose Euclidean length bounds the
    distance), without a word. The result is still a logarithm; now it says so."""
    generator = torch.Generator().manual_seed(7)
    euclidean = Stiefel(metric="euclidean")
    x = euclidean.random(30, 5, 2, dtype=torch.float64, generator=generator)
    y = euclidean.random(30, 5, 2, dtype=torch.float64, generator=generator)
    bound = torch.linalg.matrix_norm(Stiefel(metric="canonical").logmap(x, y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        distance = euclidean.dist(x, y)
    longer = distance > bound * (1 + 1e-6)
    messages = [str(w.message) for w in caught if "longer than the canonical" in str(w.message)]
    assert bool(longer.any()) == bool(messages)
    assert not messages or f"for {int(longer.sum())} of 30" in messages[0]


_HALF_TURNS = {
    "St(3, 3), a rotation by pi": (
        torch.eye(3, dtype=torch.float64),
        torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)),
    ),
    "St(4, 1), antipodes": (
        torch.eye(4, 1, dtype=torch.float64),
        -torch.eye(4, 1, dtype=torch.float64),
    ),
    "St(5, 2), y = -x": (
        torch.eye(5, 2, dtype=torch.float64),
        -torch.eye(5, 2, dtype=torch.float64),
    ),
}


@pytest.mark.parametrize("metric", ["canonical", "euclidean"])
@pytest.mark.parametrize("case", list(_HALF_TURNS))
def test_logmap_reports_a_half_turn_instead_of_failing_the_batch(metric, case):
    """A half-turn (``x^T y`` with the eigenvalue -1, on the cut locus: the Cayley
    transform's ``V + I`` is singular) raised a LinAlgError for the whole batch; now that
    pair is reported as not converged and the other pair is computed."""
    x, y = _HALF_TURNS[case]
    manifold = Stiefel(metric=metric)
    with pytest.warns(RuntimeWarning, match="did not converge .* for 1 of 2"):
        distance = manifold.dist(torch.stack([x, x]), torch.stack([x, y]))
    assert float(distance[0]) == 0.0 and torch.isfinite(distance).all()


def test_check_names_the_argument_that_is_not_tangent():
    stiefel = Stiefel(check=True)
    x = stiefel.random(5, 2, dtype=torch.float64)
    v = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"`v` is not tangent: x\^T v \+ v\^T x"):
        stiefel.transp(x, x, v)
