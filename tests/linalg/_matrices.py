"""Random test matrices with a prescribed spectrum, drawn from explicit generators."""

import torch


def random_orthogonal(n, batch=(), *, dtype, generator):
    a = torch.randn(*batch, n, n, dtype=dtype, generator=generator)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(r.diagonal(dim1=-2, dim2=-1))[..., None, :]


def with_spectrum(eigenvalues, batch=(), *, generator):
    """``Q diag(eigenvalues) Q^T`` with Haar-random ``Q``; eigenvalues broadcast over batch."""
    eigenvalues = torch.as_tensor(eigenvalues)
    q = random_orthogonal(
        eigenvalues.shape[-1], batch, dtype=eigenvalues.dtype, generator=generator
    )
    x = (q * eigenvalues[..., None, :]) @ q.mT
    return (x + x.mT) / 2


def random_spd(n, batch=(), *, condition=10.0, dtype=torch.float64, generator):
    """SPD matrices whose eigenvalues are log-spaced from 1 to ``condition``."""
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=dtype)
    return with_spectrum(eigenvalues, batch, generator=generator)
