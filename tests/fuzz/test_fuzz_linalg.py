"""Fuzz the symmetric matrix functions and the orthonormalizations of ``torsion.linalg``.

Oracles: numpy's float64 ``eigh`` (the definition ``V f(w) V^T``), numpy's SVD for the
polar factor, the dense ``n x n`` Cayley formula, central differences of the oracle for
gradients. Every case also checks that the input is not modified.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz._strategies import (
    DTYPES,
    assert_finite,
    assert_unchanged,
    clones,
    fuzz_settings,
    generator,
    orthogonal,
    poison,
    spd_cases,
    spectrum,
    symmetric_with_spectrum,
)
from torsion.linalg import (
    cayley_retraction,
    matrix_exp,
    polar,
    qr_unique,
    sym_clampm,
    sym_expm,
    sym_funcm,
    sym_invsqrtm,
    sym_logm,
    sym_powm,
    sym_sqrtm,
)

# name -> (torsion function, numpy oracle, how the error grows with the condition number)
POSITIVE_FUNCTIONS = {
    "logm": (sym_logm, np.log, 1.0),
    "sqrtm": (sym_sqrtm, np.sqrt, 0.5),
    "invsqrtm": (sym_invsqrtm, lambda w: 1 / np.sqrt(w), 1.0),
    "powm(0.3)": (lambda x, **k: sym_powm(x, 0.3, **k), lambda w: w**0.3, 1.0),
    "powm(-1.5)": (lambda x, **k: sym_powm(x, -1.5, **k), lambda w: w**-1.5, 1.0),
}


def _condition(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return 1.0
    w = torch.linalg.eigvalsh(x)
    return float((w[..., -1] / w[..., 0]).max())


@pytest.mark.parametrize("name", list(POSITIVE_FUNCTIONS))
@fuzz_settings(60)
@given(case=spd_cases())
def test_positive_functions_match_eigh_oracle(name, case):
    x64, dtype, _ = case
    fn, oracle, _ = POSITIVE_FUNCTIONS[name]
    x = x64.to(dtype)
    before = clones(x=x)
    y = fn(x)
    assert_unchanged(before, {"x": x})
    assert y.shape == x.shape and y.dtype == dtype
    assert_finite(y, name)
    eps = torch.finfo(dtype).eps
    condition = _condition(x.to(torch.float64)) if x.numel() else 1.0
    if eps * condition > 1e-3:
        return  # eigenvalues below the dtype's resolution are floored: finite is the promise
    expected = oracle_of(x, oracle)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    tolerance = 200 * max(x.shape[-1], 1) * eps * condition * scale
    np.testing.assert_allclose(y.to(torch.float64).numpy(), expected, rtol=0, atol=tolerance)


def oracle_of(x: torch.Tensor, f) -> np.ndarray:
    a = x.detach().to(torch.float64).numpy()
    a = (a + np.swapaxes(a, -1, -2)) / 2
    w, v = np.linalg.eigh(a)
    return (v * f(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


@fuzz_settings(60)
@given(
    n=st.integers(1, 5),
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    spread=st.sampled_from([0.0, 1e-9, 1.0, 20.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_expm_and_clampm_of_indefinite_matrices(n, batch, spread, dtype, seed):
    gen = generator(seed)
    eigenvalues = spread * (2 * torch.rand(*batch, n, dtype=torch.float64, generator=gen) - 1)
    x = symmetric_with_spectrum(eigenvalues, gen).to(dtype)
    before = clones(x=x)
    y = sym_expm(x)
    floor = 0.25
    z = sym_clampm(x, floor)
    assert_unchanged(before, {"x": x})
    assert_finite(y, "sym_expm")
    assert_finite(z, "sym_clampm")
    eps = torch.finfo(dtype).eps
    expected = oracle_of(x, np.exp)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(
        y.double().numpy(), expected, rtol=0, atol=100 * (n + spread) * eps * scale
    )
    expected = oracle_of(x, lambda w: np.maximum(w, floor))
    np.testing.assert_allclose(z.double().numpy(), expected, rtol=0, atol=100 * n * eps * scale)


@fuzz_settings(40)
@given(
    case=spd_cases(max_batch=2, kinds=("generic", "repeated", "identity")),
    which=st.sampled_from(["logm", "sqrtm", "invsqrtm"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gradient_at_repeated_eigenvalues_matches_central_differences(case, which, seed):
    x64, _, _ = case
    fn, oracle, _ = POSITIVE_FUNCTIONS[which]
    g = torch.randn(x64.shape, dtype=torch.float64, generator=generator(seed))
    e = torch.randn(x64.shape, dtype=torch.float64, generator=generator(seed + 1))
    e = (e + e.mT) / 2
    x = x64.clone().requires_grad_()
    (grad,) = torch.autograd.grad((fn(x) * g).sum(), x)
    assert_finite(grad, f"the gradient of sym_{which}")
    h = 1e-5
    plus = oracle_of(x64 + h * e, oracle)
    minus = oracle_of(x64 - h * e, oracle)
    directional = float(((plus - minus) / (2 * h) * g.numpy()).sum())
    scale = max(1.0, abs(directional), float(np.abs(grad.numpy()).sum()))
    assert abs(float((grad * e).sum()) - directional) <= 1e-5 * scale * max(_condition(x64), 1)


@pytest.mark.parametrize(
    "fn", [sym_logm, sym_expm, sym_sqrtm, sym_invsqrtm, lambda x, **k: sym_clampm(x, 0.1, **k)]
)
@fuzz_settings(25)
@given(
    case=spd_cases(max_n=4, max_batch=2, kinds=("generic", "identity")),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    index=st.integers(0, 100),
)
@example(
    case=(torch.eye(3, dtype=torch.float64), torch.float64, "identity"), bad=float("nan"), index=0
)
def test_check_rejects_non_finite_input(fn, case, bad, index):
    # Regression (fuzz find): with check=True a NaN/Inf entry passed the symmetry test
    # (NaN > tol is False) and came out as a silent NaN.
    x64, dtype, _ = case
    if x64.numel() == 0:
        return
    x = poison(x64.to(dtype), bad, index)
    x = torch.where(x.isfinite(), (x + x.mT) / 2, x)  # keep it symmetric apart from the poison
    before = clones(x=x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn(x, check=True)
    assert_unchanged(before, {"x": x})


@pytest.mark.parametrize("fn", [sym_logm, sym_sqrtm, sym_invsqrtm])
@fuzz_settings(25)
@given(
    n=st.integers(1, 5),
    negatives=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_check_rejects_non_positive_definite(fn, n, negatives, seed, dtype):
    gen = generator(seed)
    w = spectrum("generic", n, (), gen)
    w[: min(negatives, n)] *= -1.0
    w[0] = 0.0 if negatives == 5 else w[0]  # singular as well as indefinite
    x = symmetric_with_spectrum(w, gen).to(dtype)
    with pytest.raises(ValueError, match="positive definite"):
        fn(x, check=True)
    # without the check the result is finite (eigenvalues floored), never NaN
    assert_finite(fn(x), "the unchecked result")


@fuzz_settings(20)
@given(n=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES))
def test_check_rejects_non_symmetric(n, seed, dtype):
    gen = generator(seed)
    x = symmetric_with_spectrum(spectrum("generic", n, (), gen), gen)
    x[0, -1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        sym_logm(x.to(dtype), check=True)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.eye(3, dtype=torch.int64), ValueError, "dtype"),
        (torch.eye(3, dtype=torch.float16), ValueError, "dtype"),
        (torch.eye(3, dtype=torch.complex128), ValueError, "dtype"),
        (torch.ones(3, dtype=torch.float64), ValueError, "square"),
        (torch.ones(2, 3, dtype=torch.float64), ValueError, "square"),
        ([[1.0, 0.0], [0.0, 1.0]], TypeError, "Tensor"),
    ],
)
def test_bad_input_types_and_shapes(x, error, match):
    for fn in (sym_logm, sym_expm, sym_sqrtm, lambda a: sym_funcm(a, torch.exp, torch.exp)):
        with pytest.raises(error, match=match):
            fn(x)


# --------------------------------------------------------------------------------------
# Orthonormalization
# --------------------------------------------------------------------------------------


@st.composite
def tall_matrices(draw, *, singular_values=("generic", "ill_conditioned", "rank_deficient")):
    p = draw(st.integers(0, 4))
    n = draw(st.integers(max(p, 1), 7))
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    kind = draw(st.sampled_from(singular_values))
    dtype = draw(st.sampled_from(DTYPES))
    gen = generator(draw(st.integers(0, 2**31 - 1)))
    u = orthogonal(n, batch, gen)[..., :p]
    v = orthogonal(p, batch, gen)
    if kind == "generic":
        s = 0.5 + torch.rand(*batch, p, dtype=torch.float64, generator=gen)
    elif kind == "ill_conditioned":
        s = 10.0 ** (-3 * torch.rand(*batch, p, dtype=torch.float64, generator=gen))
    else:
        s = torch.rand(*batch, p, dtype=torch.float64, generator=gen)
        s[..., :1] = 0.0
    return (u * s[..., None, :]) @ v.mT, dtype, kind


@fuzz_settings(80)
@given(case=tall_matrices())
def test_qr_unique(case):
    a64, dtype, _ = case
    a = a64.to(dtype)
    before = clones(a=a)
    q, r = qr_unique(a)
    assert_unchanged(before, {"a": a})
    assert_finite(q, "Q")
    assert_finite(r, "R")
    eps = torch.finfo(dtype).eps
    p = a.shape[-1]
    eye = torch.eye(p, dtype=dtype)
    assert torch.allclose(q.mT @ q, eye.expand_as(r), atol=50 * eps * a.shape[-2])
    assert torch.allclose(q @ r, a, atol=50 * eps * a.shape[-2])
    assert bool((r.diagonal(dim1=-2, dim2=-1) >= 0).all())
    assert torch.equal(r.tril(-1), torch.zeros_like(r))


@fuzz_settings(80)
@given(case=tall_matrices(singular_values=("generic", "ill_conditioned")))
def test_polar_matches_svd(case):
    a64, dtype, _ = case
    a = a64.to(dtype)
    before = clones(a=a)
    u = polar(a)
    assert_unchanged(before, {"a": a})
    assert_finite(u, "polar")
    if a.numel() == 0:
        assert u.shape == a.shape
        return
    w, _, vh = np.linalg.svd(a64.numpy(), full_matrices=False)
    expected = w @ vh
    s = torch.linalg.svdvals(a64)
    condition = float((s[..., 0] / s[..., -1]).max())
    eps = torch.finfo(dtype).eps
    if eps * condition**2 > 1e-3:
        return  # the documented forward error grows with cond(a) ** 2
    np.testing.assert_allclose(u.double().numpy(), expected, rtol=0, atol=100 * eps * condition**2)


@fuzz_settings(30)
@given(case=tall_matrices(singular_values=("rank_deficient",)))
def test_polar_of_rank_deficient_is_finite(case):
    a64, dtype, _ = case
    assert_finite(polar(a64.to(dtype)), "polar of a rank-deficient matrix")


@fuzz_settings(80)
@given(
    p=st.integers(1, 4),
    extra=st.integers(0, 4),
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    step=st.sampled_from([0.0, 1e-8, 0.3, 1.0, 30.0, 1e4]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_cayley_retraction_matches_dense_formula(p, extra, batch, step, dtype, seed):
    n = p + extra
    gen = generator(seed)
    x64 = orthogonal(n, batch, gen)[..., :p]
    z = torch.randn(*batch, n, p, dtype=torch.float64, generator=gen)
    u64 = step * (z - x64 @ ((x64.mT @ z + z.mT @ x64) / 2))
    x, u = x64.to(dtype), u64.to(dtype)
    before = clones(x=x, u=u)
    y = cayley_retraction(x, u)
    assert_unchanged(before, {"x": x, "u": u})
    assert_finite(y, "cayley_retraction")
    # The 2p x 2p (push-through) form cancels terms of size |u|^2 against an O(1) result,
    # so its forward error is about eps * (1 + |u|)^2: huge steps are checked in float64.
    tolerance = 1e3 * torch.finfo(dtype).eps * n * (1 + step) ** 2
    if tolerance > 1e-2:
        return
    eye_p = torch.eye(p, dtype=dtype)
    assert torch.allclose(y.mT @ y, eye_p.expand(*batch, p, p), atol=tolerance)
    # dense oracle: (I - W/2)^-1 (I + W/2) x with W = P u x^T - x (P u)^T
    xn, un = x.double().numpy(), u.double().numpy()
    pu = un - 0.5 * xn @ (np.swapaxes(xn, -1, -2) @ un)
    w = pu @ np.swapaxes(xn, -1, -2) - xn @ np.swapaxes(pu, -1, -2)
    eye = np.eye(n)
    expected = np.linalg.solve(eye - w / 2, (eye + w / 2) @ xn) if xn.size else xn
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=0, atol=tolerance)


def test_cayley_retraction_rejects_mismatched_dtype():
    # Regression (fuzz find): a float32 tangent at a float64 point failed inside matmul
    # with "expected m1 and m2 to have the same dtype".
    x = torch.eye(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        cayley_retraction(x, torch.zeros(3, 2, dtype=torch.float32))


@pytest.mark.parametrize("fn", [qr_unique, polar, lambda a: cayley_retraction(a, a)])
def test_orthonormalization_rejects_wide_and_bad_dtype(fn):
    with pytest.raises(ValueError, match="tall"):
        fn(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        fn(torch.ones(3, 2, dtype=torch.int64))


@fuzz_settings(60)
@given(
    n=st.integers(1, 6),
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    norm=st.sampled_from([0.0, 1e-4, 4e-3, 0.01, 0.042, 0.1, 0.25, 0.3, 1.0, 5.0]),
    skew=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=2, batch=(), norm=0.042, skew=True, dtype=torch.float64, seed=0)
def test_matrix_exp_matches_scipy(n, batch, norm, skew, dtype, seed):
    # Regression (fuzz find): torch.linalg.matrix_exp in float64 is off by up to 1e-10 at
    # 1-norms in [3e-3, 6e-2]; Stiefel.logmap then stalled above its tolerance and warned
    # "did not converge" for points 0.06 apart.
    z = torch.randn(*batch, n, n, dtype=torch.float64, generator=generator(seed))
    z = z - z.mT if skew else z
    ones = torch.linalg.matrix_norm(z, ord=1, keepdim=True).clamp_min(1e-300)
    a = (norm * z / ones).to(dtype)
    before = clones(a=a)
    e = matrix_exp(a)
    assert_unchanged(before, {"a": a})
    assert_finite(e, "matrix_exp")
    flat = a.double().reshape(-1, n, n).numpy()
    expected = np.stack([scipy.linalg.expm(m) for m in flat]) if flat.size else flat
    tolerance = 50 * n * torch.finfo(dtype).eps * np.exp(norm)
    np.testing.assert_allclose(
        e.double().reshape(-1, n, n).numpy(), expected, rtol=0, atol=tolerance
    )
