"""Spectral positional encodings: torsion vs PyTorch Geometric, in one run.

Three measurements (issue 7, TARGETS.md section 5):

* **Many small graphs**: Laplacian PE (k = 16) for a batch of 10,000 connected graphs of
  20-40 nodes. torsion: one :class:`~torsion.spectral.AddLaplacianPE` call on the
  ``Batch`` (graphs grouped by size, one batched ``eigh`` per group). PyG:
  ``AddLaplacianEigenvectorPE(16)`` graph by graph, with its default
  (``is_undirected=False``, a non-symmetric ``eig``) and with ``is_undirected=True``
  (``eigh``).
* **One large graph**: Laplacian PE (k = 16) on 1e5-node graphs: Barabasi-Albert
  (m = 5), sparse random (average degree 10) and a 316 x 316 grid. torsion's
  ``method="auto"`` against PyG's ``AddLaplacianEigenvectorPE(16)`` (ARPACK, float32,
  ``tol=0``; its random start varies its run time, so it is timed over several calls).
* **Random-walk PE** (walk length 20) on a 10,000-node Barabasi-Albert graph, on the
  batch of small graphs, and graph by graph on 1,000 of them: torsion's exact
  ``AddRandomWalkPE`` (blocked sparse products; dense powers for one graph of at most
  160 nodes) against PyG's.
* **One graph at a time** (a dataset's ``transform=`` / ``pre_transform=``): Laplacian PE
  (k = 16) applied graph by graph to 1,000 of the small graphs, torsion and PyG alike,
  plus torsion's batched route for a list of graphs (``Batch.from_data_list``, one call,
  ``to_data_list()``, all three timed); and single mid-size graphs of 400-5,000 nodes
  (Barabasi-Albert m = 3, sparse random, a 60 x 60 grid), where ``"auto"`` switches from
  dense ``eigh`` to the iterative solvers. Ratios against the faster of PyG's two settings.

Correctness before timing: torsion's eigenvalues are checked against a reference (dense
``eigvalsh`` in float64 for the small graphs and the ``--quick`` sizes; for 1e5 nodes a
float64 solve to residual 1e-9: shift-invert on the grid, Chebyshev-filtered subspace
iteration elsewhere) and its RWPE against PyG's. Every table also reports, for torsion
and for PyG, the largest eigenvalue error against that reference, the largest residual
``||L v - lambda v|| / ||v||`` (PyG's eigenvalues are the Rayleigh quotients of its
vectors) and the sum of the k eigenvalues (the smallest possible sum is the true one; a
missed eigenvalue makes it larger).

    python benchmarks/bench_spectral.py [--quick] [--out DIR] [--repeats N] [--threads N]
        [--tables small,large,random_walk,one_graph]

On a shared 2-core machine run it with ``--threads 1`` (torch's threads and, through
threadpoolctl when installed, SciPy's BLAS under ARPACK for both libraries): a second
OpenMP thread competing with other processes slowed torsion's sparse products 4x.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import AddLaplacianEigenvectorPE
from torch_geometric.transforms import AddRandomWalkPE as PyGRandomWalkPE
from torch_geometric.utils import remove_self_loops, to_undirected

from _harness import (
    Timing,
    check_close,
    environment_line,
    fmt_ms,
    fmt_ratio,
    parse_args,
    ratio,
    render_table,
    setup,
    time_fns,
    write_results,
)
from torsion.spectral import AddLaplacianPE, AddRandomWalkPE, laplacian, laplacian_eigs

SEED = 20261124
K = 16
WALK = 20


# ---------------------------------------------------------------------------------------
# Graphs (deterministic generators; PyG's barabasi_albert_graph is quadratic and unseeded)
# ---------------------------------------------------------------------------------------


def barabasi_albert(n: int, m: int, seed: int) -> torch.Tensor:
    """Preferential attachment: each new node links to ``m`` endpoints of earlier edges."""
    rng = np.random.default_rng(seed)
    ends = np.empty(2 * m * n, dtype=np.int64)
    src = np.repeat(np.arange(m, n), m)
    dst = np.empty((n - m) * m, dtype=np.int64)
    dst[:m] = np.arange(m)
    ends[:m], ends[m : 2 * m] = np.arange(m), m
    size = 2 * m
    draws = rng.random((n - m) * m)
    for i in range(m + 1, n):
        j = (i - m) * m
        targets = ends[(draws[j : j + m] * size).astype(np.int64)]
        dst[j : j + m] = targets
        ends[size : size + m], ends[size + m : size + 2 * m] = targets, i
        size += 2 * m
    edges, _ = remove_self_loops(torch.from_numpy(np.stack([src, dst])))
    return to_undirected(edges, num_nodes=n)


def sparse_random(n: int, degree: int, seed: int) -> torch.Tensor:
    """Erdos-Renyi-like: ``n * degree / 2`` uniform random edges (a few nodes stay isolated)."""
    gen = torch.Generator().manual_seed(seed)
    edges, _ = remove_self_loops(torch.randint(0, n, (2, n * degree // 2), generator=gen))
    return to_undirected(edges, num_nodes=n)


def grid(h: int, w: int) -> torch.Tensor:
    idx = torch.arange(h * w).view(h, w)
    right = torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)])
    down = torch.stack([idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1)])
    return to_undirected(torch.cat([right, down], 1), num_nodes=h * w)


def small_graphs(count: int, seed: int) -> list[Data]:
    """Connected molecule-like graphs of 20-40 nodes: a random tree plus 2-6 random edges."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(20, 41, (count,), generator=gen).tolist()
    extras = torch.randint(2, 7, (count,), generator=gen).tolist()
    graphs = []
    for n, extra in zip(sizes, extras, strict=True):
        parents = (torch.rand(n - 1, generator=gen) * torch.arange(1, n)).long()
        tree = torch.stack([torch.arange(1, n), parents])
        more = torch.randint(0, n, (2, extra), generator=gen)
        edges, _ = remove_self_loops(torch.cat([tree, more], 1))
        graphs.append(Data(edge_index=to_undirected(edges, num_nodes=n), num_nodes=n))
    return graphs


