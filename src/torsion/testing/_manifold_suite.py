"""A property suite every manifold binds to.

Subclass it in a ``Test*`` class and set the class attributes::

    class TestGrassmann(ManifoldSuite):
        manifold = Grassmann()
        point_shape = (6, 2)

Every test runs on float64 and float32, unbatched and batched, on fresh random draws
from several seeds. Oracles are finite differences of the cost along ``expmap`` (a
second-order retraction), the order of contact of ``retr`` with ``expmap``, a pole ladder
of ``expmap`` and ``logmap`` for parallel transport, and the definitions themselves, never
the implementation.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import geoopt
import pytest
import torch
from torch import Tensor

__all__ = ["ManifoldSuite"]

_TOLERANCE = {torch.float64: 1e-7, torch.float32: 2e-3}


def _cost(x: Tensor) -> Tensor:
    """A smooth cost with non-trivial gradient and Hessian, summed over the batch."""
    c = torch.linspace(0.3, 1.7, x.shape[-2] * x.shape[-1], dtype=x.dtype, device=x.device)
    c = c.reshape(x.shape[-2:])
    quadratic = (c * x * x).sum(dim=(-2, -1))
    return torch.sin(c * x).sum() + 0.25 * (quadratic**2).sum()


class ManifoldSuite:
    """Properties every :class:`torsion.manifolds.Manifold` must have.

    Attributes:
        manifold: the instance under test.
        point_shape: trailing shape of one point, e.g. ``(5, 5)`` or ``(6, 3)``.
        batch_shapes: leading shapes to try.
        tangent_scale: norm of the tangent vectors used where ``expmap`` must stay within
            the injectivity radius.
        parallel_transport: whether ``transp`` is parallel transport along the geodesic
            (hence isometric); checked against a pole ladder of ``expmap`` and ``logmap``.
        ladder_rungs: rungs of that pole ladder. One is exact on symmetric spaces (SPD
            affine-invariant, Grassmann, spheres) and flat metrics; elsewhere its error
            falls like ``ladder_rungs^-2``.
        second_order_retraction: whether ``retr`` agrees with ``expmap`` to second order
            (checked: ``dist(R_x(t u), Exp_x(t u)) = O(t^3)``); set it to ``False`` for a
            retraction documented as first order.
        closed_form_mean: the mean must be exact after zero Karcher iterations.
        point_spread: if set, tests that need several unrelated points draw them within
            this distance of a common random centre, for manifolds whose logarithm is
            only local (an iterative shooting method beyond the injectivity radius).
    """

    manifold: ClassVar[geoopt.Manifold]
    point_shape: ClassVar[tuple[int, ...]]
    batch_shapes: ClassVar[list[tuple[int, ...]]] = [(), (3,)]
    tangent_scale: ClassVar[float] = 0.5
    parallel_transport: ClassVar[bool] = True
    ladder_rungs: ClassVar[int] = 4
    second_order_retraction: ClassVar[bool] = True
    closed_form_mean: ClassVar[bool] = False
    point_spread: ClassVar[float | None] = None

    # -- fixtures ---------------------------------------------------------------------------

    @pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
    def dtype(self, request) -> torch.dtype:
        return request.param

    @pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
    def generator(self, request) -> torch.Generator:
        return torch.Generator().manual_seed(1000 + request.param)

    @pytest.fixture(params=["unbatched", "batched"])
    def batch(self, request) -> tuple[int, ...]:
        return self.batch_shapes[0] if request.param == "unbatched" else self.batch_shapes[-1]

    def point(self, batch, dtype, generator) -> Tensor:
        return self.manifold.random(*batch, *self.point_shape, dtype=dtype, generator=generator)

    def points(self, count: int, batch, dtype, generator) -> list[Tensor]:
        """``count`` unrelated points, or nearby ones if ``point_spread`` is set."""
        if self.point_spread is None:
            return [self.point(batch, dtype, generator) for _ in range(count)]
        centre = self.point(batch, dtype, generator)
        return [
            self.manifold.expmap(centre, self.tangent(centre, generator, self.point_spread))
            for _ in range(count)
        ]

    def tangent(self, x, generator, scale: float | None = None) -> Tensor:
        u = self.manifold.random_tangent(x, generator=generator)
        if scale is None:
            return u
        return u * (scale / self.manifold.norm(x, u, keepdim=True))

    def assert_close(self, actual, expected, dtype, scale: float = 1.0):
        tol = _TOLERANCE[dtype] * scale
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)

    def inner(self, x, u, v) -> Tensor:
        return self.manifold.inner(x, u, v)

    # -- points and tangent vectors ---------------------------------------------------------

    def test_random_points_lie_on_the_manifold(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        assert x.shape == (*batch, *self.point_shape) and x.dtype == dtype
        ok, reason = self.manifold.check_point_on_manifold(x, explain=True, atol=1e-4, rtol=1e-4)
        assert ok, reason

    def test_projx_lands_on_the_manifold_and_is_idempotent(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        noise = torch.randn(x.shape, dtype=dtype, generator=generator)
        y = self.manifold.projx(x + 1e-2 * noise)
        ok, reason = self.manifold.check_point_on_manifold(y, explain=True, atol=1e-4, rtol=1e-4)
        assert ok, reason
        self.assert_close(self.manifold.projx(y), y, dtype, scale=10)

    def test_proju_is_tangent_and_idempotent(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        z = torch.randn(x.shape, dtype=dtype, generator=generator)
        u = self.manifold.proju(x, z)
        ok, reason = self.manifold.check_vector_on_tangent(x, u, explain=True, atol=1e-4, rtol=1e-4)
        assert ok, reason
        self.assert_close(self.manifold.proju(x, u), u, dtype)

    def test_inner_is_symmetric_and_positive(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        u, v = self.tangent(x, generator), self.tangent(x, generator)
        self.assert_close(self.inner(x, u, v), self.inner(x, v, u), dtype)
        assert (self.inner(x, u, u) > 0).all()
        self.assert_close(self.manifold.norm(x, u) ** 2, self.inner(x, u, u), dtype)

    # -- retraction, exponential and logarithm -----------------------------------------------

    def test_retraction_at_zero_is_identity_with_unit_velocity(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        u = self.tangent(x, generator)
        self.assert_close(self.manifold.retr(x, torch.zeros_like(u)), x, dtype)
        if dtype == torch.float64:
            t = 1e-6
            velocity = (self.manifold.retr(x, t * u) - self.manifold.retr(x, -t * u)) / (2 * t)
            self.assert_close(velocity, u, dtype, scale=100)

    def test_retraction_lands_on_the_manifold(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        for u in (self.tangent(x, generator), self.tangent(x, generator, self.tangent_scale)):
            y = self.manifold.retr(x, u)
            assert y.shape == x.shape and y.dtype == dtype
            ok, reason = self.manifold.check_point_on_manifold(
                y, explain=True, atol=1e-4, rtol=1e-4
            )
            assert ok, reason

    def test_retraction_is_second_order(self, batch, generator):
        """A second-order retraction meets the geodesic to ``O(t^3)``: halving ``t`` divides
        ``dist(R_x(t u), Exp_x(t u))`` by about 8 (by 4 for a first-order one, whose
        velocity, checked above, is still right). The gaps are intrinsic distances, so a
        quotient manifold may return another representative."""
        if not self.second_order_retraction:
            pytest.skip("the retraction is documented as first order")
        x = self.point(batch, torch.float64, generator)
        u = self.tangent(x, generator, 1.0)
        gaps = [
            self.manifold.dist(self.manifold.retr(x, t * u), self.manifold.expmap(x, t * u))
            for t in (0.02, 0.01)
        ]
        # the floor: a retraction equal to expmap leaves rounding only
        assert (gaps[1] <= gaps[0] / 6 + 1e-11).all(), (gaps[0] / gaps[1]).tolist()

    def test_expmap_and_logmap_are_inverse(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        u = self.tangent(x, generator, self.tangent_scale)
        y = self.manifold.expmap(x, u)
        ok, reason = self.manifold.check_point_on_manifold(y, explain=True, atol=1e-4, rtol=1e-4)
        assert ok, reason
        self.assert_close(self.manifold.logmap(x, y), u, dtype, scale=10)
        self.assert_close(self.manifold.dist(x, y), self.manifold.norm(x, u), dtype, scale=10)

    def test_expmap_velocity_is_the_tangent(self, batch, generator):
        x = self.point(batch, torch.float64, generator)
        u = self.tangent(x, generator)
        t = 1e-6
        velocity = (self.manifold.expmap(x, t * u) - self.manifold.expmap(x, -t * u)) / (2 * t)
        self.assert_close(velocity, u, torch.float64, scale=100)

    def test_dist_is_symmetric_and_satisfies_the_triangle_inequality(self, batch, dtype, generator):
        x, y, z = self.points(3, batch, dtype, generator)
        dxy, dyz, dxz = self.manifold.dist(x, y), self.manifold.dist(y, z), self.manifold.dist(x, z)
        self.assert_close(dxy, self.manifold.dist(y, x), dtype, scale=10)
        assert (dxz <= dxy + dyz + 10 * _TOLERANCE[dtype]).all()
        self.assert_close(self.manifold.dist(x, x), torch.zeros_like(dxy), dtype, scale=100)

    def test_geodesic_endpoints_and_constant_speed(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        y = self.manifold.expmap(x, self.tangent(x, generator, self.tangent_scale))
        self.assert_close(self.manifold.geodesic(x, y, 0.0), x, dtype, scale=10)
        self.assert_close(self.manifold.geodesic(x, y, 1.0), y, dtype, scale=10)
        middle = self.manifold.geodesic(x, y, 0.3)
        self.assert_close(
            self.manifold.dist(x, middle), 0.3 * self.manifold.dist(x, y), dtype, scale=10
        )

    # -- transport -------------------------------------------------------------------------

    def test_transport_keeps_tangency(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        y = self.manifold.expmap(x, self.tangent(x, generator, self.tangent_scale))
        u, v = self.tangent(x, generator), self.tangent(x, generator)
        tu, tv = self.manifold.transp(x, y, u), self.manifold.transp(x, y, v)
        ok, reason = self.manifold.check_vector_on_tangent(
            y, tu, explain=True, atol=1e-4, rtol=1e-4
        )
        assert ok, reason
        if self.parallel_transport:
            self.assert_close(self.inner(y, tu, tv), self.inner(x, u, v), dtype, scale=10)

    def test_transport_to_the_same_point_is_the_identity(self, batch, dtype, generator):
        """Every vector transport leaves a tangent vector unchanged when it does not move;
        parallel transport back along the same geodesic undoes the transport. (Tangency
        and isometry alone pass a wrong transport such as ``-v``.)"""
        x = self.point(batch, dtype, generator)
        u = self.tangent(x, generator)
        self.assert_close(self.manifold.transp(x, x, u), u, dtype, scale=10)
        if self.parallel_transport:
            y = self.manifold.expmap(x, self.tangent(x, generator, self.tangent_scale))
            back = self.manifold.transp(y, x, self.manifold.transp(x, y, u))
            self.assert_close(back, u, dtype, scale=100)

    def _pole_ladder(self, x: Tensor, w: Tensor, v: Tensor) -> Tensor:
        """``v`` (at ``x``) carried along ``t -> Exp_x(t w)``, ``t`` in ``[0, 1]``, by a pole
        ladder (Lorenzi & Pennec 2014): per rung from ``a`` to ``b`` with midpoint ``m``,
        ``v <- -Log_b(Exp_m(-Log_m(Exp_a(v))))``, the geodesic symmetry at ``m``, which
        on a symmetric space maps ``a`` to ``b`` and its differential ``v`` to minus its
        parallel transport. The rungs' ends are ``expmap``s from ``x`` itself, so the last
        is the same representative as ``expmap(x, w)``."""
        n = self.ladder_rungs
        start = x
        for k in range(n):
            end = self.manifold.expmap(x, w if k + 1 == n else w * ((k + 1) / n))
            middle = self.manifold.expmap(x, w * ((k + 0.5) / n))
            far = self.manifold.expmap(start, v)
            mirrored = self.manifold.expmap(middle, -self.manifold.logmap(middle, far))
            v = -self.manifold.logmap(end, mirrored)
            start = end
        return v

    def test_transport_is_parallel_transport_along_the_geodesic(self, batch, generator):
        """Isometric, the identity at ``x = y`` and invertible does not make a transport
        parallel (congruence by Cholesky factors on SPD is all three): compare it with the
        pole ladder, an independent construction from ``expmap`` and ``logmap`` alone."""
        if not self.parallel_transport:
            pytest.skip("transp is documented as a vector transport, not parallel transport")
        x = self.point(batch, torch.float64, generator)
        w = self.tangent(x, generator, self.tangent_scale)
        v = self.tangent(x, generator, 0.5 * self.tangent_scale)
        y = self.manifold.expmap(x, w)
        expected = self._pole_ladder(x, w, v)
        self.assert_close(self.manifold.transp(x, y, v), expected, torch.float64, scale=10)
        # the geodesic's own velocity arrives as its velocity at y
        self.assert_close(
            self.manifold.transp(x, y, w), -self.manifold.logmap(y, x), torch.float64, scale=10
        )

    # -- gradients and Hessians --------------------------------------------------------------

    def _derivatives(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Euclidean gradient and Hessian-vector product of the test cost, by autograd."""
        x = x.detach().requires_grad_()
        (egrad,) = torch.autograd.grad(_cost(x), x, create_graph=True)
        (ehess,) = torch.autograd.grad(egrad, x, u)
        return egrad.detach(), ehess

    def test_riemannian_gradient_gives_the_directional_derivative(self, batch, generator):
        x = self.point(batch, torch.float64, generator)
        u = self.tangent(x, generator)
        egrad, _ = self._derivatives(x, u)
        rgrad = self.manifold.egrad2rgrad(x, egrad)
        t = 1e-6
        slope = (_cost(self.manifold.retr(x, t * u)) - _cost(self.manifold.retr(x, -t * u))) / (
            2 * t
        )
        self.assert_close(self.inner(x, rgrad, u).sum(), slope, torch.float64, scale=100)

    def _hessian(self, x: Tensor, u: Tensor) -> Tensor:
        egrad, ehess = self._derivatives(x, u)
        return self.manifold.ehess2rhess(x, egrad, ehess, u)

    def test_riemannian_hessian_is_symmetric_and_tangent(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        u, v = self.tangent(x, generator), self.tangent(x, generator)
        hu, hv = self._hessian(x, u), self._hessian(x, v)
        ok, reason = self.manifold.check_vector_on_tangent(
            x, hu, explain=True, atol=1e-3, rtol=1e-3
        )
        assert ok, reason
        self.assert_close(self.inner(x, hu, v), self.inner(x, u, hv), dtype, scale=100)

    def test_riemannian_hessian_matches_finite_differences(self, batch, generator):
        # For a second-order retraction R (expmap is one), Hess f(x) = Hess (f o R_x)(0)
        # (Absil, Mahony & Sepulchre 2008, Prop. 5.5.5), so a mixed central difference of
        # f(R_x(a u + b v)) is an independent oracle for <Hess f(x)[u], v>. One point at a
        # time, Richardson-extrapolated from steps h and 2h (error O(h^4)), against a
        # tolerance relative to |Hess u| |v|.
        x = self.point(batch, torch.float64, generator)
        u, v = self.tangent(x, generator), self.tangent(x, generator)
        hessian_u = self._hessian(x, u)
        expected = self.inner(x, hessian_u, v).reshape(-1)
        scale = (self.manifold.norm(x, hessian_u) * self.manifold.norm(x, v)).reshape(-1)
        x, u, v = (t.reshape(-1, *self.point_shape) for t in (x, u, v))
        for i in range(x.shape[0]):

            def mixed(h: float, i: int = i) -> Tensor:
                def f(a: float, b: float) -> Tensor:
                    return _cost(self.manifold.expmap(x[i], a * u[i] + b * v[i]))

                return (f(h, h) - f(h, -h) - f(-h, h) + f(-h, -h)) / (4 * h * h)

            h = 1e-3
            extrapolated = (4 * mixed(h) - mixed(2 * h)) / 3
            tolerance = 1e-6 * float(scale[i]) + 1e-9
            torch.testing.assert_close(expected[i], extrapolated, rtol=0.0, atol=tolerance)

    # -- Frechet mean -----------------------------------------------------------------------

    def test_frechet_mean_of_one_point_is_the_point(self, batch, dtype, generator):
        x = self.point(batch, dtype, generator)
        result = self.manifold.frechet_mean(x.unsqueeze(-len(self.point_shape) - 1))
        self.assert_close(result.mean, x, dtype, scale=10)
        assert result.converged.all()

    def test_frechet_mean_is_a_critical_point(self, batch, generator):
        x = self.point(batch, torch.float64, generator)
        ndim = len(self.point_shape)
        points = torch.stack(
            [self.manifold.expmap(x, self.tangent(x, generator, 0.3)) for _ in range(4)],
            dim=-ndim - 1,
        )
        weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
        result = self.manifold.frechet_mean(points, weights)
        assert result.converged.all()
        if self.closed_form_mean:
            assert result.iterations == 0
        # Independent check: autograd of half the weighted sum of squared distances.
        mean = result.mean.detach().requires_grad_()
        cost = 0.5 * (weights * self.manifold.dist(mean.unsqueeze(-ndim - 1), points) ** 2).sum()
        (egrad,) = torch.autograd.grad(cost, mean)
        rgrad = self.manifold.egrad2rgrad(mean.detach(), egrad)
        assert (self.manifold.norm(mean.detach(), rgrad) < 1e-6).all()

    # -- geoopt interop and module behaviour -------------------------------------------------

    def test_geoopt_optimizers_keep_parameters_on_the_manifold(self, generator):
        x, target = self.points(2, (2,), torch.float64, generator)
        param = geoopt.ManifoldParameter(x.clone(), manifold=self.manifold)
        for optimizer_class in (geoopt.optim.RiemannianSGD, geoopt.optim.RiemannianAdam):
            optimizer = optimizer_class([param], lr=1e-2)
            for _ in range(3):
                optimizer.zero_grad()
                self.manifold.dist(param, target).pow(2).sum().backward()
                optimizer.step()
            ok, reason = self.manifold.check_point_on_manifold(param.detach(), explain=True)
            assert ok, reason
        assert torch.isfinite(param).all() and not torch.equal(param.detach(), x)

    def test_deepcopy_state_dict_and_dtype_moves(self, generator):
        module = torch.nn.Module()
        module.weight = geoopt.ManifoldParameter(
            self.point((), torch.float64, generator), manifold=self.manifold
        )
        clone = copy.deepcopy(module)
        assert isinstance(clone.weight, geoopt.ManifoldParameter)
        assert type(clone.weight.manifold) is type(self.manifold)
        assert torch.equal(clone.weight.detach(), module.weight.detach())
        fresh = copy.deepcopy(module)
        with torch.no_grad():
            fresh.weight.zero_()
        fresh.load_state_dict(module.state_dict())
        assert torch.equal(fresh.weight.detach(), module.weight.detach())
        moved = module.to(torch.float32)
        assert moved.weight.dtype == torch.float32
        assert isinstance(moved.weight, geoopt.ManifoldParameter)

    def test_dim_is_positive(self):
        assert self.manifold.dim(self.point_shape) > 0
