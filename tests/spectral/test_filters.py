"""Polynomial spectral filters against their dense spectral definitions ``U g(Λ) Uᵀ x``.

Each oracle builds the dense normalized operator, diagonalizes it with ``eigh`` in float64
and applies the paper's response ``g`` written in closed form (SciPy's Jacobi polynomials,
binomial Bernstein polynomials, NumPy's Chebyshev interpolation, a scalar recurrence or a
QR of the Krylov basis), independent of the layers' recurrences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as npcheb
from scipy.special import eval_jacobi
from torch.func import functional_call

from tests.spectral._eigen_graphs import (
    DTYPE,
    cycle,
    hypercube,
    normalized_adjacency,
    random_graph,
)
from torsion.spectral import BernConv, ChebIIConv, GPRConv, JacobiConv, OptBasisConv
from torsion.spectral._filters import _normalized_edges, _Operator, csr_matmul, csr_sddmm

C = 3  # channels


def _graph(generator: torch.Generator, n: int = 11):
    """A random weighted graph with one isolated node (the last)."""
    edge_index = random_graph(n - 1, 0.35, generator)
    half = edge_index.size(1) // 2
    w = 0.2 + torch.rand(half, generator=generator, dtype=DTYPE)
    return edge_index, torch.cat([w, w]), n


def _randomize(conv: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Random parameters (not the identity initialisation), in float64."""
    conv = conv.double()
    with torch.no_grad():
        for name, p in conv.named_parameters():
            if name == "sqrt_beta":
                p.copy_(0.5 + torch.rand(p.shape, generator=generator, dtype=DTYPE))
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return conv


def _apply_response(op: torch.Tensor, response, x: torch.Tensor) -> torch.Tensor:
    """``U g_c(Λ) Uᵀ x[:, c]`` per channel; ``response(mu)`` returns ``(n, C)`` or ``(n, 1)``."""
    mu, u = torch.linalg.eigh(op)
    g = response(mu)
    return u @ (g * (u.T @ x))


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=DTYPE)


# ---------------------------------------------------------------------------------------
# Responses, in closed form
# ---------------------------------------------------------------------------------------


def gpr_response(conv: GPRConv):
    gamma = conv.gamma.detach()
    return lambda mu: sum(gamma[k] * mu**k for k in range(conv.K + 1)).unsqueeze(-1)


def bern_response(conv: BernConv):
    theta = torch.relu(conv.theta.detach())
    K = conv.K

    def g(mu):
        lam = 1.0 - mu  # eigenvalues of L = I - Â
        terms = [
            theta[k] * math.comb(K, k) / 2**K * (2 - lam) ** (K - k) * lam**k for k in range(K + 1)
        ]
        return sum(terms).unsqueeze(-1)

    return g


def chebii_response(conv: ChebIIConv):
    K = conv.K
    nodes = np.cos((K - np.arange(K + 1) + 0.5) * np.pi / (K + 1))
    coef = npcheb.chebfit(nodes, torch.relu(conv.gamma.detach()).numpy(), K)
    # The variable is t = lambda - 1 with lambda = 1 - mu the eigenvalues of L: t = -mu.
    return lambda mu: _tensor(npcheb.chebval((-mu).numpy(), coef)).unsqueeze(-1)


def jacobi_response(conv: JacobiConv):
    K, a, b = conv.K, conv.a, conv.b
    s = conv.alpha * torch.tanh(conv.eta.detach())
    weight = conv.weight.detach()

    def g(mu):
        out = torch.zeros(mu.numel(), weight.size(1), dtype=DTYPE)
        for k in range(K + 1):
            decay = torch.prod(s[:k]) if k else torch.tensor(1.0, dtype=DTYPE)
            pk = _tensor(eval_jacobi(k, a, b, mu.numpy()))
            out += decay * weight[k] * pk.unsqueeze(-1)
        return out

    return g