# ---------------------------------------------------------------------------------------
# Eigenvalue quality
# ---------------------------------------------------------------------------------------


def rayleigh(edge_index: torch.Tensor, n: int, vectors: torch.Tensor):
    """Sorted Rayleigh quotients and residuals of ``vectors`` under torsion's ``L_sym``."""
    lap = laplacian(
        edge_index.cpu(), n, torch.ones(edge_index.shape[1], dtype=torch.float64), "sym"
    )
    v = vectors.detach().cpu().double()
    v = v / v.norm(dim=0).clamp_min(1e-300)
    lv = lap @ v
    values = (v * lv).sum(0)
    residuals = (lv - v * values).norm(dim=0)
    order = torch.argsort(values)
    return values[order], residuals[order]


def quality(values: torch.Tensor, residuals: torch.Tensor, reference: torch.Tensor) -> dict:
    values = values.double().cpu()
    return {
        "max_eig_err": float((torch.sort(values)[0] - reference).abs().max()),
        "max_residual": float(residuals.double().max()),
        "eig_sum": float(values.sum()),
    }


def pyg_lap_pe(data: Data, **kwargs) -> torch.Tensor:
    return AddLaplacianEigenvectorPE(K, **kwargs)(data).laplacian_eigenvector_pe


def pyg_rw_pe(data: Data) -> torch.Tensor:
    with warnings.catch_warnings():  # PyG's CSR construction warns on torch 2.13
        warnings.simplefilter("ignore", UserWarning)
        return PyGRandomWalkPE(WALK)(data).random_walk_pe


