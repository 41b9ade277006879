"""Small graphs and their dense spectral data, built independently of torsion.spectral.

The oracles of the encoder and filter tests: edge lists of cycles, hypercubes, paths and
random graphs; their dense normalized adjacency ``D^{-1/2} A D^{-1/2}`` and Laplacian
``I - D^{-1/2} A D^{-1/2}``; and ``torch.linalg.eigh`` of those in float64.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

DTYPE = torch.float64


def undirected(pairs: list[tuple[int, int]]) -> Tensor:
    """``edge_index`` with both directions of every pair, shape ``(2, 2 * len(pairs))``."""
    if not pairs:
        return torch.empty(2, 0, dtype=torch.long)
    e = torch.tensor(pairs, dtype=torch.long).T
    return torch.cat([e, e.flip(0)], dim=1)


def cycle(n: int) -> Tensor:
    return undirected([(i, (i + 1) % n) for i in range(n)])


def path(n: int) -> Tensor:
    return undirected([(i, i + 1) for i in range(n - 1)])


def hypercube(d: int) -> Tensor:
    """The ``d``-cube: ``2^d`` nodes, edges between labels differing in one bit."""
    pairs = [(u, u ^ (1 << b)) for u in range(2**d) for b in range(d) if u < u ^ (1 << b)]
    return undirected(pairs)


def random_graph(n: int, p: float, generator: torch.Generator, *, connected: bool = True) -> Tensor:
    """Erdos-Renyi ``G(n, p)``, plus a path through all nodes when ``connected``."""
    pairs = {
        (i, j)
        for i, j in itertools.combinations(range(n), 2)
        if torch.rand((), generator=generator) < p
    }
    if connected:
        pairs |= {(i, i + 1) for i in range(n - 1)}
    return undirected(sorted(pairs))


def dense_adjacency(edge_index: Tensor, n: int, edge_weight: Tensor | None = None) -> Tensor:
    a = torch.zeros(n, n, dtype=DTYPE)
    w = torch.ones(edge_index.size(1), dtype=DTYPE) if edge_weight is None else edge_weight
    a.index_put_((edge_index[1], edge_index[0]), w.to(DTYPE), accumulate=True)
    return a


def normalized_adjacency(
    edge_index: Tensor, n: int, edge_weight: Tensor | None = None, *, self_loops: bool = False
) -> Tensor:
    """``D^{-1/2} A D^{-1/2}`` (isolated nodes: zero rows); ``A + I`` where no loop exists."""
    a = dense_adjacency(edge_index, n, edge_weight)
    if self_loops:
        missing = a.diagonal() == 0
        a = a + torch.diag(missing.to(DTYPE))
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), 0.0)
    return inv[:, None] * a * inv[None, :]


def normalized_laplacian(edge_index: Tensor, n: int) -> Tensor:
    return torch.eye(n, dtype=DTYPE) - normalized_adjacency(edge_index, n)


def eigenspaces(lam: Tensor, tol: float = 1e-8) -> list[list[int]]:
    """Indices of (ascending) ``lam`` grouped into runs of equal eigenvalues."""
    groups = [[0]]
    for i in range(1, lam.numel()):
        if lam[i] - lam[i - 1] <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def haar_orthogonal(d: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=DTYPE))
    return q * torch.diagonal(r).sign()


def rotate_eigenspaces(vecs: Tensor, lam: Tensor, generator: torch.Generator) -> Tensor:
    """``V Q`` with ``Q`` a random orthogonal matrix inside each eigenspace (block diagonal)."""
    out = vecs.clone()
    for group in eigenspaces(lam):
        q = haar_orthogonal(len(group), generator)
        out[:, group] = vecs[:, group] @ q
    return out
