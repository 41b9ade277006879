"""Hypothesis strategies and checks shared by the fuzz tests.

Every matrix is drawn from a seed through an explicit ``torch.Generator``, so a failing
example shrinks to a few integers that reproduce it exactly. Spectra come in the kinds
that break numerical code: generic, repeated (the identity and clusters), ill-conditioned
(up to ``1e8``) and singular.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float64)
SPECTRA = ("generic", "repeated", "identity", "ill_conditioned", "tiny_scale", "huge_scale")


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible settings: derandomized, no deadline (first calls compile kernels)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(n: int, batch: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrices in float64."""
    q, r = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64, generator=gen))
    return q * torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0)[..., None, :]


def spectrum(kind: str, n: int, batch: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Positive eigenvalues of one of the ``SPECTRA`` kinds, float64, shape ``(*batch, n)``."""
    options = {"dtype": torch.float64, "generator": gen}
    if kind == "identity":
        return torch.ones(*batch, n, dtype=torch.float64)
    if kind == "repeated":
        # two clusters of exactly equal eigenvalues
        values = 0.5 + 2.0 * torch.rand(*batch, 2, **options)
        return values[..., torch.arange(n) % 2].sort(dim=-1).values
    if kind == "ill_conditioned":
        exponents = torch.rand(*batch, n, **options) * 8.0 - 4.0  # cond up to 1e8
        return (10.0**exponents).sort(dim=-1).values
    scale = {"tiny_scale": 1e-6, "huge_scale": 1e6}.get(kind, 1.0)
    return (scale * (0.2 + 3.0 * torch.rand(*batch, n, **options))).sort(dim=-1).values


def symmetric_with_spectrum(eigenvalues: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` in float64 with Haar ``Q``, exactly symmetric."""
    n = eigenvalues.shape[-1]
    q = orthogonal(n, tuple(eigenvalues.shape[:-1]), gen)
    x = (q * eigenvalues[..., None, :]) @ q.mT
    return (x + x.mT) / 2


@st.composite
def spd_cases(draw, *, max_n: int = 5, max_batch: int = 3, kinds=SPECTRA):
    """``(x, dtype, kind)``: a batch of SPD matrices in float64 and the dtype to test in."""
    n = draw(st.integers(1, max_n))
    batch = tuple(draw(st.lists(st.integers(0, max_batch), max_size=2)))
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(DTYPES))
    gen = generator(draw(st.integers(0, 2**31 - 1)))
    x = symmetric_with_spectrum(spectrum(kind, n, batch, gen), gen)
    return x, dtype, kind


def numpy_sym_function(x: torch.Tensor, f) -> np.ndarray:
    """The oracle: ``V f(w) V^T`` from numpy's float64 ``eigh`` of ``sym(x)``."""
    a = x.detach().to(torch.float64).numpy()
    a = (a + np.swapaxes(a, -1, -2)) / 2
    w, v = np.linalg.eigh(a)
    return (v * f(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Inputs are never modified: bitwise equal (NaN positions included) to their clones."""
    for name, value in before.items():
        current = after[name]
        same = torch.equal(value.isnan(), current.isnan()) and torch.equal(
            torch.nan_to_num(value), torch.nan_to_num(current)
        )
        assert same, f"input `{name}` was modified in place"


def clones(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in tensors.items()}


def assert_finite(t: torch.Tensor, what: str) -> None:
    assert bool(torch.isfinite(t).all()), f"{what} has NaN or infinite entries from finite input"


def poison(x: torch.Tensor, value: float, index: int) -> torch.Tensor:
    """A copy of ``x`` with one entry (flat ``index`` modulo ``numel``) set to ``value``."""
    y = x.detach().clone(memory_format=torch.contiguous_format)
    y.view(-1)[index % y.numel()] = value
    return y