def dense_reference_eigenvalues(graphs: list[Data]) -> torch.Tensor:
    """Exact non-trivial eigenvalues ``lambda_2 .. lambda_{K+1}`` per graph, float64."""
    out = []
    for data in graphs:
        n = data.num_nodes
        lap = laplacian(data.edge_index, n, torch.ones(data.num_edges, dtype=torch.float64), "sym")
        out.append(torch.linalg.eigvalsh(lap.to_dense())[1 : K + 1])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def small_graph_batch(args, count: int) -> dict:
    graphs = small_graphs(count, SEED)
    batch = Batch.from_data_list(graphs)
    device_batch = batch.clone().to(args.device)  # PyG's .to moves the data in place
    reference = dense_reference_eigenvalues(graphs)

    transform = AddLaplacianPE(K)
    out = transform(device_batch)
    check_close(
        "torsion batched LapPE eigenvalues",
        out.lap_pe_eigvals.cpu(),
        reference.float(),
        rtol=0,
        atol=1e-4,
    )
    torsion_res = []
    for g, data in enumerate(graphs[: min(count, 500)]):
        rows = slice(int(batch.ptr[g]), int(batch.ptr[g + 1]))
        torsion_res.append(rayleigh(data.edge_index, data.num_nodes, out.lap_pe[rows].cpu())[1])
    pyg_values, pyg_res = [], []
    for data in graphs[: min(count, 500)]:
        v, r = rayleigh(data.edge_index, data.num_nodes, pyg_lap_pe(data))
        pyg_values.append(v)
        pyg_res.append(r)
    sample = min(count, 500)
    torsion_q = quality(
        out.lap_pe_eigvals[:sample].cpu(), torch.stack(torsion_res), reference[:sample]
    )
    pyg_q = quality(torch.stack(pyg_values), torch.stack(pyg_res), reference[:sample])

    batch64 = device_batch.clone()
    batch64.edge_weight = torch.ones(batch.num_edges, dtype=torch.float64, device=args.device)

    def run_torsion():
        AddLaplacianPE(K)(device_batch)

    def run_torsion64():
        AddLaplacianPE(K)(batch64)

    def run_pyg_default():
        for data in graphs:
            pyg_lap_pe(data)

    def run_pyg_eigh():
        for data in graphs:
            pyg_lap_pe(data, is_undirected=True)

    repeats = min(args.repeats, 3)
    timings = time_fns(
        {
            "torsion": run_torsion,
            "torsion_f64": run_torsion64,
            "pyg": run_pyg_default,
            "pyg_eigh": run_pyg_eigh,
        },
        warmup=min(args.warmup, 1),
        repeats=repeats,
        device=args.device,
    )
    record = {
        "case": f"{count} graphs of 20-40 nodes",
        "nodes": batch.num_nodes,
        "ms": {key: t.median_ms for key, t in timings.items()},
        "timing": timings,
        "torsion": torsion_q,
        "pyg": pyg_q,
        "quality_sample": sample,
    }
    print(
        f"small graphs: torsion {fmt_ms(record['ms']['torsion'])} ms, PyG "
        f"{fmt_ms(record['ms']['pyg'])} ms (eigh {fmt_ms(record['ms']['pyg_eigh'])} ms)",
        flush=True,
    )
    return record


def one_graph_at_a_time(args, count: int, sizes: tuple[int, ...]) -> list[dict]:
    """Per-graph calls: small graphs one by one (and torsion's batched route for a list),
    and single mid-size graphs. Ratios against the faster PyG setting."""
    graphs = small_graphs(count, SEED + 2)
    torsion_pe = AddLaplacianPE(K)

    def batched_route():
        out = torsion_pe(Batch.from_data_list(graphs)).to_data_list()
        assert out[-1].lap_pe.shape == (graphs[-1].num_nodes, K)

    cases = [
        (
            f"{count} graphs of 20-40 nodes, one call each",
            lambda: [torsion_pe(g) for g in graphs],
            lambda: [pyg_lap_pe(g) for g in graphs],
            lambda: [pyg_lap_pe(g, is_undirected=True) for g in graphs],
            batched_route,
        )
    ]
    mids = [(f"Barabasi-Albert m=3, {n} nodes", barabasi_albert(n, 3, SEED), n) for n in sizes]
    mids += [
        (f"sparse random, degree 10, {n} nodes", sparse_random(n, 10, SEED), n) for n in sizes[1:]
    ]
    mids.append(("grid 60x60, 3600 nodes", grid(60, 60), 3600))
    for name, edge_index, n in mids:
        data = Data(edge_index=edge_index, num_nodes=n)
        cases.append(
            (
                name,
                lambda data=data: torsion_pe(data),
                lambda data=data: pyg_lap_pe(data),
                lambda data=data: pyg_lap_pe(data, is_undirected=True),
                None,
            )
        )
    records = []
    for name, ours, pyg, pyg_eigh, route in cases:
        fns = {"torsion": ours, "pyg": pyg, "pyg_eigh": pyg_eigh}
        if route is not None:
            fns["torsion_batched"] = route
        timings = time_fns(fns, warmup=1, repeats=max(3, min(args.repeats, 5)))
        ms = {key: t.median_ms for key, t in timings.items()}
        records.append({"case": name, "ms": ms, "timing": timings})
        print(f"{name}: torsion {fmt_ms(ms['torsion'])} ms, PyG {fmt_ms(ms['pyg'])} ms", flush=True)
    return records


