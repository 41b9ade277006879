"""The ManifoldSuite itself: each of its checks fails a manifold broken in the way it is
meant to catch, one that every other check of the suite passes."""

from __future__ import annotations

import pytest
import torch

from torsion.manifolds import SPDAffineInvariant, Stiefel
from torsion.testing import ManifoldSuite

F64 = torch.float64


class _SPDSumRetraction(SPDAffineInvariant):
    """``x + u``: a first-order retraction (the second-order one adds ``u x^-1 u / 2``)."""

    def retr(self, x, u):
        return x + u


class _StiefelSumRetraction(Stiefel):
    """``x + u``, never brought back to the manifold."""

    def retr(self, x, u):
        return x + u


class _SPDCholeskyTransport(SPDAffineInvariant):
    """Congruence by ``L_y L_x^-1`` (Cholesky factors): tangent, isometric, the identity at
    ``x = y`` and inverted by the transport back, but not parallel transport, which is the
    congruence by ``(y x^-1)^(1/2)``."""

    def transp(self, x, y, v):
        lx, ly = torch.linalg.cholesky(x), torch.linalg.cholesky(y)
        whitened = torch.linalg.solve_triangular(lx, v, upper=False)
        whitened = torch.linalg.solve_triangular(lx, whitened.mT, upper=False)
        return ly @ whitened @ ly.mT


def _bound(manifold, shape) -> ManifoldSuite:
    class Bound(ManifoldSuite):
        pass

    Bound.manifold, Bound.point_shape = manifold, shape
    return Bound()


@pytest.mark.parametrize("batch", [(), (3,)])
def test_a_first_order_retraction_fails_the_order_check(batch):
    generator = torch.Generator().manual_seed(0)
    broken = _bound(_SPDSumRetraction(), (4, 4))
    broken.test_retraction_at_zero_is_identity_with_unit_velocity(batch, F64, generator)
    with pytest.raises(AssertionError):
        broken.test_retraction_is_second_order(batch, generator)
    _bound(SPDAffineInvariant(), (4, 4)).test_retraction_is_second_order(batch, generator)
    # a binding that declares its retraction first order is not held to it
    first_order = _bound(Stiefel(retraction="qr"), (6, 3))
    first_order.second_order_retraction = False
    with pytest.raises(pytest.skip.Exception):
        first_order.test_retraction_is_second_order(batch, generator)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_a_retraction_off_the_manifold_fails(batch):
    generator = torch.Generator().manual_seed(0)
    broken = _bound(_StiefelSumRetraction(), (6, 3))
    broken.test_retraction_at_zero_is_identity_with_unit_velocity(batch, F64, generator)
    with pytest.raises(AssertionError, match="orthonormal columns"):
        broken.test_retraction_lands_on_the_manifold(batch, F64, generator)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_an_isometric_invertible_transport_that_is_not_parallel_fails(batch):
    generator = torch.Generator().manual_seed(0)
    broken = _bound(_SPDCholeskyTransport(), (4, 4))
    broken.test_transport_keeps_tangency(batch, F64, generator)
    broken.test_transport_to_the_same_point_is_the_identity(batch, F64, generator)
    with pytest.raises(AssertionError):
        broken.test_transport_is_parallel_transport_along_the_geodesic(batch, generator)
    good = _bound(SPDAffineInvariant(), (4, 4))
    good.test_transport_is_parallel_transport_along_the_geodesic(batch, generator)
