"""Random SPD batches for the layer tests."""

import torch

F64 = torch.float64


def random_spd(*shape, n, generator, dtype=F64, spread=1.0):
    """SPD matrices ``Q diag(exp(spread * z)) Q^T`` with Haar ``Q`` and Gaussian ``z``."""
    q, _ = torch.linalg.qr(torch.randn(*shape, n, n, dtype=dtype, generator=generator))
    lam = torch.exp(spread * torch.randn(*shape, n, dtype=dtype, generator=generator))
    return (q * lam[..., None, :]) @ q.mT


def eigvals(x):
    return torch.linalg.eigvalsh(x)
