"""torsion manifolds inside geoopt's containers: products, scaling, tensors, optimizers."""

import geoopt
import pytest
import torch

from torsion.manifolds import (
    Grassmann,
    ProductManifold,
    Scaled,
    SPDAffineInvariant,
    SPDLogCholesky,
    Stiefel,
)


@pytest.fixture
def product():
    return ProductManifold(
        (SPDAffineInvariant(), (3, 3)), (Stiefel(), (5, 2)), (Grassmann(), (4, 2))
    )


def _point(product, generator):
    parts = [
        SPDAffineInvariant().random(3, 3, dtype=torch.float64, generator=generator),
        Stiefel().random(5, 2, dtype=torch.float64, generator=generator),
        Grassmann().random(4, 2, dtype=torch.float64, generator=generator),
    ]
    return product.pack_point(*parts), parts


def test_product_of_torsion_manifolds_acts_componentwise(product, generator):
    x, parts = _point(product, generator)
    y, others = _point(product, generator)
    managers = [SPDAffineInvariant(), Stiefel(), Grassmann()]
    expected = torch.stack([m.dist(a, b) for m, a, b in zip(managers, parts, others, strict=True)])
    torch.testing.assert_close(product.dist(x, y), expected.norm())
    u = product.proju(x, torch.randn(x.shape, dtype=x.dtype, generator=generator))
    for m, part, piece in zip(managers, parts, product.unpack_tensor(u), strict=True):
        torch.testing.assert_close(piece, m.proju(part, piece))
    assert product.check_point_on_manifold(product.retr(x, 0.1 * u))


def test_riemannian_adam_trains_a_product_parameter(product, generator):
    x, _ = _point(product, generator)
    target, _ = _point(product, generator)
    param = geoopt.ManifoldParameter(x.clone(), manifold=product)
    optimizer = geoopt.optim.RiemannianAdam([param], lr=0.05)
    start = float(product.dist(param.detach(), target))
    for _ in range(20):
        optimizer.zero_grad()
        product.dist(param, target).pow(2).backward()
        optimizer.step()
    assert product.check_point_on_manifold(param.detach(), atol=1e-6, rtol=1e-6)
    assert float(product.dist(param.detach(), target)) < start


def test_scaled_torsion_manifold_scales_the_distance(generator):
    base = SPDLogCholesky()
    scaled = Scaled(base, 2.0)
    x = base.random(3, 3, dtype=torch.float64, generator=generator)
    y = base.random(3, 3, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(scaled.dist(x, y), 2.0 * base.dist(x, y))


def test_manifold_tensor_methods_dispatch_to_torsion(generator):
    manifold = Stiefel(retraction="cayley")
    x = geoopt.ManifoldTensor(
        manifold.random(6, 3, dtype=torch.float64, generator=generator), manifold=manifold
    )
    u = x.proju(torch.randn(6, 3, dtype=torch.float64, generator=generator))
    torch.testing.assert_close(x.retr(u), manifold.retr(x, u))
    torch.testing.assert_close(
        x.dist(x.retr(1e-3 * u)), manifold.norm(x, 1e-3 * u), rtol=1e-4, atol=0
    )