def one_graph_table(records: list[dict]) -> str:
    headers = [
        "case",
        "torsion ms",
        "PyG ms",
        "PyG eigh ms",
        "best PyG/torsion",
        "torsion batched route ms",
        "best PyG/batched route",
    ]
    rows = []
    for r in records:
        ms = r["ms"]
        best = min(ms["pyg"], ms["pyg_eigh"])
        route = ms.get("torsion_batched")
        rows.append(
            [
                r["case"],
                fmt_ms(ms["torsion"]),
                fmt_ms(ms["pyg"]),
                fmt_ms(ms["pyg_eigh"]),
                fmt_ratio(ratio(best, ms["torsion"])),
                "" if route is None else fmt_ms(route),
                "" if route is None else fmt_ratio(ratio(best, route)),
            ]
        )
    return render_table(headers, rows)


def reference_solve(edge_index: torch.Tensor, n: int, mesh: bool) -> torch.Tensor:
    if n <= 4000:
        lap = laplacian(edge_index, n, torch.ones(edge_index.shape[1], dtype=torch.float64), "sym")
        values = torch.linalg.eigvalsh(lap.to_dense())
        components = int(laplacian_eigs(edge_index, n, 0).num_components)
        return values[components : components + K]
    method = "shift_invert" if mesh else "chebyshev"
    eig = laplacian_eigs(
        edge_index, n, K, method=method, skip_null_space=True, tol=1e-9, dtype=torch.float64
    )
    return eig.eigenvalues


def large_graph(args, name: str, edge_index: torch.Tensor, mesh: bool) -> dict:
    n = int(edge_index.max()) + 1
    reference = reference_solve(edge_index, n, mesh)
    data = Data(edge_index=edge_index, num_nodes=n)
    device_data = data.clone().to(args.device)  # PyG's .to moves the data in place

    start = time.perf_counter()
    out = AddLaplacianPE(K)(device_data)
    first_ms = (time.perf_counter() - start) * 1e3
    values = out.lap_pe_eigvals[0].cpu()
    check_close(f"torsion LapPE eigenvalues ({name})", values, reference.float(), rtol=0, atol=1e-5)
    torsion_q = quality(values, rayleigh(edge_index, n, out.lap_pe)[1], reference)

    pyg_outputs = []

    def run_torsion():
        AddLaplacianPE(K)(device_data)

    def run_pyg():
        pyg_outputs.append(pyg_lap_pe(data))  # its quality is measured after the timing

    repeats = min(args.repeats, 3)
    timings = time_fns(
        {"torsion": run_torsion, "pyg": run_pyg}, warmup=0, repeats=repeats, device=args.device
    )
    pyg_quality = [quality(*rayleigh(edge_index, n, pe), reference) for pe in pyg_outputs]
    worst = max(pyg_quality, key=lambda q: q["max_eig_err"])
    record = {
        "case": f"{name}, {n} nodes",
        "nodes": n,
        "edges": int(edge_index.shape[1]),
        "ms": {key: t.median_ms for key, t in timings.items()},
        "timing": timings,
        "torsion_first_call_ms": first_ms,
        "torsion": torsion_q,
        "pyg": worst,
        "pyg_all_runs": pyg_quality,
    }
    print(
        f"{name} (n={n}): torsion {fmt_ms(record['ms']['torsion'])} ms, PyG "
        f"{fmt_ms(record['ms']['pyg'])} ms (min {fmt_ms(timings['pyg'].min_ms)}, max "
        f"{fmt_ms(timings['pyg'].max_ms)}); eig err torsion {torsion_q['max_eig_err']:.1e}, "
        f"PyG {worst['max_eig_err']:.1e}",
        flush=True,
    )
    return record


