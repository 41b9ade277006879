"""Orthonormalization helpers against independent oracles (Gram-Schmidt, SVD, dense Cayley)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from tests.linalg._matrices import random_orthogonal
from torsion.linalg import cayley_retraction, polar, qr_unique


def _tangent(x, generator):
    """A random tangent vector at ``x`` on Stiefel (``x^T u`` skew-symmetric)."""
    z = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    xtz = x.mT @ z
    return z - x @ (xtz + xtz.mT) / 2


def _stiefel_point(n, p, batch=(), *, dtype=torch.float64, generator):
    return random_orthogonal(n, batch, dtype=dtype, generator=generator)[..., :p]


def _gram_schmidt(a):
    """Classical Gram-Schmidt in float64: the unique Q with a positive diagonal R."""
    columns = []
    for j in range(a.shape[-1]):
        v = a[..., j]
        for q in columns:
            v = v - (q * v).sum(-1, keepdim=True) * q
        columns.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 5), (7, 3), (2, 6, 2), (0, 4, 2)])
def test_qr_unique(shape, dtype, generator):
    a = torch.randn(shape, dtype=torch.float64, generator=generator)
    q, r = qr_unique(a.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close((q @ r).double(), a, **tol)
    assert (r.diagonal(dim1=-2, dim2=-1) >= 0).all()
    torch.testing.assert_close(q.double(), _gram_schmidt(a), **tol)


def test_qr_unique_is_differentiable(generator):
    a = torch.randn(6, 3, dtype=torch.float64, generator=generator).requires_grad_()
    assert gradcheck(lambda m: qr_unique(m)[0], (a,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_matches_svd(dtype, generator):
    a = torch.randn(3, 8, 4, dtype=torch.float64, generator=generator)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(polar(a.to(dtype)).double(), u @ vh, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_does_not_depend_on_the_scale(dtype):
    """``a^T a`` under- or overflowed at extreme scales (a diagonal of 9e-12, or NaN)."""
    scales = {torch.float32: (1e-30, 1e25), torch.float64: (1e-200, 1e200)}[dtype]
    eye = torch.eye(3, 2, dtype=dtype)
    for scale in scales:
        torch.testing.assert_close(polar(scale * eye), eye)


def test_polar_and_the_stiefel_step_run_under_vmap(generator):
    """Both read a value on the CPU to choose a path (``reads_freely``), which ``vmap``
    refuses; under ``torch.func`` transforms they take the path that reads nothing."""
    from torsion.manifolds import Stiefel

    a = torch.randn(4, 7, 3, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(torch.func.vmap(polar)(a), polar(a))
    stiefel = Stiefel()
    x = _stiefel_point(7, 3, (4,), generator=generator)
    u = 0.1 * _tangent(x, generator)
    step = torch.func.vmap(lambda p, v: stiefel.retr_transp(p, v, v))
    for mapped, direct in zip(step(x, u), stiefel.retr_transp(x, u, u), strict=True):
        torch.testing.assert_close(mapped, direct)


def test_polar_gradient_is_finite_at_orthonormal_input(generator):
    # Every singular value is 1 here: autograd through an SVD divides by zero.
    x = _stiefel_point(6, 3, generator=generator).requires_grad_()
    assert torch.isfinite(torch.autograd.grad(polar(x).sum(), x)[0]).all()
    torch.testing.assert_close(polar(x), x)
    assert gradcheck(polar, (x,)) and gradgradcheck(polar, (x,))


@pytest.mark.parametrize("n, p", [(5, 2), (6, 6), (30, 4)])
def test_cayley_retraction_matches_dense_formula(n, p, generator):
    x = _stiefel_point(n, p, (2,), generator=generator)
    u = _tangent(x, generator)
    y = cayley_retraction(x, u)
    pu = u - 0.5 * x @ (x.mT @ u)
    w = pu @ x.mT - x @ pu.mT
    eye = torch.eye(n, dtype=x.dtype)
    dense = torch.linalg.solve(eye - w / 2, (eye + w / 2) @ x)
    torch.testing.assert_close(y, dense)
    torch.testing.assert_close(y.mT @ y, torch.eye(p, dtype=x.dtype).expand(2, p, p))


def test_cayley_retraction_is_a_retraction(generator):
    x = _stiefel_point(7, 3, generator=generator)
    u = _tangent(x, generator)
    torch.testing.assert_close(cayley_retraction(x, torch.zeros_like(u)), x)
    t = 1e-6
    velocity = (cayley_retraction(x, t * u) - cayley_retraction(x, -t * u)) / (2 * t)
    torch.testing.assert_close(velocity, u, rtol=1e-6, atol=1e-8)


def test_cayley_retraction_broadcasts_and_rejects_bad_shapes(generator):
    x = _stiefel_point(5, 2, generator=generator)
    u = torch.stack([_tangent(x, generator) for _ in range(3)])
    assert cayley_retraction(x, u).shape == (3, 5, 2)
    with pytest.raises(ValueError, match="matrix shape of x"):
        cayley_retraction(x, u[..., :1])
    with pytest.raises(ValueError, match="tall matrices"):
        cayley_retraction(x.mT, u[0].mT)
