"""Learnable polynomial spectral filters as ``MessagePassing`` layers.

Each layer computes ``g(S) x = sum_k c_k p_k(S) x`` for a normalized graph operator ``S``
(spectrum in ``[-1, 1]``), a polynomial basis ``p_0 .. p_K`` and learnable coefficients,
by sparse products only: no eigendecomposition. Whatever the basis, a degree-``K`` filter
costs exactly ``K`` sparse products (``propagate`` calls) per forward pass:

* bases with a three-term recurrence of their own (monomials, Jacobi, the learned
  orthonormal bases of OptBasisGNN / FavardGNN) run it directly;
* BernNet's Bernstein basis and ChebNetII's values at Chebyshev nodes are first mapped to
  Chebyshev coefficients by a fixed ``(K + 1) x (K + 1)`` matrix (see
  :mod:`torsion.spectral._polynomials`); BernNet's reference implementation recomputes
  powers and spends ``K (K + 3) / 2`` products (65 at ``K = 10``).

Operators. ``A`` is the weighted adjacency matrix (self-loops in the input are kept as
edges), ``D`` its degree matrix, ``Â = D^{-1/2} A D^{-1/2}`` (PyG's ``gcn_norm``
convention; isolated nodes get a zero row) and ``L = I - Â`` the normalized Laplacian,
whose spectrum lies in ``[0, 2]``. With ``add_self_loops=True``, ``A`` first gets a unit
self-loop on every node that has none (GCN's renormalization trick). The filters assume
an undirected graph (both directions of each edge present); on a directed graph they
apply the same polynomial to the non-symmetric operator.

Sparse products. Each call assembles the normalized operator once as a compressed sparse
row (CSR) matrix, with the pattern of its transpose for the backward pass, so every
product is one CSR x dense multiplication (on CPU at 10^5 nodes, 10^6 edges and 64
channels, 6x faster than PyG's gather/scatter message passing at one thread, 22x at
two). Building it takes two sorts and index arithmetic whose shapes depend only on the
input shapes (repeated edges stay as adjacent CSR entries, which the product sums), so
there is no host synchronisation; ``cached=True`` builds the operator once for a fixed
graph. When ``edge_weight`` requires a gradient, it comes from one sampled dense-dense
product (SDDMM, ``torch.sparse.sampled_addmm``) per sparse product in the backward pass.
Each product is one ``propagate`` call, which runs the custom op
``torsion::csr_matmul``; the weights' gradient is the custom op ``torsion::csr_sddmm``;
each op's derivatives are these two ops again, to any order.

``torch.compile``. The layers compile into one graph (``fullgraph=True``): the operator
is built inside the graph, and the products call the custom ops on the CSR arrays
directly (a compiled graph cannot hold a sparse tensor, and ``propagate``'s sparse path
cannot be traced). The value checks of the inputs (edge indices in range, weights finite
and non-negative) run by default in eager mode on the CPU only; ``check=True`` runs them
everywhere, reading values back to the host (a device sync, and a graph break when
compiled): it is for debugging.

Manifold constraints. The filters with per-channel coefficients, :class:`JacobiConv` and
:class:`OptBasisConv`, take ``weight_manifold="stiefel"``: they then filter along the
columns of a learned orthogonal ``C x C`` channel frame ``Q`` (a
:class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel`, trained by
:mod:`torsion.optim`), ``out = filter(x Q) Q^T``. :class:`GPRConv`, :class:`BernConv` and
:class:`ChebIIConv` share one set of coefficients across all channels, so they commute
with every channel mixing (``g(S) x Q Q^T = g(S) x``): an orthogonal frame would cancel
and they do not take the option.

PyG's :class:`torch_geometric.nn.conv.ChebConv` already implements the classic Chebyshev
filter with one weight matrix per order; it is not duplicated here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import geoopt
import torch
from torch import Tensor
from torch.nn import Parameter
from torch_geometric.nn import MessagePassing

from torsion.manifolds import Stiefel, check_weight_manifold
from torsion.spectral._eigensolvers import csr_tensor, row_pointers
from torsion.spectral._polynomials import (
    Recurrence,
    bernstein_to_chebyshev,
    chebyshev_interpolation_matrix,
    chebyshev_recurrence,
    jacobi_recurrence,
    monomial_recurrence,
    recurrence_filter,
)

__all__ = ["BernConv", "ChebIIConv", "GPRConv", "JacobiConv", "OptBasisConv"]


def _check_degree(name: str, K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{name} expects an integer polynomial degree K, got {type(K).__name__}")
    if K < 0:
        raise ValueError(f"{name} expects a polynomial degree K >= 0, got K={K}")
    return K


def _check_channels(name: str, channels: int) -> int:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name} expects a positive integer number of channels, got {channels!r}")
    return channels


def _check_channels_match(name: str, channels: int, x: Tensor) -> None:
    if x.size(-1) != channels:
        raise ValueError(
            f"{name} was built for {channels} channels, got x with {x.size(-1)} "
            f"(shape {tuple(x.shape)})"
        )


def _check_graph(
    name: str, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None, check: bool | None
) -> None:
    """Shape and dtype checks (free), then value checks: edge indices in range, weights
    finite and non-negative. ``check=None`` runs the value checks in eager mode on the CPU,
    where they cost a pass over the edges and no device synchronisation (without them an
    out-of-range edge fails inside torch with "index out of range in self"), and skips
    them under ``torch.compile`` and on other devices; ``True`` always runs them (host
    syncs), ``False`` never."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
        raise ValueError(
            f"{name} expects node features x of shape (num_nodes, channels) with a floating "
            f"dtype, got {_describe(x)}"
        )
    if (
        not isinstance(edge_index, Tensor)
        or edge_index.dtype not in (torch.int64, torch.int32)
        or edge_index.dim() != 2
        or edge_index.size(0) != 2
    ):
        raise ValueError(
            f"{name} expects edge_index of shape (2, num_edges) with an integer dtype, got "
            f"{_describe(edge_index)}"
        )
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name}: sparse products on the CPU need float32 or float64 node features, got "
            f"{x.dtype} (torch has no half-precision CSR product there)"
        )
    if edge_index.device != x.device:
        raise ValueError(f"{name}: edge_index is on {edge_index.device} but x on {x.device}")
    if edge_weight is not None:
        if (
            not isinstance(edge_weight, Tensor)
            or not edge_weight.dtype.is_floating_point
            or edge_weight.shape != (edge_index.size(1),)
        ):
            raise ValueError(
                f"{name} expects edge_weight of shape ({edge_index.size(1)},) (one per edge) "
                f"with a floating dtype, got {_describe(edge_weight)}"
            )
    if check is None:
        check = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if not check:
        return
    n = x.size(0)
    if edge_index.numel():
        low, high = (int(v) for v in torch.aminmax(edge_index))
        if low < 0 or high >= n:
            raise ValueError(
                f"{name}: edge_index holds node indices outside [0, {n}) (min {low}, max {high})"
            )
    if edge_weight is not None and edge_weight.numel():
        if not bool(torch.isfinite(edge_weight).all()):
            raise ValueError(f"{name}: edge_weight has non-finite entries (NaN or Inf)")
        if bool((edge_weight < 0).any()):
            raise ValueError(
                f"{name}: edge_weight has negative entries; the normalized operator's spectrum "
                "is then not confined to [-1, 1]"
            )