def random_walk(args, name: str, data: Data, repeats_pyg: int) -> dict:
    device_data = data.clone().to(args.device)  # PyG's .to moves the data in place
    ours = AddRandomWalkPE(WALK)(device_data).rw_pe.cpu()
    pyg_ms = []
    theirs = None
    for _ in range(
        repeats_pyg
    ):  # PyG takes minutes at 10k nodes: its timed runs double as the check
        start = time.perf_counter()
        theirs = pyg_rw_pe(data)
        pyg_ms.append((time.perf_counter() - start) * 1e3)
    err = check_close(f"torsion RWPE ({name})", ours, theirs, rtol=1e-4, atol=1e-5)

    def run_torsion():
        AddRandomWalkPE(WALK)(device_data)

    timings = time_fns(
        {"torsion": run_torsion},
        warmup=min(args.warmup, 1),
        repeats=min(args.repeats, 5),
        device=args.device,
    )
    timings["pyg"] = Timing(float(np.median(pyg_ms)), min(pyg_ms), max(pyg_ms), len(pyg_ms))
    return rw_record(name, data.num_nodes, timings, ours, theirs, err)


def rw_record(name: str, nodes: int, timings: dict, ours, theirs, err) -> dict:
    """One row of the random-walk table, printed as it is made."""
    record = {
        "case": name,
        "nodes": nodes,
        "ms": {key: t.median_ms for key, t in timings.items()},
        "timing": timings,
        "max_abs_diff": float((ours - theirs).abs().max()),
        "tolerance_use": err,
    }
    print(
        f"RWPE {name}: torsion {fmt_ms(record['ms']['torsion'])} ms, PyG "
        f"{fmt_ms(record['ms']['pyg'])} ms, max |diff| {record['max_abs_diff']:.1e}",
        flush=True,
    )
    return record


def random_walk_graph_by_graph(args, count: int) -> dict:
    """RWPE applied graph by graph (a data set's ``transform=``), torsion and PyG alike."""
    graphs = [g.to(args.device) for g in small_graphs(count, SEED + 3)]
    ours = torch.cat([AddRandomWalkPE(WALK)(g).rw_pe.cpu() for g in graphs])
    theirs = torch.cat([pyg_rw_pe(g.cpu()) for g in graphs])
    err = check_close("torsion RWPE graph by graph", ours, theirs, rtol=1e-4, atol=1e-5)
    transform = AddRandomWalkPE(WALK)
    timings = time_fns(
        {
            "torsion": lambda: [transform(g) for g in graphs],
            "pyg": lambda: [pyg_rw_pe(g) for g in graphs],
        },
        warmup=1,
        repeats=max(3, min(args.repeats, 5)),
        device=args.device,
    )
    name = f"{count} graphs of 20-40 nodes, one call each"
    nodes = int(sum(g.num_nodes for g in graphs))
    return rw_record(name, nodes, timings, ours, theirs, err)


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def lap_table(records: list[dict]) -> str:
    headers = [
        "case",
        "torsion ms",
        "PyG ms",
        "PyG/torsion",
        "torsion eig err",
        "PyG eig err",
        "torsion max res",
        "PyG max res",
        "torsion eig sum",
        "PyG eig sum",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r["case"],
                fmt_ms(r["ms"]["torsion"]),
                fmt_ms(r["ms"]["pyg"]),
                fmt_ratio(ratio(r["ms"]["pyg"], r["ms"]["torsion"])),
                f"{r['torsion']['max_eig_err']:.1e}",
                f"{r['pyg']['max_eig_err']:.1e}",
                f"{r['torsion']['max_residual']:.1e}",
                f"{r['pyg']['max_residual']:.1e}",
                f"{r['torsion']['eig_sum']:.7g}",
                f"{r['pyg']['eig_sum']:.7g}",
            ]
        )
    return render_table(headers, rows)


def small_table(record: dict) -> str:
    headers = [
        "case",
        "torsion ms",
        "torsion f64 ms",
        "PyG ms",
        "PyG/torsion",
        "PyG eigh ms",
        "PyG eigh/torsion",
        "torsion eig err",
        "PyG eig err",
        "torsion max res",
        "PyG max res",
    ]
    r = record
    row = [
        r["case"],
        fmt_ms(r["ms"]["torsion"]),
        fmt_ms(r["ms"]["torsion_f64"]),
        fmt_ms(r["ms"]["pyg"]),
        fmt_ratio(ratio(r["ms"]["pyg"], r["ms"]["torsion"])),
        fmt_ms(r["ms"]["pyg_eigh"]),
        fmt_ratio(ratio(r["ms"]["pyg_eigh"], r["ms"]["torsion"])),
        f"{r['torsion']['max_eig_err']:.1e}",
        f"{r['pyg']['max_eig_err']:.1e}",
        f"{r['torsion']['max_residual']:.1e}",
        f"{r['pyg']['max_residual']:.1e}",
    ]
    return render_table(headers, [row])