def favard_response(conv: OptBasisConv):
    sb = conv.sqrt_beta.detach().clamp_min(1e-2)
    gamma, weight = conv.gamma.detach(), conv.weight.detach()

    def g(mu):
        mu = mu.unsqueeze(-1)
        prev, cur = torch.zeros_like(mu * sb[0]), (1.0 / sb[0]).expand(mu.size(0), -1)
        out = weight[0] * cur
        for k in range(conv.K):
            prev, cur = cur, ((mu - gamma[k]) * cur - sb[k] * prev) / sb[k + 1]
            out = out + weight[k + 1] * cur
        return out

    return g


def optimal_basis_output(conv: OptBasisConv, op: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """OptBasisGNN by its definition: orthonormal polynomials of the signal's spectral measure.

    In the eigenbasis, ``x_c`` has weights ``c_i = u_iᵀ x_c / ||x_c||``. The columns
    ``T_k(mu) * c`` (Chebyshev, for conditioning) span the Krylov space; their QR with a
    positive diagonal gives the orthonormal polynomials ``p_k`` with positive leading
    coefficient evaluated on the measure. The output is ``U (sum_k w_k p_k(mu) c)``.
    """
    mu, u = torch.linalg.eigh(op)
    out = torch.zeros_like(x)
    for ch in range(x.size(1)):
        c = u.T @ (x[:, ch] / x[:, ch].norm())
        cheb = torch.stack(
            [_tensor(npcheb.chebval(mu.numpy(), np.eye(conv.K + 1)[k])) for k in range(conv.K + 1)],
            1,
        )
        q, r = torch.linalg.qr(cheb * c.unsqueeze(-1))
        q = q * torch.diagonal(r).sign()
        out[:, ch] = u @ (q @ conv.weight.detach()[:, ch])
    return out


CASES = {
    "gpr": (lambda K: GPRConv(K), True, gpr_response),
    "bern": (lambda K: BernConv(K), False, bern_response),
    "chebii": (lambda K: ChebIIConv(K), False, chebii_response),
    "jacobi": (lambda K: JacobiConv(C, K), False, jacobi_response),
    "jacobi_ab": (lambda K: JacobiConv(C, K, a=-0.5, b=2.0, alpha=0.7), False, jacobi_response),
    "favard": (lambda K: OptBasisConv(C, K, basis="favard"), False, favard_response),
}
ALL_FILTERS = {
    **{name: make for name, (make, _, _) in CASES.items()},
    "optimal": lambda K: OptBasisConv(C, K),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("K", [0, 1, 2, 7])
def test_matches_dense_spectral_definition(name, K, generator):
    make, self_loops, response = CASES[name]
    edge_index, weight, n = _graph(generator)
    conv = _randomize(make(K), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    op = normalized_adjacency(edge_index, n, weight, self_loops=self_loops)
    expected = _apply_response(op, response(conv), x)
    torch.testing.assert_close(conv(x, edge_index, weight), expected, rtol=0, atol=1e-8)


def _directed_multigraph(generator: torch.Generator):
    """A directed weighted graph on 8 nodes: random arcs among nodes 0-5 (one direction
    only, or both with different weights), repeated arcs, self-loops (one at node 1, a
    repeated one at node 3, one of weight 0 at node 4), a node with out-arcs only (6) and
    an isolated node (7)."""
    n = 8
    arcs = [
        (i, j)
        for i in range(6)
        for j in range(6)
        if i != j and torch.rand((), generator=generator) < 0.3
    ]
    arcs += [*arcs[:3], (6, 0), (6, 3), (1, 1), (3, 3), (3, 3), (4, 4)]
    edge_index = torch.tensor(arcs, dtype=torch.long).T
    weight = 0.2 + torch.rand(edge_index.size(1), generator=generator, dtype=DTYPE)
    weight[-1] = 0.0  # the loop at node 4
    return edge_index, weight, n


def _documented_operator(edge_index, weight, n, add_self_loops):
    """``D^{-1/2} A D^{-1/2}`` as the module docstring defines it, densely: ``A[t, s]``
    sums the weights of all edges ``s -> t`` (repeats and self-loops included); with
    ``add_self_loops`` every node with no self-loop edge (of any weight) gets a unit one;
    ``D`` sums each row of ``A`` (the degree at the target); isolated nodes: zero rows."""
    a = torch.zeros(n, n, dtype=DTYPE)
    a.index_put_((edge_index[1], edge_index[0]), weight, accumulate=True)
    if add_self_loops:
        has_loop = torch.zeros(n, dtype=torch.bool)
        has_loop[edge_index[0, edge_index[0] == edge_index[1]]] = True
        a += torch.diag((~has_loop).to(DTYPE))
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), 0.0)
    return inv[:, None] * a * inv[None, :]


def _apply_polynomial(op: torch.Tensor, response, K: int, x: torch.Tensor) -> torch.Tensor:
    """``g_c(S) x[:, c]`` for any square ``S``: the degree-``K`` response, interpolated
    exactly at ``K + 1`` Chebyshev points, evaluated as a dense matrix polynomial
    ``sum_k a_k T_k(S)`` (no eigendecomposition: ``S`` need not be symmetric)."""
    nodes = np.cos((2 * np.arange(K + 1) + 1) * np.pi / (2 * K + 2))
    coef = _tensor(npcheb.chebfit(nodes, response(_tensor(nodes)).numpy(), K))  # (K+1, C|1)
    eye = torch.eye(op.size(0), dtype=DTYPE)
    prev, cur = eye, op
    out = coef[0] * x
    for k in range(1, K + 1):
        out = out + coef[k] * (cur @ x)
        prev, cur = cur, 2 * op @ cur - prev
    return out


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("K", [1, 2, 7])
@pytest.mark.parametrize("add_self_loops", [False, True], ids=["A", "A+I"])
def test_matches_documented_operator_on_directed_multigraph(name, K, add_self_loops, generator):
    """The same polynomial of the non-symmetric operator on a directed graph: degrees summed
    at the target, repeated edges summed, and ``add_self_loops`` adding a unit loop only
    where a node has none (an existing loop, even of weight 0, is kept as it is)."""
    make, _, response = CASES[name]
    edge_index, weight, n = _directed_multigraph(generator)
    conv = _randomize(make(K), generator)
    conv.add_self_loops = add_self_loops
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    op = _documented_operator(edge_index, weight, n, add_self_loops)
    assert not torch.allclose(op, op.T)  # the direction of normalisation matters
    expected = _apply_polynomial(op, response(conv), K, x)
    torch.testing.assert_close(conv(x, edge_index, weight), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_optimal_basis_matches_orthonormal_polynomials(K, generator):
    edge_index, weight, n = _graph(generator)
    conv = _randomize(OptBasisConv(C, K), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    op = normalized_adjacency(edge_index, n, weight)
    expected = optimal_basis_output(conv, op, x)
    torch.testing.assert_close(conv(x, edge_index, weight), expected, rtol=0, atol=1e-8)


def test_optimal_basis_is_orthonormal_and_scale_invariant(generator):
    """With ``w = e_k`` the output is the k-th Lanczos vector: orthonormal, scale-free."""
    edge_index, _, n = _graph(generator)
    K = 4
    conv = OptBasisConv(1, K).double()
    x = torch.randn(n, 1, generator=generator, dtype=DTYPE)
    basis = []
    for k in range(K + 1):
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[k] = 1.0
        basis.append(conv(x, edge_index)[:, 0])
        for scale in (7.5, 1e-6, 1e-12):  # small signals are not mistaken for zero
            torch.testing.assert_close(conv(scale * x, edge_index)[:, 0], basis[-1])
    gram = torch.stack(basis, 1).T @ torch.stack(basis, 1)
    torch.testing.assert_close(gram, torch.eye(K + 1, dtype=DTYPE), rtol=0, atol=1e-12)


def test_optimal_basis_zero_column_and_exhausted_krylov_space():
    """A zero channel stays zero, and a Krylov space exhausted early (an eigenvector of
    ``Â``) gives zero higher basis vectors, with finite gradients."""
    edge_index = cycle(6)
    conv = OptBasisConv(2, 3).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.zeros(6, 2, dtype=DTYPE)
    x[:, 1] = 1.0  # constant vector: an eigenvector of the cycle's Â
    x.requires_grad_()
    out = conv(x, edge_index)
    torch.testing.assert_close(out[:, 0], torch.zeros(6, dtype=DTYPE))
    torch.testing.assert_close(out[:, 1], torch.full((6,), 6**-0.5, dtype=DTYPE))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bernstein_identity_and_nonnegative_response(generator):
    """Unit coefficients sum to the identity; any coefficients give g >= 0 on [0, 2]."""
    edge_index, weight, n = _graph(generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    torch.testing.assert_close(BernConv(6).double()(x, edge_index, weight), x)
    conv = _randomize(BernConv(6), generator)
    op = normalized_adjacency(edge_index, n, weight)
    mu = torch.linalg.eigvalsh(op)
    assert (bern_response(conv)(mu) >= 0).all()


# ---------------------------------------------------------------------------------------
# Cost: exactly K sparse products
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
@pytest.mark.parametrize("K", [0, 1, 2, 10])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["fixed", "learned"])
def test_exactly_K_sparse_products(name, K, weight_grad, generator):
    edge_index, weight, n = _graph(generator)
    conv = ALL_FILTERS[name](K)
    calls = []
    conv.register_propagate_forward_pre_hook(lambda module, inputs: calls.append(1))
    x = torch.randn(n, C, generator=generator, requires_grad=True)
    conv(x, edge_index, weight.float().requires_grad_(weight_grad)).sum().backward()
    assert len(calls) == K


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_weights_with_and_without_gradient_agree(name, generator):
    """Edge weights that need a gradient change nothing in the forward or the input
    gradient (their own gradient comes from the sampled product, checked by gradcheck)."""
    edge_index, weight, n = _graph(generator)
    conv = _randomize(ALL_FILTERS[name](4), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    grads = []
    for weight_grad in (False, True):
        xg = x.clone().requires_grad_()
        out = conv(xg, edge_index, weight.clone().requires_grad_(weight_grad))
        (grad,) = torch.autograd.grad((out * x).sum(), xg)
        grads.append((out.detach(), grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_duplicate_edges_are_summed(generator):
    """A multi-edge counts with its total weight, on both paths."""
    edge_index, weight, n = _graph(generator)
    doubled = torch.cat([edge_index, edge_index], dim=1)
    conv = _randomize(ChebIIConv(3), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    expected = conv(x, edge_index, 2 * weight)
    torch.testing.assert_close(conv(x, doubled, torch.cat([weight, weight])), expected)
    torch.testing.assert_close(conv(x, doubled), conv(x, edge_index, torch.full_like(weight, 2)))


@pytest.mark.parametrize("self_loops", [False, True], ids=["A", "A+I"])
def test_edge_weight_gradients_with_repeated_edges_and_self_loops(self_loops, generator):
    """Finite differences (gradcheck) of the output in every edge weight, and of the input
    gradient in them (gradgradcheck), on a graph with a repeated edge and a self-loop:
    repeated entries of the sparse matrix each get the gradient of their sum."""
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3, 0, 1, 2], [1, 0, 2, 1, 3, 2, 1, 0, 2]])
    w = (0.5 + torch.rand(edge_index.size(1), generator=generator, dtype=DTYPE)).requires_grad_()
    conv = _randomize(JacobiConv(C, 3, add_self_loops=self_loops), generator)
    x = torch.randn(5, C, generator=generator, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv(x, edge_index, w), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: conv(x, edge_index, w), (x, w))


def test_int32_edge_index_on_a_large_graph_equals_int64(generator):
    """Past 46,341 nodes the sort key ``row * n + col`` overflows int32: int32 indices must
    give the int64 result (edges between far-apart nodes, where the key is largest)."""
    n = 50_000
    src = torch.randint(0, n, (300,), generator=generator)
    dst = torch.randint(0, n, (300,), generator=generator)
    edge_index = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    conv = _randomize(ChebIIConv(2), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    expected = conv(x, edge_index)
    torch.testing.assert_close(conv(x, edge_index.int()), expected, rtol=0, atol=1e-12)


def test_sparse_ops_pass_torch_opcheck(generator):
    """``torch.library.opcheck`` on the two custom ops (schema, fake tensors, autograd
    registration, aot dispatch), on an operator with a repeated edge and self-loops."""
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3, 0, 5], [1, 0, 2, 1, 3, 2, 1, 5]])
    weight = torch.rand(8, generator=generator, dtype=DTYPE)
    index, values = _normalized_edges(edge_index, weight, 7, True, DTYPE, 1.0)
    op = _Operator.from_edges(index, values, 7)
    x = torch.randn(7, C, generator=generator, dtype=DTYPE, requires_grad=True)
    a = torch.randn(7, C, generator=generator, dtype=DTYPE, requires_grad=True)
    values = op.values.detach().requires_grad_()
    torch.library.opcheck(csr_matmul, (*op.pattern, values, x))
    torch.library.opcheck(csr_sddmm, (*op.pattern, a, x))


# ---------------------------------------------------------------------------------------
# Symmetry, dtypes, gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_permutation_equivariance(name, generator):
    edge_index, weight, n = _graph(generator)
    conv = _randomize(ALL_FILTERS[name](5), generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    perm = torch.randperm(n, generator=generator)
    inv = torch.argsort(perm)  # new label of old node i is inv[i]
    edge_perm = torch.randperm(edge_index.size(1), generator=generator)
    out = conv(x[perm], inv[edge_index][:, edge_perm], weight[edge_perm])
    torch.testing.assert_close(out, conv(x, edge_index, weight)[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_float32_follows_input_and_matches_float64(name, generator):
    edge_index, weight, n = _graph(generator)
    conv = _randomize(ALL_FILTERS[name](6), generator).float()
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    out32 = conv(x.float(), edge_index, weight.float())
    out64 = conv(x, edge_index, weight)  # float32 parameters, float64 signal: float64 out
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_gradcheck(name, generator):
    edge_index = hypercube(2)
    n = 4
    conv = _randomize(ALL_FILTERS[name](3), generator)
    if name == "bern" or name == "chebii":  # keep away from the ReLU kink at 0
        with torch.no_grad():
            next(conv.parameters()).abs_().add_(0.1)
    params = dict(conv.named_parameters())
    names = sorted(params)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE, requires_grad=True)
    w = (0.5 + torch.rand(edge_index.size(1), generator=generator, dtype=DTYPE)).requires_grad_()

    def f(x, w, *values):
        return functional_call(conv, dict(zip(names, values, strict=True)), (x, edge_index, w))

    inputs = (x, w, *(params[k].detach().clone().requires_grad_() for k in names))
    assert torch.autograd.gradcheck(f, inputs)  # the gradient reaches the edge weights
    fixed = w.detach()
    assert torch.autograd.gradcheck(lambda x, *v: f(x, fixed, *v), (x, *inputs[2:]))
    assert torch.autograd.gradgradcheck(lambda x: f(x, fixed, *inputs[2:]), (x,))
    # second derivatives in the edge weights too (the sampled product's own backward)
    assert torch.autograd.gradgradcheck(lambda x, w: f(x, w, *inputs[2:]), (x, w))


# ---------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_empty_graph(name):
    conv = ALL_FILTERS[name](4)
    out = conv(torch.randn(0, C), torch.empty(2, 0, dtype=torch.long))
    assert out.shape == (0, C)


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_cached_operator_refuses_a_graph_of_another_size(name, generator):
    """The cache of a graph of 11 nodes applied to 7 failed inside the sparse product,
    with a shape error that did not name the cache."""
    edge_index, weight, n = _graph(generator)
    conv = ALL_FILTERS[name](3).double()
    conv.cached = True
    conv(torch.randn(n, C, generator=generator, dtype=DTYPE), edge_index, weight)
    small, small_weight, m = _graph(generator, n=7)
    x = torch.randn(m, C, generator=generator, dtype=DTYPE)
    with pytest.raises(ValueError, match="cached=True"):
        conv(x, small, small_weight)
    with pytest.raises(ValueError, match="cached=True"):  # whatever the dtype
        conv(x.float(), small, small_weight.float())
    fresh = ALL_FILTERS[name](3).double()
    fresh.load_state_dict(conv.state_dict())
    assert fresh(x, small, small_weight).shape == (m, C)  # the graph itself is fine


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_input_not_modified_and_cached_operator(name, generator):
    edge_index, weight, n = _graph(generator)
    conv = ALL_FILTERS[name](3).double()
    conv.cached = True
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    saved = (x.clone(), edge_index.clone(), weight.clone())
    first = conv(x, edge_index, weight)
    assert torch.equal(x, saved[0]) and torch.equal(edge_index, saved[1])
    assert torch.equal(weight, saved[2])
    # The cached operator is reused even if the (transductive) graph argument changes.
    torch.testing.assert_close(conv(x, edge_index[:, :0]), first)
    conv.reset_parameters()
    assert conv._cached_operator is None
    # the cache is of one dtype: .float() (which cannot see it) and a float32 input rebuild
    # it (it raised "expected scalar type Double but found Float" in the product)
    conv(x, edge_index, weight)
    out = conv.float()(x.float(), edge_index, weight.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), first, rtol=1e-5, atol=1e-5)


def test_no_edges_is_the_zero_operator(generator):
    x = torch.randn(5, C, generator=generator, dtype=DTYPE)
    none = torch.empty(2, 0, dtype=torch.long)
    gpr = _randomize(GPRConv(3), generator)  # self-loops: Ã = I
    torch.testing.assert_close(gpr(x, none), gpr.gamma.sum() * x)
    gpr_plain = _randomize(GPRConv(3, add_self_loops=False), generator)
    torch.testing.assert_close(gpr_plain(x, none), gpr_plain.gamma[0] * x)


def test_bad_degree_and_arguments():
    for make in ALL_FILTERS.values():
        with pytest.raises(ValueError, match="K >= 0"):
            make(-1)
    with pytest.raises(TypeError, match="integer polynomial degree"):
        BernConv(2.5)
    with pytest.raises(ValueError, match="alpha in"):
        GPRConv(3, alpha=0.0)
    with pytest.raises(ValueError, match="a > -1"):
        JacobiConv(C, 3, a=-1.0)
    with pytest.raises(ValueError, match="alpha > 0"):
        JacobiConv(C, 3, alpha=0.0)
    with pytest.raises(ValueError, match="'optimal' or 'favard'"):
        OptBasisConv(C, 3, basis="lanczos")
    with pytest.raises(ValueError, match="positive integer number of channels"):
        OptBasisConv(0, 3)


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_bad_shapes(name, generator):
    edge_index, weight, n = _graph(generator)
    conv = ALL_FILTERS[name](2)
    x = torch.randn(n, C)
    with pytest.raises(ValueError, match=r"x of shape \(num_nodes, channels\)"):
        conv(x[:, 0], edge_index)
    with pytest.raises(ValueError, match=r"x of shape \(num_nodes, channels\)"):
        conv(x.long(), edge_index)
    with pytest.raises(ValueError, match=r"edge_index of shape \(2, num_edges\)"):
        conv(x, edge_index.T)
    with pytest.raises(ValueError, match="edge_weight of shape"):
        conv(x, edge_index, weight[:-1].float())
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=f"need float32 or float64 node features, got {half}"):
            conv.to(half)(x.to(half), edge_index)
    conv.float()
    if name in ("jacobi", "jacobi_ab", "favard", "optimal"):
        with pytest.raises(ValueError, match=f"built for {C} channels"):
            conv(torch.randn(n, C + 1), edge_index)


@pytest.mark.parametrize("check", [None, True])
def test_check_flag_validates_values(check, generator):
    """Bad values raise clear errors: by default in eager mode on the CPU, and with
    ``check=True`` everywhere; ``check=False`` leaves an out-of-range edge to torch."""
    edge_index, weight, n = _graph(generator)
    conv = BernConv(2, check=check)
    x = torch.randn(n, C)
    with pytest.raises(ValueError, match="outside"):
        conv(x[: n - 2], edge_index)  # the graph has nodes up to n - 2
    bad = weight.float().clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        conv(x, edge_index, bad)
    bad[0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        conv(x, edge_index, bad)
    with pytest.raises(IndexError):
        BernConv(2, check=False)(x[: n - 2], edge_index)


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
def test_batch_of_graphs_equals_each_graph_alone(name, generator):
    """With ``batch`` every filter (the optimal basis's per-graph inner products included)
    filters each graph of a PyG-style batch as if it were alone."""
    conv = _randomize(ALL_FILTERS[name](4), generator)
    graphs = [_graph(generator, n) for n in (5, 9, 7)]
    xs = [torch.randn(n, C, generator=generator, dtype=DTYPE) for _, _, n in graphs]
    offsets = np.cumsum([0] + [n for _, _, n in graphs])
    edge_index = torch.cat(
        [e + int(o) for (e, _, _), o in zip(graphs, offsets[:-1], strict=True)], 1
    )
    weight = torch.cat([w for _, w, _ in graphs])
    batch = torch.cat([torch.full((n,), g) for g, (_, _, n) in enumerate(graphs)])
    together = conv(torch.cat(xs), edge_index, weight, batch=batch)
    alone = torch.cat([conv(x, e, w) for x, (e, w, _) in zip(xs, graphs, strict=True)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="batch must be an integer tensor of shape"):
        conv(torch.cat(xs), edge_index, weight, batch=batch[:-1])


@pytest.mark.parametrize("name", sorted(ALL_FILTERS))
@pytest.mark.parametrize("self_loops", [False, True], ids=["A", "A+I"])
def test_compiles_without_graph_breaks(name, self_loops, generator):
    """``fullgraph=True``: the whole forward and backward trace as one graph (the edge
    form of the operator), and give the eager layer's output and gradients, on a graph
    with a multi-edge, an existing self-loop and an isolated node."""
    edge_index, weight, n = _graph(generator)
    extra = torch.tensor([[0, 2], [edge_index[1, 0], 2]])  # a repeated edge, a self-loop
    edge_index = torch.cat([edge_index, extra], dim=1)
    weight = torch.cat([weight, torch.tensor([0.7, 1.3], dtype=DTYPE)])
    conv = _randomize(ALL_FILTERS[name](4), generator)
    conv.add_self_loops = self_loops
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    batch = torch.zeros(n, dtype=torch.long)

    def loss(x, weight):
        return (conv(x, edge_index, weight, batch=batch) * torch.cos(x)).sum()

    wrt = [*conv.parameters(), x.requires_grad_(), weight.requires_grad_()]
    eager = torch.autograd.grad(loss(x, weight), wrt)
    torch._dynamo.reset()  # one code object for every case: start each from a clean cache
    compiled = torch.autograd.grad(
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x, weight), wrt
    )
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    # without edge weights, where the eager layer takes its sparse (CSR) path
    plain = torch.compile(conv, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(plain(x.detach(), edge_index), conv(x.detach(), edge_index))
