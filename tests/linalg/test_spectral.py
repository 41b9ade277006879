"""Symmetric matrix functions: values against SciPy, derivatives against finite differences."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from torch.autograd import gradcheck, gradgradcheck

from tests.linalg._matrices import random_spd, with_spectrum
from torsion.linalg import (
    sym_clampm,
    sym_expm,
    sym_funcm,
    sym_invsqrtm,
    sym_logm,
    sym_powm,
    sym_sqrtm,
)

FUNCTIONS = {
    "logm": (sym_logm, scipy.linalg.logm),
    "expm": (sym_expm, scipy.linalg.expm),
    "sqrtm": (sym_sqrtm, scipy.linalg.sqrtm),
    "invsqrtm": (sym_invsqrtm, lambda a: scipy.linalg.inv(scipy.linalg.sqrtm(a))),
    "powm(0.7)": (
        lambda x: sym_powm(x, 0.7),
        lambda a: scipy.linalg.fractional_matrix_power(a, 0.7),
    ),
    "powm(-1.5)": (
        lambda x: sym_powm(x, -1.5),
        lambda a: scipy.linalg.fractional_matrix_power(a, -1.5),
    ),
    "funcm(sin)": (
        lambda x: sym_funcm(x, torch.sin, torch.cos, lambda t: -torch.sin(t)),
        scipy.linalg.sinm,
    ),
}
TWICE_DIFFERENTIABLE = list(FUNCTIONS)

# Spectra that exercise the tie handling: exact repeats (the identity is how SPD
# batch-norm biases start), near-ties on both sides of the eps**(1/3) threshold, and
# well-separated eigenvalues.
SPECTRA = {
    "identity": [1.0, 1.0, 1.0, 1.0],
    "diag(1,1,2,3)": [1.0, 1.0, 2.0, 3.0],
    "gap 1e-12": [1.0, 1.0 + 1e-12, 2.0, 3.0],
    "gap 1e-6 (tied)": [1.0, 1.0 + 1e-6, 2.0, 3.0],
    "gap 1e-5 (apart)": [1.0, 1.0 + 1e-5, 2.0, 3.0],
    "separated": [0.5, 1.0, 2.0, 3.0],
    "triple": [2.0, 2.0, 2.0, 0.7],
}


def _numpy_reference(reference, x):
    out = np.stack([np.real(reference(a)) for a in x.reshape(-1, *x.shape[-2:]).numpy()])
    return torch.from_numpy(out).reshape(x.shape)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_values_match_scipy(name, batch, generator):
    function, reference = FUNCTIONS[name]
    x = random_spd(5, batch, condition=50.0, generator=generator) / 10
    torch.testing.assert_close(function(x), _numpy_reference(reference, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_gradients_match_finite_differences(name, spectrum, generator):
    function, _ = FUNCTIONS[name]
    x = with_spectrum(torch.tensor(SPECTRA[spectrum], dtype=torch.float64), generator=generator)
    assert gradcheck(function, (x.requires_grad_(),))


@pytest.mark.parametrize("name", TWICE_DIFFERENTIABLE)
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_second_derivatives_match_finite_differences(name, spectrum, generator):
    function, _ = FUNCTIONS[name]
    x = with_spectrum(torch.tensor(SPECTRA[spectrum], dtype=torch.float64), generator=generator)
    assert gradgradcheck(function, (x.requires_grad_(),))


def test_clamp_derivative_is_the_loewner_matrix_of_max(generator):
    x = with_spectrum(torch.tensor([0.1, 0.1, 2.0, 3.0], dtype=torch.float64), generator=generator)
    _, q = torch.linalg.eigh(x)
    y = sym_clampm(x.requires_grad_(), 0.5)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(y), torch.tensor([0.5, 0.5, 2.0, 3.0]).double()
    )
    g = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    g_eig = q.mT @ ((g + g.mT) / 2) @ q
    # Loewner matrix of max(t, 0.5) for eigenvalues (0.1, 0.1, 2, 3): zero within the
    # clamped block, one within the free block, (c(a) - c(b)) / (a - b) across.
    across = (2.0 - 0.5) / (2.0 - 0.1), (3.0 - 0.5) / (3.0 - 0.1)
    loewner = torch.tensor(
        [
            [0.0, 0.0, across[0], across[1]],
            [0.0, 0.0, across[0], across[1]],
            [across[0], across[0], 1.0, 1.0],
            [across[1], across[1], 1.0, 1.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(q.mT @ grad @ q, g_eig * loewner)
    assert gradcheck(lambda a: sym_clampm(a, 0.5), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("function", [sym_logm, sym_sqrtm, sym_invsqrtm])
def test_gradient_at_identity_is_exact(function, dtype, generator):
    # d/dX <G, f(X)> at X = I is f'(1) sym(G): exact, no finite differences needed.
    slope = {sym_logm: 1.0, sym_sqrtm: 0.5, sym_invsqrtm: -0.5}[function]
    x = torch.eye(6, dtype=dtype).expand(4, 6, 6).clone().requires_grad_()
    g = torch.randn(4, 6, 6, dtype=dtype, generator=generator)
    (grad,) = torch.autograd.grad((function(x) * g).sum(), x)
    torch.testing.assert_close(grad, slope * (g + g.mT) / 2)


@pytest.mark.parametrize("condition", [1e1, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("name", ["logm", "sqrtm", "invsqrtm", "powm(0.7)"])
def test_float32_accuracy_against_float64(name, condition, generator):
    function, _ = FUNCTIONS[name]
    x = random_spd(16, (32,), condition=condition, generator=generator)
    g = torch.randn(32, 16, 16, dtype=torch.float64, generator=generator)

    def value_and_grad(a):
        a = a.clone().requires_grad_()
        y = function(a)
        (grad,) = torch.autograd.grad((y * g.to(a.dtype)).sum(), a)
        return y.double(), grad.double()

    y64, grad64 = value_and_grad(x)
    y32, grad32 = value_and_grad(x.float())
    # eigh is backward stable: float32 errors scale as eps * condition, no worse.
    bound = 4 * torch.finfo(torch.float32).eps * condition + 1e-6
    for approx, exact in [(y32, y64), (grad32, grad64)]:
        relative = (approx - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))
        assert relative.max() < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logm_of_nearly_singular_input_is_finite(dtype, generator):
    x = with_spectrum(torch.tensor([0.0, 1e-30, 1.0, 2.0], dtype=dtype), (3,), generator=generator)
    x = x.requires_grad_()
    y = sym_logm(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()
    floor = torch.finfo(dtype).eps * 2.0
    lam = torch.linalg.eigvalsh(y.detach())
    assert lam.min() >= np.log(floor) - 1e-3 * abs(np.log(floor))


def test_forward_over_reverse_and_vmap_agree_with_double_backward(generator):
    x = random_spd(4, condition=5.0, generator=generator)
    g = torch.randn(4, 4, dtype=torch.float64, generator=generator)

    def loss(a):
        return (sym_logm(a) * g).sum()

    reverse_over_reverse = torch.autograd.functional.hessian(loss, x)
    forward_over_reverse = torch.func.jacfwd(torch.func.grad(loss))(x)
    torch.testing.assert_close(forward_over_reverse, reverse_over_reverse)
    batch = torch.stack([x, x + torch.eye(4, dtype=torch.float64)])
    torch.testing.assert_close(torch.func.vmap(sym_logm)(batch), sym_logm(batch))


def test_third_derivative_raises_instead_of_being_wrong(generator):
    x = random_spd(3, generator=generator).requires_grad_()
    (grad,) = torch.autograd.grad(sym_logm(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(second.sum(), x)
    # in forward mode too (it silently gave 0)
    e = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    e = e + e.mT
    jvp = torch.func.jvp

    def second_in_forward_mode(y):
        return jvp(lambda z: jvp(sym_logm, (z,), (e,))[1], (y,), (e,))[1]

    with pytest.raises(RuntimeError, match="third derivatives"):
        jvp(second_in_forward_mode, (x.detach(),), (e,))


@pytest.mark.parametrize("name", ["logm", "expm", "sqrtm", "powm(-1.5)"])
def test_second_derivatives_in_every_mode_agree(name, generator):
    """Forward-over-forward and reverse-over-forward (both gave exactly 0: the tangent
    was built from lam and Q, which carry no derivatives), jacrev of a gradient (vmap
    could not run the third-order barrier) and double backward give one second
    derivative, equal to central finite differences."""
    fn = FUNCTIONS[name][0]
    x = random_spd(3, condition=4.0, generator=generator)
    e = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    e = e + e.mT
    jvp = torch.func.jvp
    h = 1e-4
    finite = (fn(x + h * e) - 2 * fn(x) + fn(x - h * e)) / h**2
    forward_forward = jvp(lambda y: jvp(fn, (y,), (e,))[1], (x,), (e,))[1]
    torch.testing.assert_close(forward_forward, finite, rtol=1e-5, atol=1e-6)

    def loss(y):
        return (fn(y) * e).sum()

    reverse_reverse = torch.autograd.functional.hessian(loss, x)
    torch.testing.assert_close(torch.func.jacrev(torch.func.grad(loss))(x), reverse_reverse)
    reverse_forward = torch.func.grad(lambda y: (jvp(fn, (y,), (e,))[1] * e).sum())(x)
    expected = (reverse_reverse.reshape(9, 9) @ e.reshape(9)).reshape(3, 3)
    torch.testing.assert_close(reverse_forward, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expm_gradient_is_finite_wherever_the_exponential_is(dtype):
    """The divided difference of exp at a wide spread overflowed (``expm1(a - b) exp(b)``)
    although ``exp(a)`` itself is finite: the gradient came out all NaN."""
    spread = {torch.float32: (10.0, -100.0), torch.float64: (400.0, -400.0)}[dtype]
    x = torch.diag(torch.tensor(spread, dtype=dtype)).requires_grad_()
    (grad,) = torch.autograd.grad(sym_expm(x).sum(), x)
    a, b = spread
    expected = torch.tensor(
        [[math.exp(a), (math.exp(a) - math.exp(b)) / (a - b)],
         [(math.exp(a) - math.exp(b)) / (a - b), math.exp(b)]],
        dtype=torch.float64,
    )  # fmt: skip
    assert torch.isfinite(grad).all()
    # exp(-100) is subnormal in float32
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=torch.finfo(dtype).tiny)


def test_frechet_derivative_differentiates_twice_in_its_direction(generator):
    # log-Euclidean maps use Dexp(a)[E] as a forward op; their Hessians differentiate it
    # twice in E while a requires grad. Nothing may be dropped on that path.
    a = 0.3 * torch.randn(4, 4, dtype=torch.float64, generator=generator)
    a = ((a + a.mT) / 2).requires_grad_()
    y = random_spd(4, condition=5.0, generator=generator).requires_grad_()

    def cost(y):
        (frechet,) = torch.autograd.grad(sym_expm(a), a, sym_logm(y), create_graph=True)
        return (frechet * frechet).sum()

    assert gradcheck(cost, (y,)) and gradgradcheck(cost, (y,))


def test_funcm_without_second_derivative_says_so(generator):
    x = random_spd(3, generator=generator).requires_grad_()
    y = sym_funcm(x, torch.sin, torch.cos)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="d2f"):
        torch.autograd.grad((grad**2).sum(), x)


@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 3, 3), (1, 1)])
def test_empty_and_tiny_batches(shape, generator):
    x = (torch.eye(shape[-1], dtype=torch.float64) * 2).expand(shape).clone().requires_grad_()
    y = sym_logm(x, check=True)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


def test_input_is_not_modified(generator):
    x = random_spd(5, (2,), generator=generator)
    x[0, 0, 1] += 1e-3  # not quite symmetric: only the symmetric part is read
    before = x.clone()
    sym_logm(x)
    assert torch.equal(x, before)


class TestBadInput:
    def test_non_square(self):
        with pytest.raises(ValueError, match=r"square matrices .* got shape \(3, 4\)"):
            sym_logm(torch.ones(3, 4))

    def test_vector(self):
        with pytest.raises(ValueError, match="square matrices"):
            sym_expm(torch.ones(3))

    def test_integer_dtype(self):
        with pytest.raises(ValueError, match=r"float32 or float64 .* torch.int64"):
            sym_sqrtm(torch.eye(3, dtype=torch.int64))

    def test_non_symmetric_when_checked(self, generator):
        x = random_spd(4, (3,), generator=generator)
        x[1, 0, 3] += 0.5
        assert torch.isfinite(sym_logm(x)).all()  # unchecked: reads the symmetric part
        with pytest.raises(ValueError, match="symmetric matrices; 1 of 3 are not"):
            sym_logm(x, check=True)

    @pytest.mark.parametrize("function", [sym_logm, sym_sqrtm, sym_invsqrtm])
    def test_non_positive_when_checked(self, function, generator):
        x = with_spectrum(torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64), generator=generator)
        with pytest.raises(ValueError, match=r"positive definite.*smallest -1"):
            function(x, check=True)

    def test_exponent_must_be_a_number(self):
        with pytest.raises(TypeError, match="Python number"):
            sym_powm(torch.eye(2), torch.tensor(2.0))
        with pytest.raises(ValueError, match="finite exponent, got nan"):
            sym_powm(torch.eye(2), float("nan"))
        with pytest.raises(ValueError, match="finite eps, got nan"):
            sym_clampm(torch.eye(2), float("nan"))


def test_compiles_without_graph_breaks(generator):
    x = random_spd(6, (4,), condition=20.0, dtype=torch.float32, generator=generator)
    g = torch.randn(4, 6, 6, generator=generator)

    def loss(a):
        return (sym_logm(a) * g).sum()

    explanation = torch._dynamo.explain(loss)(x.clone().requires_grad_())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled).backward()
    loss(eager).backward()
    torch.testing.assert_close(compiled.grad, eager.grad)


@settings(max_examples=25, deadline=None)
@given(
    multiplicities=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
)
def test_random_spectra_with_repeats(multiplicities, seed, batch):
    """Random SPD matrices with repeated eigenvalues: gradients finite and match finite
    differences of the (SciPy-checked) forward along a random symmetric direction."""
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.rand(len(multiplicities), dtype=torch.float64, generator=generator) * 4 + 0.2
    eigenvalues = torch.repeat_interleave(distinct, torch.tensor(multiplicities))
    x = with_spectrum(eigenvalues, (batch,), generator=generator).requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    direction = (direction + direction.mT) / 2

    (grad,) = torch.autograd.grad((sym_logm(x) * g).sum(), x)
    assert torch.isfinite(grad).all()
    step = 1e-6
    with torch.no_grad():
        plus = (sym_logm(x + step * direction) * g).sum()
        minus = (sym_logm(x - step * direction) * g).sum()
    torch.testing.assert_close(
        (grad * direction).sum(), (plus - minus) / (2 * step), rtol=1e-6, atol=1e-7
    )


def _rank_one(n, *, generator):
    """``v v^T``: ``eigh`` returns its ``n - 1`` zero eigenvalues as rounding noise of
    either sign (``+-1e-16`` next to ``|v|^2``), a cluster whose relative gaps are large."""
    v = torch.randn(n, 1, dtype=torch.float64, generator=generator)
    return v @ v.mT


def test_expm_second_derivative_at_a_rank_one_matrix(generator):
    """The noise cluster at zero is a tie: dividing rounding errors by its 1e-17 gaps put
    Hessian-vector products of ``expm`` off by up to 4000 %."""
    c, d = (torch.randn(4, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    c, d = c + c.mT, d + d.mT

    def gradient(u, create_graph=False):
        u = u.clone().requires_grad_()
        (grad,) = torch.autograd.grad((sym_expm(u) * c).sum(), u, create_graph=create_graph)
        return u, grad

    for _ in range(5):
        x = _rank_one(4, generator=generator)
        u, grad = gradient(x, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * d).sum(), u)
        h = 1e-5
        finite = (gradient(x + h * d)[1] - gradient(x - h * d)[1]) / (2 * h)
        torch.testing.assert_close(hvp, finite, rtol=1e-7, atol=1e-7 * finite.abs().max())


def test_funcm_gradient_at_a_rank_one_matrix(generator):
    """A user function's difference quotient at the noise cluster divided rounding errors
    by a 1e-17 gap (a zero gradient entry where the exact one is ``exp[0, 0] = 1``)."""
    e = torch.randn(4, 4, dtype=torch.float64, generator=generator)
    e = e + e.mT
    for _ in range(5):
        x = _rank_one(4, generator=generator).requires_grad_()
        (grad,) = torch.autograd.grad((sym_funcm(x, torch.exp, torch.exp) * e).sum(), x)
        _, frechet = scipy.linalg.expm_frechet(x.detach().numpy(), e.numpy())
        torch.testing.assert_close(grad, torch.from_numpy(frechet), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("dtype", "spectrum", "p"),
    [(torch.float32, [1e-4, 1.0], 10), (torch.float64, [1e-12, 1.0], 30)],
)
def test_power_gradient_for_a_large_exponent(dtype, spectrum, p, generator):
    """``cb^p expm1(p log(ca / cb))`` overflowed once ``p log(ca / cb)`` passed
    ``log(max float)``: a NaN gradient although the true one is of order one."""
    x = with_spectrum(torch.tensor(spectrum, dtype=torch.float64), generator=generator)
    e = torch.randn(2, 2, dtype=torch.float64, generator=generator)
    x = x.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad((sym_powm(x, float(p)) * e.to(dtype)).sum(), x)
    # Exact for an integer power: autograd through repeated products, in float64.
    exact = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad((torch.linalg.matrix_power(exact, p) * e).sum(), exact)
    expected = (expected + expected.mT) / 2  # sym_powm reads the symmetric part of x
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=rtol)


def test_check_accepts_what_each_function_is_defined_on(generator):
    """``check=True`` rejects only what a function cannot take: the zero matrix is
    (exactly) symmetric, and expm, clampm and funcm take indefinite symmetric input."""
    zero = torch.zeros(2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        sym_expm(zero, check=True), torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    )
    x = with_spectrum(torch.tensor([-2.0, -0.5, 1.0], dtype=torch.float64), generator=generator)
    torch.testing.assert_close(
        sym_expm(x, check=True), torch.from_numpy(scipy.linalg.expm(x.numpy()))
    )
    torch.testing.assert_close(
        sym_funcm(x, torch.sin, torch.cos, check=True),
        torch.from_numpy(scipy.linalg.sinm(x.numpy())),
    )
    lam, q = torch.linalg.eigh(x)
    torch.testing.assert_close(sym_clampm(x, 0.1, check=True), (q * lam.clamp_min(0.1)) @ q.mT)


@pytest.mark.parametrize("function", [sym_logm, sym_sqrtm, sym_invsqrtm])
def test_check_rejects_a_singular_matrix(function):
    """Positive *definite*: an exactly zero eigenvalue is rejected like a negative one."""
    x = torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"positive definite.*smallest 0"):
        function(x, check=True)