def rw_table(records: list[dict]) -> str:
    headers = ["case", "nodes", "torsion ms", "PyG ms", "PyG/torsion", "max abs diff"]
    rows = [
        [
            r["case"],
            r["nodes"],
            fmt_ms(r["ms"]["torsion"]),
            fmt_ms(r["ms"]["pyg"]),
            fmt_ratio(ratio(r["ms"]["pyg"], r["ms"]["torsion"])),
            f"{r['max_abs_diff']:.1e}",
        ]
        for r in records
    ]
    return render_table(headers, rows)


TABLES = ("small", "large", "random_walk", "one_graph")


def add_options(parser) -> None:
    parser.add_argument(
        "--tables",
        default=",".join(TABLES),
        help=f"comma-separated subset of {','.join(TABLES)} (default: all)",
    )


def main() -> int:
    args = parse_args(__doc__, extra=add_options)
    chosen = args.tables.split(",")
    if not chosen or not set(chosen) <= set(TABLES):
        raise SystemExit(f"--tables: choose from {','.join(TABLES)}, got {args.tables!r}")
    env = setup(args)  # --threads applies to SciPy's BLAS too (ARPACK, both sides)
    print(environment_line(env), flush=True)
    if args.quick:
        count, big, side, rw_nodes = 200, 1200, 35, 1500
        singles, mid_sizes = 50, (400, 1000)
    else:
        count, big, side, rw_nodes = 10_000, 100_000, 316, 10_000
        singles, mid_sizes = 1000, (400, 1000, 3000, 5000)

    def small():
        return small_graph_batch(args, count)

    def large():
        return [
            large_graph(args, "Barabasi-Albert m=5", barabasi_albert(big, 5, SEED), mesh=False),
            large_graph(args, "sparse random, degree 10", sparse_random(big, 10, SEED), mesh=False),
            large_graph(args, f"grid {side}x{side}", grid(side, side), mesh=True),
        ]

    def random_walks():
        return [
            random_walk(
                args,
                f"Barabasi-Albert m=5, {rw_nodes} nodes",
                Data(edge_index=barabasi_albert(rw_nodes, 5, SEED + 1), num_nodes=rw_nodes),
                repeats_pyg=1,
            ),
            random_walk(
                args,
                f"batch of {count} graphs of 20-40 nodes",
                Batch.from_data_list(small_graphs(count, SEED)),
                repeats_pyg=min(args.repeats, 3),
            ),
            random_walk_graph_by_graph(args, singles),
        ]

    def captions(records) -> dict[str, str]:
        captions = {
            "small": f"Laplacian PE, k = {K}, one batched call (float32, and float64) vs PyG "
            "graph by graph (median ms; errors and residuals over the first 500 graphs; "
            "torsion's eigenvalues are its float32 ones, PyG's the Rayleigh quotients of its "
            "vectors).\n\n",
            "random_walk": f"Random-walk PE, walk length {WALK} (median ms).\n\n",
            "one_graph": f"Laplacian PE, k = {K}, one graph at a time (median ms of all the "
            "calls; the batched route: collate, one call, to_data_list()).\n\n",
        }
        if "large" in records:
            captions["large"] = (
                f"Laplacian PE, k = {K}, one large graph (median ms over "
                f"{records['large'][0]['timing']['pyg'].repeats} calls each; PyG's worst run "
                "for errors).\n\n"
            )
        return captions

    runs = {
        "small": (small, small_table),
        "large": (large, lap_table),
        "random_walk": (random_walks, rw_table),
        "one_graph": (lambda: one_graph_at_a_time(args, singles, mid_sizes), one_graph_table),
    }
    records = {name: runs[name][0]() for name in TABLES if name in chosen}
    heads = captions(records)
    table = "\n\n".join(heads[name] + runs[name][1](records[name]) for name in records)
    print()
    print(table)
    print()
    print(environment_line(env))
    json_path, md_path = write_results(
        "spectral", args, env, [{name: value} for name, value in records.items()], table
    )
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
