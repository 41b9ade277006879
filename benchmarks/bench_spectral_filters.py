"""Polynomial spectral filters: torsion's degree-K layers vs PyG's GCNConv and ChebConv.

Every layer maps 64 node features to 64 on a random sparse graph (10^5 nodes, average
degree 10, about 10^6 directed edges); compared in one run, forward and forward+backward
of ``L = sum(layer(x) * G)`` (``G`` a fixed random matrix):

* torsion: ``Linear(64, 64)`` followed by ``BernConv``, ``ChebIIConv``, ``JacobiConv``,
  ``OptBasisConv`` (optimal and Favard bases) or ``GPRConv``, all of degree ``K = 10``,
  plus ``BernConv(cached=True)`` (the transductive setting: the sparse operator is built
  once) and ``BernConv`` with learned edge weights (weights that require a gradient,
  which then comes from one sampled dense-dense product per sparse product);
* PyG ``GCNConv(64, 64)`` (one hop) on ``edge_index`` and on a CSR ``adj_t``;
* PyG ``ChebConv(64, 64, K=11)`` (degree 10: one 64 x 64 weight per order);
* BernNet's reference propagation (He et al. 2021), transcribed: it recomputes powers of
  ``L`` and ``2I - L`` and spends ``K (K + 3) / 2`` products. It is timed with at most 3
  repeats, as it is slow.

Sparse products are counted with PyG's ``propagate`` forward pre-hooks during one forward
pass. Correctness before timing: ``BernConv`` against BernNet's reference with the same
coefficients, and ``ChebIIConv`` against PyG's ``ChebConv`` whose per-order weights are set
to the same Chebyshev coefficients times the identity.

Target (TARGETS.md section 5): every degree-K filter exactly K sparse products.

``--compile`` adds ``torch.compile`` (inductor, ``fullgraph=True``) rows: torsion's
``ChebIIConv`` and ``GPRConv`` layers and PyG's ``GCNConv``, each checked against its
eager layer; their product counts are the eager layers'.

    python benchmarks/bench_spectral_filters.py [--quick] [--compile] [--out DIR]
        [--repeats N] [--threads N]
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch_geometric.nn import ChebConv, GCNConv, MessagePassing
from torch_geometric.utils import add_self_loops, get_laplacian, to_torch_csr_tensor, to_undirected

from _harness import (
    check_close,
    compare_passes,
    environment_line,
    fmt_ms,
    fmt_ratio,
    parse_args,
    ratio,
    render_table,
    setup,
    write_results,
)
from torsion.spectral import BernConv, ChebIIConv, GPRConv, JacobiConv, OptBasisConv

SEED = 20240607
WIDTH = 64


# ---------------------------------------------------------------------------------------
# BernNet's reference propagation (the anchor for the cost of the Bernstein basis)
# ---------------------------------------------------------------------------------------


class BernNetReference(MessagePassing):
    """BernNet's published ``Bern_prop``: ``sum_k relu(theta_k) binom(K, k) / 2^K
    (2I - L)^(K - k) L^k x``, each term recomputed from powers (``K (K + 3) / 2`` products).
    """

    def __init__(self, K: int) -> None:
        super().__init__(aggr="add")
        self.K = K
        self.theta = nn.Parameter(torch.ones(K + 1))

    def message(self, x_j: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return norm.unsqueeze(-1) * x_j

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        theta, K, n = torch.relu(self.theta), self.K, x.size(0)
        lap_index, lap = get_laplacian(edge_index, normalization="sym", dtype=x.dtype, num_nodes=n)
        two_index, two = add_self_loops(lap_index, -lap, fill_value=2.0, num_nodes=n)
        powers = [x]  # (2I - L)^i x
        for _ in range(K):
            powers.append(self.propagate(two_index, x=powers[-1], norm=two))
        out = theta[0] / 2**K * powers[K]
        for i in range(K):
            h = powers[K - i - 1]
            for _ in range(i + 1):
                h = self.propagate(lap_index, x=h, norm=lap)
            out = out + math.comb(K, i + 1) / 2**K * theta[i + 1] * h
        return out


# ---------------------------------------------------------------------------------------
# Problem and layers
# ---------------------------------------------------------------------------------------


def random_graph(n: int, degree: int, gen: torch.Generator) -> torch.Tensor:
    """Undirected random graph with about ``n * degree`` directed edges, no self-loops."""
    pairs = torch.randint(0, n, (2, n * degree // 2), generator=gen)
    pairs = pairs[:, pairs[0] != pairs[1]]
    return to_undirected(pairs, num_nodes=n)


class Filtered(nn.Module):
    """``filter(Linear(x))``: a filter layer of the same width as a GCN layer.

    With ``edge_weights``, unit edge weights that require a gradient are passed (learned
    edge weights: the backward also computes their gradient).
    """

    def __init__(self, conv: MessagePassing, edge_weights: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.conv = conv
        self.edge_weights = edge_weights

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.edge_weights:
            ones = torch.ones(edge_index.size(1), device=x.device, requires_grad=True)
            return self.conv(self.lin(x), edge_index, ones)
        return self.conv(self.lin(x), edge_index)


def make_layers(K: int, gen: torch.Generator) -> dict[str, tuple[str, nn.Module]]:
    """``{name: (library, layer)}``; filter coefficients are random, not the identity."""
    layers = {
        "BernConv": ("torsion", Filtered(BernConv(K))),
        "BernConv cached": ("torsion", Filtered(BernConv(K, cached=True))),
        "BernConv learned weights": ("torsion", Filtered(BernConv(K), edge_weights=True)),
        "ChebIIConv": ("torsion", Filtered(ChebIIConv(K))),
        "JacobiConv": ("torsion", Filtered(JacobiConv(WIDTH, K))),
        "OptBasisConv": ("torsion", Filtered(OptBasisConv(WIDTH, K))),
        "OptBasisConv favard": ("torsion", Filtered(OptBasisConv(WIDTH, K, basis="favard"))),
        "GPRConv": ("torsion", Filtered(GPRConv(K))),
        "GCNConv": ("PyG", GCNConv(WIDTH, WIDTH)),
        "GCNConv adj_t": ("PyG", GCNConv(WIDTH, WIDTH)),
        f"ChebConv K={K + 1}": ("PyG", ChebConv(WIDTH, WIDTH, K + 1)),
        "BernNet reference": ("BernNet", Filtered(BernNetReference(K))),
    }
    with torch.no_grad():  # random nonnegative coefficients for the correctness checks
        layers["BernConv"][1].conv.theta.uniform_(0.0, 1.0, generator=gen)
        layers["ChebIIConv"][1].conv.gamma.uniform_(0.0, 1.0, generator=gen)
    return layers


def count_products(layer: nn.Module, x: torch.Tensor, graph: torch.Tensor) -> int:
    """``propagate`` calls of every message-passing module during one forward pass."""
    calls: list[int] = []
    hooks = [
        m.register_propagate_forward_pre_hook(lambda *_: calls.append(1))
        for m in layer.modules()
        if isinstance(m, MessagePassing)
    ]
    with torch.no_grad():
        layer(x, graph)
    for h in hooks:
        h.remove()
    return len(calls)


def check_anchors(layers, x: torch.Tensor, edge_index: torch.Tensor, K: int) -> dict[str, float]:
    """Correctness before timing; returns the worst scaled error of each check."""
    errors = {}
    bern, ref = layers["BernConv"][1], layers["BernNet reference"][1]
    with torch.no_grad():
        ref.lin.load_state_dict(bern.lin.state_dict())
        ref.conv.theta.copy_(bern.conv.theta)
        errors["BernConv vs BernNet reference"] = check_close(
            "BernConv vs BernNet reference",
            bern(x, edge_index),
            ref(x, edge_index),
            rtol=1e-4,
            atol=1e-4,
        )
        chebii = layers["ChebIIConv"][1]
        cheb = ChebConv(WIDTH, WIDTH, K + 1, bias=False).to(x.device)
        coeffs = chebii.conv.chebyshev_coefficients().to(x.dtype)
        for k, lin in enumerate(cheb.lins):
            lin.weight.copy_(coeffs[k] * torch.eye(WIDTH, dtype=x.dtype, device=x.device))
        h = chebii.lin(x)
        errors["ChebIIConv vs PyG ChebConv"] = check_close(
            "ChebIIConv vs PyG ChebConv",
            chebii.conv(h, edge_index),
            cheb(h, edge_index),
            rtol=1e-4,
            atol=1e-4,
        )
    return errors


def loss_fn(layer: nn.Module, graph, g: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(x: torch.Tensor) -> torch.Tensor:
        return (layer(x, graph) * g).sum()

    return loss


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


#: Layers also timed under ``torch.compile`` with ``--compile``.
COMPILED = ("ChebIIConv", "GPRConv", "GCNConv")


def add_compiled(layers, graphs, x: torch.Tensor) -> dict[str, float]:
    """Add ``"<name> compiled"`` layers (inductor, ``fullgraph=True``) for ``COMPILED``;
    returns each one's error against its eager layer, after compiling it."""
    errors = {}
    for name in COMPILED:
        library, layer = layers[name]
        compiled = torch.compile(layer, fullgraph=True)
        key = f"{name} compiled"
        layers[key], graphs[key] = (library, compiled), graphs[name]
        with torch.no_grad():
            errors[key] = check_close(
                key, compiled(x, graphs[name]), layer(x, graphs[name]), rtol=1e-4, atol=1e-4
            )
    return errors