def _channel_frame(channels: int, weight_manifold: str | None) -> geoopt.ManifoldParameter | None:
    """The identity ``(channels, channels)`` frame on ``Stiefel``, or ``None`` without one."""
    if weight_manifold is None:
        return None
    return geoopt.ManifoldParameter(torch.eye(channels), manifold=Stiefel())


def _filter_in_frame(
    frame: Tensor | None, x: Tensor, filter_channels: Callable[[Tensor], Tensor]
) -> Tensor:
    """``filter_channels(x Q) Q^T`` for an orthogonal frame ``Q``; ``filter_channels(x)``
    without one. The per-channel filter then acts along the columns of ``Q``."""
    if frame is None:
        return filter_channels(x)
    q = frame.to(x.dtype)  # the layer follows its input's dtype
    return filter_channels(x @ q) @ q.mT


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _normalized_edges(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    n: int,
    add_self_loops: bool,
    dtype: torch.dtype,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The edges of ``scale * D^{-1/2} A D^{-1/2}``: ``(index, weight)``.

    ``A`` sums the weights (default 1) of all edges ``source -> target``, self-loops and
    repeated edges included; with ``add_self_loops``, every node without a self-loop gets a
    unit one. Degrees are summed at the target; isolated nodes get zero rows (as PyG's
    ``gcn_norm``). Every shape depends only on the input shapes (``E`` edges in, ``E + n``
    out with ``add_self_loops``, where a node that has a loop gets a second one of weight
    0), so there is no host synchronisation and ``torch.compile`` traces it.
    """
    edge_index = edge_index.long()  # int32 keys row * n + col would overflow past n = 46341
    if edge_weight is None:
        weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    else:
        weight = edge_weight.to(dtype)
    if add_self_loops:
        is_loop = (edge_index[0] == edge_index[1]).to(dtype)
        loops = torch.zeros(n, dtype=dtype, device=edge_index.device).index_add(
            0, edge_index[0], is_loop
        )
        nodes = torch.arange(n, dtype=edge_index.dtype, device=edge_index.device)
        edge_index = torch.cat([edge_index, nodes.expand(2, n)], dim=1)
        weight = torch.cat([weight, (loops == 0).to(dtype)])
    src, dst = edge_index[0], edge_index[1]
    degree = torch.zeros(n, dtype=dtype, device=weight.device).index_add(0, dst, weight)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(torch.finfo(dtype).tiny).rsqrt(), 0.0)
    return edge_index, scale * inv_sqrt[src] * weight * inv_sqrt[dst]


def _csr_order(rows: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(crow, order)``: the row pointers of an ``n x n`` CSR matrix with entries at
    ``(rows, cols)``, and the permutation that sorts the entries by row, then column.
    Duplicates stay as adjacent entries, which a product sums."""
    return row_pointers(rows, n), torch.argsort(rows * n + cols)


@dataclass(frozen=True)
class _Operator:
    """The normalized operator ``S`` as CSR arrays, in both orientations.

    ``crow, col``: the pattern of ``S`` (row = target node); ``crow_t, col_t``: that of
    ``S^T``; entry ``k`` of ``S^T`` is entry ``to_t[k]`` of ``S`` and entry ``k`` of ``S``
    is entry ``from_t[k]`` of ``S^T``; ``values``: the entries of ``S``, in its order.
    """

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    to_t: Tensor
    from_t: Tensor
    values: Tensor

    @classmethod
    def from_edges(cls, index: Tensor, weight: Tensor, n: int) -> _Operator:
        """``S[dst, src] = weight`` for the edges ``index = (src, dst)``. Built by two sorts
        and index arithmetic whose shapes depend only on the input shapes: no host
        synchronisation, and ``torch.compile`` traces it."""
        src, dst = index[0], index[1]
        crow, order = _csr_order(dst, src, n)
        crow_t, order_t = _csr_order(src, dst, n)
        entries = torch.arange(src.numel(), device=src.device)
        position = torch.empty_like(entries).scatter_(0, order, entries)  # edge -> entry of S
        position_t = torch.empty_like(entries).scatter_(0, order_t, entries)
        return cls(
            crow=crow,
            col=src[order],
            crow_t=crow_t,
            col_t=dst[order_t],
            to_t=position[order_t],
            from_t=position_t[order],
            values=weight[order],
        )

    @property
    def pattern(self) -> tuple[Tensor, ...]:
        return (self.crow, self.col, self.crow_t, self.col_t, self.to_t, self.from_t)


# Two custom ops on CSR arrays close under differentiation: the product ``S x`` and the
# sampled dense-dense product (SDDMM) ``<a[row_e], b[col_e]>`` over the entries ``e`` of
# ``S``. Each one's derivatives are the other op or itself on the same pattern (the
# transpose's values are ``values[to_t]``), so every order of derivative is these ops.
# They take plain arrays: a compiled graph cannot hold a sparse tensor, and to
# ``torch.compile`` a custom op is one opaque call.


@torch.library.custom_op("torsion::csr_matmul", mutates_args=())
def csr_matmul(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    to_t: Tensor,
    from_t: Tensor,
    values: Tensor,
    x: Tensor,
) -> Tensor:
    """``S @ x`` for the square CSR matrix ``S`` of pattern ``(crow, col)`` and entries
    ``values``; ``(crow_t, col_t, to_t, from_t)`` describe ``S^T`` (:class:`_Operator`),
    which the backward multiplies by. Differentiable in ``values`` and ``x``."""
    return csr_tensor(crow, col, values, crow.numel() - 1) @ x


@torch.library.custom_op("torsion::csr_sddmm", mutates_args=())
def csr_sddmm(
    crow: Tensor,
    col: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    to_t: Tensor,
    from_t: Tensor,
    a: Tensor,
    b: Tensor,
) -> Tensor:
    """``<a[row_e], b[col_e]>`` for every entry ``e`` of the pattern ``(crow, col)``, in its
    order: the gradient of ``S @ b`` with respect to ``S``'s values, given ``a``."""
    if col.numel() == 0:
        return a.new_zeros(0)
    pattern = csr_tensor(crow, col, a.new_zeros(col.shape), (crow.numel() - 1, b.shape[0]))
    return torch.sparse.sampled_addmm(pattern, a, b.mT, beta=0.0).values()


@csr_matmul.register_fake
def _csr_matmul_fake(crow, col, crow_t, col_t, to_t, from_t, values, x):
    return x.new_empty((crow.shape[0] - 1, *x.shape[1:]))


@csr_sddmm.register_fake
def _csr_sddmm_fake(crow, col, crow_t, col_t, to_t, from_t, a, b):
    return a.new_empty(col.shape)


def _save_all(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _transposed(pattern: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The pattern of ``S^T``; the entries of ``S^T`` are ``values[to_t]``."""
    crow, col, crow_t, col_t, to_t, from_t = pattern
    return crow_t, col_t, crow, col, from_t, to_t


_TO_T = 4  # position of ``to_t`` in a pattern


def _csr_matmul_backward(ctx, grad):
    *pattern, values, x = ctx.saved_tensors
    grad_values = grad_x = None
    if ctx.needs_input_grad[6]:
        grad_values = csr_sddmm(*pattern, grad, x)
    if ctx.needs_input_grad[7]:
        grad_x = csr_matmul(*_transposed(pattern), values[pattern[_TO_T]], grad)
    return (None,) * 6 + (grad_values, grad_x)


def _csr_sddmm_backward(ctx, grad):
    *pattern, a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[6]:
        grad_a = csr_matmul(*pattern, grad, b)
    if ctx.needs_input_grad[7]:
        grad_b = csr_matmul(*_transposed(pattern), grad[pattern[_TO_T]], a)
    return (None,) * 6 + (grad_a, grad_b)


csr_matmul.register_autograd(_csr_matmul_backward, setup_context=_save_all)
csr_sddmm.register_autograd(_csr_sddmm_backward, setup_context=_save_all)


class _PolynomialFilter(MessagePassing, abc.ABC):
    """Shared plumbing: input checks, the normalized operator, one ``propagate`` per product.

    Subclasses implement :meth:`_filter`, which receives ``apply`` (``h -> S h``, one
    ``propagate`` call) and must call it exactly ``K`` times.
    """

    # Propagate with a multiple of Â. BernNet and ChebNetII use -Â = L - I; they run the
    # Chebyshev recurrence in 2(L - I), which saves one elementwise pass per product.
    _operator_scale: float = 1.0

    def __init__(self, K: int, *, add_self_loops: bool, cached: bool, check: bool | None) -> None:
        super().__init__(aggr="add")
        self.K = _check_degree(type(self).__name__, K)
        self.add_self_loops = bool(add_self_loops)
        self.cached = bool(cached)
        self.check = None if check is None else bool(check)
        self._cached_operator: _Operator | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._cached_operator = None

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        batch: Tensor | None = None,
    ) -> Tensor:
        """Filter the node signal ``x`` on the graph ``edge_index``.

        Args:
            x: node features.
            edge_index: edges ``source -> target``, both directions for an undirected graph.
            edge_weight: optional nonnegative edge weights (default 1).
            batch: the graph of each node in a PyG ``Batch``. Only filters that take
                inner products over the nodes (``OptBasisConv(basis="optimal")``) need
                it, to keep them within each graph; the others are graph-local anyway.

        Shapes:
            ``x``: ``(N, C)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``;
            ``batch``: ``(N,)``; output: ``(N, C)``.
        """
        _check_graph(type(self).__name__, x, edge_index, edge_weight, self.check)
        if batch is not None and (
            not isinstance(batch, Tensor)
            or batch.dtype not in (torch.int64, torch.int32)
            or batch.shape != (x.size(0),)
            or batch.device != x.device
        ):
            raise ValueError(
                f"{type(self).__name__}: batch must be an integer tensor of shape "
                f"({x.size(0)},) on {x.device}"
            )
        op = self._operator(x, edge_index, edge_weight)
        compiling = torch.compiler.is_compiling()

        def apply(h: Tensor) -> Tensor:
            if compiling:  # a sparse tensor cannot enter the graph: the op on the arrays
                return csr_matmul(*op.pattern, op.values, h)
            matrix = csr_tensor(op.crow, op.col, op.values.detach(), x.size(0))
            return self.propagate(matrix, x=h, operator=op)

        return self._filter(x, apply, batch)

    def message_and_aggregate(self, adj_t: Tensor, x: Tensor, operator: _Operator) -> Tensor:
        """``S x``; ``adj_t`` is ``S`` as a sparse tensor for PyG's bookkeeping, the product
        runs on ``operator``'s arrays (differentiable in the values)."""
        return csr_matmul(*operator.pattern, operator.values, x)

    def _operator(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> _Operator:
        """The normalized operator ``_operator_scale * Â``, built without host
        synchronisation (``torch.compile`` traces it). ``cached=True`` keeps it, unless its
        values need a gradient (they then belong to this call's graph); a compiled call
        reads the cache but does not fill it. The cache is of one dtype and device: an input
        of another (after ``.double()`` or ``.to(device)``, which do not see a plain
        attribute) rebuilds it. It is reused for any graph of its number of nodes, as
        PyG's cached layers do; one of another number raises (it failed inside the
        product, with an error that did not name the cache)."""
        cached = self._cached_operator
        n = x.size(0)
        if cached is not None:
            cached_nodes = cached.crow.numel() - 1
            if cached_nodes != n:
                raise ValueError(
                    f"{type(self).__name__}: cached=True keeps the operator of the graph of "
                    f"the first call ({cached_nodes} nodes), but x has {n} rows; cached=True "
                    "is for one fixed graph (transductive use), pass cached=False for others"
                )
            if (cached.values.dtype, cached.values.device) == (x.dtype, x.device):
                return cached
        index, weight = _normalized_edges(
            edge_index, edge_weight, n, self.add_self_loops, x.dtype, self._operator_scale
        )
        op = _Operator.from_edges(index, weight, n)
        if self.cached and not weight.requires_grad and not torch.compiler.is_compiling():
            self._cached_operator = op
        return op

    @abc.abstractmethod
    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        """The filtered signal, with exactly ``K`` calls of ``apply``."""

    def extra_repr(self) -> str:
        return f"K={self.K}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class GPRConv(_PolynomialFilter):
    """Generalized PageRank propagation (GPR-GNN): ``sum_k gamma_k Ã^k x``.

    ``Ã`` is the GCN operator ``D̃^{-1/2} (A + I) D̃^{-1/2}`` (``add_self_loops=True``, as in
    the paper), and the ``K + 1`` weights ``gamma`` are learned, one set shared by all
    channels. They start at the personalized-PageRank weights ``alpha (1 - alpha)^k``, with
    ``(1 - alpha)^K`` for the last, so an untrained layer is APPNP truncated at ``K`` hops.
    Spectral response: ``g(mu) = sum_k gamma_k mu^k`` on the eigenvalues ``mu`` of ``Ã``.
    Cost: ``K`` sparse products (monomial recurrence).

    Reference: E. Chien, J. Peng, P. Li, O. Milenkovic, "Adaptive Universal Generalized
    PageRank Graph Neural Network", ICLR 2021.

    Args:
        K: polynomial degree (number of hops), ``>= 0``. Default 10.
        alpha: teleport probability of the PageRank initialisation, in ``(0, 1]``.
            Default 0.1.
        add_self_loops: use ``A + I`` (default ``True``).
        cached: keep the normalized operator of the first call (transductive use only:
            later calls reuse it whatever their graph, and raise on another node count).
        check: validate edge indices and weights: ``None`` (default) in eager mode on
            the CPU (no device sync there), ``True`` on every call (host syncs), ``False``
            never.

    Shapes:
        ``x``: ``(N, C)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``; output
        ``(N, C)``.

    Example:
        >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> conv = GPRConv(K=2, alpha=1.0)  # gamma = (1, 0, 0): the identity
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(conv(x, edge_index), x)
        True
    """

    def __init__(
        self,
        K: int = 10,
        alpha: float = 0.1,
        *,
        add_self_loops: bool = True,
        cached: bool = False,
        check: bool | None = None,
    ) -> None:
        super().__init__(K, add_self_loops=add_self_loops, cached=cached, check=check)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"GPRConv expects alpha in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.gamma = Parameter(torch.empty(self.K + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        k = torch.arange(self.K + 1, dtype=torch.float64)
        ppr = self.alpha * (1.0 - self.alpha) ** k
        ppr[-1] = (1.0 - self.alpha) ** self.K
        with torch.no_grad():
            self.gamma.copy_(ppr)

    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        coeffs = self.gamma.to(x.dtype)  # the layer follows its input's dtype
        return recurrence_filter(apply, x, coeffs, monomial_recurrence(self.K))

    def extra_repr(self) -> str:
        return f"K={self.K}, alpha={self.alpha}"


class BernConv(_PolynomialFilter):
    """BernNet: a nonnegative Bernstein polynomial of the normalized Laplacian.

    ``g(L) x = sum_k relu(theta_k) binom(K, k) / 2^K (2I - L)^(K - k) L^k x`` with
    ``L = I - Â`` (spectrum in ``[0, 2]``). Nonnegative Bernstein coefficients give a
    nonnegative response ``g(lambda) >= 0`` on ``[0, 2]``, as in the paper; the
    coefficients start at 1, whose response is the constant 1 (the identity filter).

    Evaluation: the Bernstein coefficients are mapped to Chebyshev coefficients in
    ``t = lambda - 1`` by a fixed ``(K + 1) x (K + 1)`` matrix, then the Chebyshev
    recurrence on ``L - I = -Â`` runs with exactly ``K`` sparse products. BernNet's
    reference code computes each ``(2I - L)^(K - k) L^k x`` from powers and spends
    ``K (K + 3) / 2`` products (65 at ``K = 10``).

    Reference: M. He, Z. Wei, Z. Huang, H. Xu, "BernNet: Learning Arbitrary Graph Spectral
    Filters via Bernstein Approximation", NeurIPS 2021.

    Args:
        K: polynomial degree, ``>= 0``. Default 10.
        add_self_loops: build ``L`` from ``A + I`` (default ``False``, as in the paper).
        cached: keep the normalized operator of the first call (transductive use only:
            later calls reuse it whatever their graph, and raise on another node count).
        check: validate edge indices and weights: ``None`` (default) in eager mode on
            the CPU (no device sync there), ``True`` on every call (host syncs), ``False``
            never.

    Shapes:
        ``x``: ``(N, C)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``; output
        ``(N, C)``.

    Example:
        >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> # Bernstein polynomials sum to one: unit coefficients give the identity.
        >>> torch.allclose(BernConv(K=5)(x, edge_index), x)
        True
    """

    _operator_scale = -2.0  # 2 (L - I)

    def __init__(
        self,
        K: int = 10,
        *,
        add_self_loops: bool = False,
        cached: bool = False,
        check: bool | None = None,
    ) -> None:
        super().__init__(K, add_self_loops=add_self_loops, cached=cached, check=check)
        self.theta = Parameter(torch.empty(self.K + 1))
        self.register_buffer("to_chebyshev", bernstein_to_chebyshev(self.K), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.theta.fill_(1.0)

    def chebyshev_coefficients(self) -> Tensor:
        """Chebyshev coefficients in ``t = lambda - 1`` (float64), shape ``(K + 1,)``."""
        return self.to_chebyshev.to(torch.float64) @ torch.relu(self.theta).to(torch.float64)

    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        coeffs = self.chebyshev_coefficients().to(x.dtype)
        return recurrence_filter(apply, x, coeffs, chebyshev_recurrence(self.K, doubled=True))


class ChebIIConv(_PolynomialFilter):
    """ChebNetII: Chebyshev interpolation of learned values at Chebyshev nodes.

    The ``K + 1`` parameters ``gamma_j`` are the filter's values at the Chebyshev nodes
    ``x_j = cos((K - j + 1/2) pi / (K + 1))`` (ascending) of ``t = lambda - 1``, with
    ``lambda`` the eigenvalues of ``L = I - Â``. The response is the degree-``K``
    interpolant of ``(x_j, relu(gamma_j))``:

        ``g(t) = 2 / (K + 1) sum_k' sum_j relu(gamma_j) T_k(x_j) T_k(t)``

    (the ``k = 0`` term halved), evaluated by the Chebyshev recurrence on ``L - I = -Â``
    with exactly ``K`` sparse products. As in the reference code, the values pass through
    a ReLU and start at 1 (the identity filter).

    Reference: M. He, Z. Wei, J.-R. Wen, "Convolutional Neural Networks on Graphs with
    Chebyshev Approximation, Revisited", NeurIPS 2022.

    Args:
        K: polynomial degree, ``>= 0``. Default 10.
        add_self_loops: build ``L`` from ``A + I`` (default ``False``, as in the paper).
        cached: keep the normalized operator of the first call (transductive use only:
            later calls reuse it whatever their graph, and raise on another node count).
        check: validate edge indices and weights: ``None`` (default) in eager mode on
            the CPU (no device sync there), ``True`` on every call (host syncs), ``False``
            never.

    Shapes:
        ``x``: ``(N, C)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``; output
        ``(N, C)``.

    Example:
        >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> torch.allclose(ChebIIConv(K=4)(x, edge_index), x)  # all values 1: identity
        True
    """

    _operator_scale = -2.0  # 2 (L - I)

    def __init__(
        self,
        K: int = 10,
        *,
        add_self_loops: bool = False,
        cached: bool = False,
        check: bool | None = None,
    ) -> None:
        super().__init__(K, add_self_loops=add_self_loops, cached=cached, check=check)
        self.gamma = Parameter(torch.empty(self.K + 1))
        self.register_buffer(
            "interpolation", chebyshev_interpolation_matrix(self.K), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.gamma.fill_(1.0)

    def chebyshev_coefficients(self) -> Tensor:
        """Chebyshev coefficients in ``t = lambda - 1`` (float64), shape ``(K + 1,)``."""
        return self.interpolation.to(torch.float64) @ torch.relu(self.gamma).to(torch.float64)

    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        coeffs = self.chebyshev_coefficients().to(x.dtype)
        return recurrence_filter(apply, x, coeffs, chebyshev_recurrence(self.K, doubled=True))


class JacobiConv(_PolynomialFilter):
    """JacobiConv: a per-channel polynomial in the Jacobi basis ``P_k^{(a, b)}`` of ``Â``.

    ``out[:, c] = sum_k w_{k, c} (prod_{i < k} s_i) P_k^{(a, b)}(Â) x[:, c]`` with one
    coefficient per order and channel (``w``, starting at 1) and the paper's polynomial
    coefficient decomposition ``s_i = alpha * tanh(eta_i)`` shared by all channels
    (``eta`` starts at ``min(1 / alpha, 1)``, as in the reference code). ``Â`` has its
    spectrum in ``[-1, 1]``, the Jacobi polynomials' interval. The Jacobi three-term
    recurrence runs with exactly ``K`` sparse products.

    Reference: X. Wang, M. Zhang, "How Powerful are Spectral Graph Neural Networks",
    ICML 2022.

    With ``weight_manifold="stiefel"`` the per-channel polynomials act along the columns
    ``q_c`` of a learned orthogonal channel frame ``Q`` (:attr:`channel_frame`, a
    :class:`geoopt.ManifoldParameter` on :class:`torsion.manifolds.Stiefel`, initialised to
    the identity so an untrained layer equals the unconstrained one):
    ``out = sum_k P_k(Â) x Q diag(c_k) Q^T``, with ``c_k`` the coefficients of order ``k``.
    Each order then mixes the channels by the symmetric matrix ``Q diag(c_k) Q^T``, all of
    them sharing the eigenbasis ``Q``: a multichannel filter with ``C (C - 1) / 2`` more
    degrees of freedom that stays a polynomial of ``Â`` in every direction ``q_c``. Train
    ``Q`` with :mod:`torsion.optim`'s Riemannian optimizers (a Euclidean step leaves the
    manifold). While all channels have the same coefficients (as at initialisation) the
    output does not depend on ``Q``, and neither does the loss.

    Args:
        channels: number of feature channels ``C``.
        K: polynomial degree, ``>= 0``. Default 10.
        a, b: Jacobi parameters, both ``> -1``. Default 1.0 and 1.0.
        alpha: scale of the coefficient decomposition, ``> 0``. Default 1.0.
        add_self_loops: use ``A + I`` (default ``False``, as in the paper).
        cached: keep the normalized operator of the first call (transductive use only:
            later calls reuse it whatever their graph, and raise on another node count).
        check: validate edge indices and weights: ``None`` (default) in eager mode on
            the CPU (no device sync there), ``True`` on every call (host syncs), ``False``
            never.
        weight_manifold: ``None`` (default: no channel frame, the paper's layer) or
            ``"stiefel"`` (an orthogonal channel frame, see above).

    Raises:
        ValueError: for a ``weight_manifold`` other than ``None`` or ``"stiefel"``.

    Shapes:
        ``x``: ``(N, channels)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``;
        output ``(N, channels)``.
    """

    def __init__(
        self,
        channels: int,
        K: int = 10,
        a: float = 1.0,
        b: float = 1.0,
        alpha: float = 1.0,
        *,
        add_self_loops: bool = False,
        cached: bool = False,
        check: bool | None = None,
        weight_manifold: str | None = None,
    ) -> None:
        super().__init__(K, add_self_loops=add_self_loops, cached=cached, check=check)
        self.channels = _check_channels("JacobiConv", channels)
        self._recurrence = jacobi_recurrence(self.K, float(a), float(b))
        if not alpha > 0.0:
            raise ValueError(f"JacobiConv expects alpha > 0, got {alpha}")
        #: ``None`` or ``"stiefel"``: the constraint on the channel frame.
        self.weight_manifold = check_weight_manifold(weight_manifold, "JacobiConv")
        self.a, self.b, self.alpha = float(a), float(b), float(alpha)
        self.weight = Parameter(torch.empty(self.K + 1, self.channels))
        self.eta = Parameter(torch.empty(self.K))
        #: The orthogonal ``(C, C)`` channel frame ``Q`` (``None`` without a weight manifold).
        self.channel_frame = _channel_frame(self.channels, weight_manifold)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.eta.fill_(min(1.0 / self.alpha, 1.0))
            if self.channel_frame is not None:
                self.channel_frame.copy_(torch.eye(self.channels))

    def coefficients(self) -> Tensor:
        """Coefficients of ``P_0`` to ``P_K`` per channel, shape ``(K + 1, channels)``."""
        scales = self.alpha * torch.tanh(self.eta)
        decay = torch.cat([scales.new_ones(1), torch.cumprod(scales, dim=0)])
        return self.weight * decay.unsqueeze(-1)

    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        _check_channels_match(type(self).__name__, self.channels, x)
        coeffs = self.coefficients().to(x.dtype)
        return _filter_in_frame(
            self.channel_frame, x, lambda h: recurrence_filter(apply, h, coeffs, self._recurrence)
        )

    def extra_repr(self) -> str:
        manifold = "" if self.weight_manifold is None else f", on {self.weight_manifold}"
        return f"{self.channels}, K={self.K}, a={self.a}, b={self.b}{manifold}"


class OptBasisConv(_PolynomialFilter):
    """A per-channel orthonormal polynomial basis built by a three-term recurrence.

    ``out[:, c] = sum_k w_{k, c} p_{k, c}(Â) x[:, c]``, where for each channel the
    polynomials ``p_{0, c} .. p_{K, c}`` are orthonormal and satisfy a three-term
    recurrence. Two ways to choose them (Guo & Wei):

    * ``basis="optimal"`` (OptBasisGNN): the basis orthonormal for the signal's own
      spectral measure, ``sum_i (u_i^T x_c)^2 delta(mu_i) / ||x_c||^2``, obtained by the
      Lanczos process ``v_0 = x_c / ||x_c||``, ``v_{k+1} ∝ Â v_k - <Â v_k, v_k> v_k -
      <., v_{k-1}> v_{k-1}``. The vectors ``v_k = p_k(Â) v_0`` are orthonormal, which is
      what makes this basis optimal for gradient descent on ``w``. As in the paper the
      output is scale-invariant in each channel (it filters ``x_c / ||x_c||``). If the
      Krylov space of a channel is exhausted before degree ``K`` (a new vector of norm
      below ``sqrt(eps)``), the remaining basis vectors are zero.
    * ``basis="favard"`` (FavardGNN): a learned recurrence ``sqrt(beta_{k+1}) p_{k+1} =
      (t - gamma_k) p_k - sqrt(beta_k) p_{k-1}``, ``p_0 = 1 / sqrt(beta_0)``, with
      ``sqrt(beta) >= 0.01`` (clamped) and free ``gamma``, per channel. By Favard's
      theorem every such recurrence is orthonormal for some measure. Initialised to
      ``sqrt(beta) = 1``, ``gamma = 0``.

    In both cases ``w`` starts at ``(1, 0, ..., 0)`` and a forward pass costs exactly ``K``
    sparse products.

    With ``weight_manifold="stiefel"`` (an orthonormal channel mixing) the per-channel
    bases and weights act along the columns ``q_c`` of a learned orthogonal channel frame
    ``Q`` (:attr:`channel_frame`, a :class:`geoopt.ManifoldParameter` on
    :class:`torsion.manifolds.Stiefel`, initialised to the identity so an untrained layer
    equals the unconstrained one): ``out = filter(x Q) Q^T``. Channel ``c`` of ``x Q`` is
    the signal's component along ``q_c``, and its filtered version goes back along
    ``q_c``; since ``Q`` is orthogonal, nothing of ``x`` is lost or amplified by the
    mixing itself. With ``basis="optimal"`` the Lanczos basis of each direction ``q_c``
    adapts to ``x q_c``, so ``Q`` chooses which channel combinations get their own
    optimal basis. Train ``Q`` with :mod:`torsion.optim`'s Riemannian optimizers (a
    Euclidean step leaves the manifold).

    Reference: Y. Guo, Z. Wei, "Graph Neural Networks with Learnable and Optimal
    Polynomial Bases", ICML 2023.

    Args:
        channels: number of feature channels ``C``.
        K: polynomial degree, ``>= 0``. Default 10.
        basis: ``"optimal"`` (default) or ``"favard"``.
        add_self_loops: use ``A + I`` (default ``False``, as in the paper).
        cached: keep the normalized operator of the first call (transductive use only:
            later calls reuse it whatever their graph, and raise on another node count).
        check: validate edge indices and weights: ``None`` (default) in eager mode on
            the CPU (no device sync there), ``True`` on every call (host syncs), ``False``
            never.
        weight_manifold: ``None`` (default: no channel frame, the paper's layer) or
            ``"stiefel"`` (an orthogonal channel frame, see above).

    Raises:
        ValueError: for an unknown ``basis``, or a ``weight_manifold`` other than ``None``
            or ``"stiefel"``.

    Shapes:
        ``x``: ``(N, channels)``; ``edge_index``: ``(2, E)``; ``edge_weight``: ``(E,)``;
        output ``(N, channels)``.

    Example:
        >>> conv = OptBasisConv(4, K=3, weight_manifold="stiefel")
        >>> type(conv.channel_frame).__name__, tuple(conv.channel_frame.shape)
        ('ManifoldParameter', (4, 4))
        >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
        >>> conv(torch.randn(3, 4), edge_index).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        channels: int,
        K: int = 10,
        basis: Literal["optimal", "favard"] = "optimal",
        *,
        add_self_loops: bool = False,
        cached: bool = False,
        check: bool | None = None,
        weight_manifold: str | None = None,
    ) -> None:
        super().__init__(K, add_self_loops=add_self_loops, cached=cached, check=check)
        self.channels = _check_channels("OptBasisConv", channels)
        if basis not in ("optimal", "favard"):
            raise ValueError(f"OptBasisConv basis must be 'optimal' or 'favard', got {basis!r}")
        #: ``None`` or ``"stiefel"``: the constraint on the channel frame.
        self.weight_manifold = check_weight_manifold(weight_manifold, "OptBasisConv")
        self.basis = basis
        self.weight = Parameter(torch.empty(self.K + 1, self.channels))
        if basis == "favard":
            self.sqrt_beta = Parameter(torch.empty(self.K + 1, self.channels))
            self.gamma = Parameter(torch.empty(self.K, self.channels))
        #: The orthogonal ``(C, C)`` channel frame ``Q`` (``None`` without a weight manifold).
        self.channel_frame = _channel_frame(self.channels, weight_manifold)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.zero_()
            self.weight[0] = 1.0
            if self.basis == "favard":
                self.sqrt_beta.fill_(1.0)
                self.gamma.zero_()
            if self.channel_frame is not None:
                self.channel_frame.copy_(torch.eye(self.channels))

    def favard_recurrence(self, dtype: torch.dtype) -> tuple[Tensor, Recurrence]:
        """``(1 / sqrt(beta_0), recurrence)`` of the learned FavardGNN basis, per channel."""
        sb = self.sqrt_beta.clamp_min(1e-2).to(dtype)
        gamma = self.gamma.to(dtype)
        alpha = [1.0 / sb[k + 1] for k in range(self.K)]
        beta = [-gamma[k] / sb[k + 1] for k in range(self.K)]
        prev = [sb[k] / sb[k + 1] for k in range(self.K)]
        return 1.0 / sb[0], Recurrence(alpha, beta, prev)

    def _filter(self, x: Tensor, apply, batch: Tensor | None) -> Tensor:
        _check_channels_match(type(self).__name__, self.channels, x)
        weight = self.weight.to(x.dtype)
        if self.basis == "favard":
            scale, rec = self.favard_recurrence(x.dtype)

            def filter_channels(h: Tensor) -> Tensor:
                return recurrence_filter(apply, h, weight, rec, first=h * scale)
        else:

            def filter_channels(h: Tensor) -> Tensor:
                return _lanczos_filter(apply, h, weight, self.K, batch)

        return _filter_in_frame(self.channel_frame, x, filter_channels)

    def extra_repr(self) -> str:
        manifold = "" if self.weight_manifold is None else f", on {self.weight_manifold}"
        return f"{self.channels}, K={self.K}, basis={self.basis!r}{manifold}"


def _column_dot(a: Tensor, b: Tensor, batch: Tensor | None) -> Tensor:
    """``<a_c, b_c>`` per channel: ``(C,)``, or with ``batch`` per graph, ``(N, C)`` with
    every node holding its own graph's value (scattered into ``N`` rows, enough for any
    batch, so no host synchronisation is needed for the number of graphs)."""
    if batch is None:
        return torch.linalg.vecdot(a, b, dim=0)  # much faster than vector_norm(dim=0)
    return torch.zeros_like(a).index_add(0, batch, a * b)[batch]


def _largest_entry(a: Tensor, batch: Tensor | None) -> Tensor:
    """``max |a|`` over all channels: ``(1,)``, or with ``batch`` per graph, ``(N, 1)``
    laid out as :func:`_column_dot` (no host synchronisation)."""
    rows = a.abs().amax(dim=1, keepdim=True) if a.shape[1] > 0 else a.new_zeros(a.shape[0], 1)
    if batch is None:
        return rows.amax(dim=0) if a.shape[0] > 0 else a.new_zeros(1)
    return torch.zeros_like(rows).scatter_reduce(0, batch[:, None], rows, "amax")[batch]


def _normalize_columns(w: Tensor, batch: Tensor | None) -> Tensor:
    """Columns of ``w`` (per graph with ``batch``) scaled to unit norm; those below
    ``sqrt(eps)`` become zero.

    Neither the square root nor the division ever sees a dropped column's tiny norm (it
    is replaced by 1 there), so gradients stay finite as well.
    """
    squared = _column_dot(w, w, batch)
    keep = squared > torch.finfo(w.dtype).eps
    norm = torch.where(keep, squared, torch.ones_like(squared)).sqrt()
    return torch.where(keep, w / norm, 0.0)


def _lanczos_filter(apply, x: Tensor, weight: Tensor, K: int, batch: Tensor | None) -> Tensor:
    """OptBasisGNN: ``sum_k weight[k] * v_k`` over per-channel Lanczos vectors of ``x``
    (of each graph's part of ``x`` with ``batch``)."""
    # The first vector is ``x`` itself, of any scale: rescaled by its largest entry (per
    # graph) first, so that the threshold drops only the channels that are rounding noise
    # next to the others (the later vectors have norm ~1 already).
    scale = _largest_entry(x, batch)
    cur = _normalize_columns(x / torch.where(scale > 0, scale, 1.0), batch)
    out = weight[0] * cur
    prev = None
    for k in range(1, K + 1):
        w = apply(cur)
        w = torch.addcmul(w, _column_dot(w, cur, batch), cur, value=-1.0)
        if prev is not None:
            w = torch.addcmul(w, _column_dot(w, prev, batch), prev, value=-1.0)
        prev, cur = cur, _normalize_columns(w, batch)
        out = torch.addcmul(out, weight[k], cur)
    return out