def _compile_option(parser) -> None:
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")


def main() -> int:
    args = parse_args(__doc__, extra=_compile_option)
    env = setup(args)
    n, K = (2_000, 10) if args.quick else (100_000, 10)
    degree = 10
    print(environment_line(env), flush=True)
    gen = torch.Generator().manual_seed(SEED)
    edge_index = random_graph(n, degree, gen).to(args.device)
    with warnings.catch_warnings():  # torch flags CSR tensors as beta
        warnings.simplefilter("ignore", UserWarning)
        adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(n, n))
    x = torch.randn(n, WIDTH, generator=gen).to(args.device)
    g = torch.randn(n, WIDTH, generator=gen).to(args.device)
    layers = make_layers(K, gen)
    for _, layer in layers.values():
        layer.to(args.device)
    graphs = {name: adj_t if name == "GCNConv adj_t" else edge_index for name in layers}
    print(f"graph: {n} nodes, {edge_index.size(1)} directed edges, width {WIDTH}, K = {K}")

    errors = check_anchors(layers, x, edge_index, K)
    products = {name: count_products(layer, x, graphs[name]) for name, (_, layer) in layers.items()}
    if args.compile:
        errors.update(add_compiled(layers, graphs, x))
        products.update({f"{name} compiled": products[name] for name in COMPILED})
    for name, (library, _) in layers.items():
        if library == "torsion" and products[name] != K:
            raise RuntimeError(f"{name} spent {products[name]} sparse products, expected K = {K}")
    print("sparse products per forward: " + ", ".join(f"{k} {v}" for k, v in products.items()))

    fast = {name: loss_fn(layer, graphs[name], g) for name, (_, layer) in layers.items()}
    slow = {"BernNet reference": fast.pop("BernNet reference")}
    xr = x.clone().requires_grad_()
    timings = compare_passes(fast, [xr], warmup=args.warmup, repeats=args.repeats)
    slow_repeats = min(args.repeats, 2)
    timings.update(compare_passes(slow, [xr], warmup=0, repeats=slow_repeats))

    records = [
        {
            "layer": name,
            "library": library,
            "sparse_products": products[name],
            "timing": timings[name],
            "nodes": n,
            "edges": edge_index.size(1),
            "width": WIDTH,
            "K": K,
        }
        for name, (library, _) in layers.items()
    ]
    table = main_table(records, K, slow_repeats)
    print()
    print(table)
    print()
    print(environment_line(env))
    json_path, md_path = write_results(
        "spectral_filters", args, env, [*records, {"correctness": errors}], table
    )
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def main_table(records: list[dict], K: int, slow_repeats: int) -> str:
    by_name = {r["layer"]: r for r in records}
    gcn = by_name["GCNConv"]["timing"]
    cheb = by_name[f"ChebConv K={K + 1}"]["timing"]
    headers = [
        "layer",
        "library",
        "sparse products",
        "fwd ms",
        "fwd+bwd ms",
        "fwd ms / product",
        "GCNConv/layer fwd",
        "GCNConv/layer fwd+bwd",
        "ChebConv/layer fwd",
        "ChebConv/layer fwd+bwd",
    ]
    rows = []
    for r in records:
        t = r["timing"]
        fwd, fb = t["forward"].median_ms, t["forward_backward"].median_ms
        rows.append(
            [
                r["layer"],
                r["library"],
                r["sparse_products"],
                fmt_ms(fwd),
                fmt_ms(fb),
                fmt_ms(fwd / max(r["sparse_products"], 1)),
                fmt_ratio(ratio(gcn["forward"].median_ms, fwd)),
                fmt_ratio(ratio(gcn["forward_backward"].median_ms, fb)),
                fmt_ratio(ratio(cheb["forward"].median_ms, fwd)),
                fmt_ratio(ratio(cheb["forward_backward"].median_ms, fb)),
            ]
        )
    r0 = records[0]
    return (
        f"Degree-{K} filter layers (64 -> 64 features) on a random graph with {r0['nodes']} "
        f"nodes and {r0['edges']} directed edges, median ms; ratios are anchor time / layer "
        f"time (> 1: the layer is faster). torsion layers are Linear + filter; the BernNet "
        f"reference is timed with {slow_repeats} repeats.\n\n" + render_table(headers, rows)
    )


if __name__ == "__main__":
    sys.exit(main())
