"""Matrix logarithm of SPD batches: torsion vs autograd through eigh vs geoopt.

Compares, in one run, the time of forward, forward+backward and double backward of
``L = sum(logm(X) * G)`` (``G`` a fixed random matrix, so the backward is not trivial)
and how many matrices get a NaN/Inf gradient, for

* ``torsion``: :func:`torsion.linalg.sym_logm` (Daleckii-Krein backward with ties);
* ``eigh``: ``Q diag(log L) Q^T`` from ``torch.linalg.eigh``, torch's own eigh backward;
* ``geoopt``: ``geoopt.linalg.sym_logm`` (also autograd through eigh, TorchScript).

Problems: batches of SPD matrices (n = 8, 16, 32, 64; batch 256) in two conditions:

* ``well``: ``Q diag(logspace(0, 2, n)) Q^T``, condition number 1e2, distinct eigenvalues;
* ``repeated``: exactly repeated eigenvalues, the batch tiling three kinds of matrix: the
  identity, ``diag(1, 1, 2, 2, 3, 3, ...)`` and the same spectrum rotated by a random
  orthogonal ``Q``.

Correctness is checked before any timing: every method's forward against a float64
``eigh`` reference; torsion's gradient and double backward against float64
autograd-through-eigh on the ``well`` problems, and its gradient against the exact
Daleckii-Krein gradient built from the known spectrum on the ``repeated`` ones.
Gradients are compared symmetrized (``(g + g^T) / 2``), the convention-free part for
symmetric input.

Targets (TARGETS.md section 1): torsion no slower than autograd through eigh, and zero
non-finite gradients.

    python benchmarks/bench_linalg.py [--quick] [--out DIR] [--repeats N] [--threads N]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import geoopt
import torch

from _harness import (
    check_close,
    compare_passes,
    environment_line,
    fmt_ms,
    fmt_ratio,
    nonfinite_matrices,
    parse_args,
    peak_memory,
    ratio,
    render_table,
    setup,
    write_results,
)
from torsion.linalg import sym_logm

SEED = 20240601
METHODS = ("torsion", "eigh", "geoopt")
ANCHORS = ("eigh", "geoopt")
CONDITIONS = ("well", "repeated")


# ---------------------------------------------------------------------------------------
# The three implementations
# ---------------------------------------------------------------------------------------


def logm_torsion(x: torch.Tensor) -> torch.Tensor:
    return sym_logm(x)


def logm_eigh(x: torch.Tensor) -> torch.Tensor:
    lam, q = torch.linalg.eigh(x)
    return (q * lam.log().unsqueeze(-2)) @ q.mT


def logm_geoopt(x: torch.Tensor) -> torch.Tensor:
    return geoopt.linalg.sym_logm(x)


IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "torsion": logm_torsion,
    "eigh": logm_eigh,
    "geoopt": logm_geoopt,
}


# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------


def random_orthogonal(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrices, float64 (QR of a Gaussian with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    return q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)


def make_problem(
    condition: str, batch: int, n: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """SPD batch ``x`` (in ``dtype``), its float64 eigenbasis ``q`` and spectrum ``lam``,
    and the loss weight ``g``. ``x = q diag(lam) q^T`` up to rounding to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    q = random_orthogonal(batch, n, gen)
    if condition == "well":
        lam = torch.logspace(0, 2, n, dtype=torch.float64).expand(batch, n)
    elif condition == "repeated":
        lam = (1 + torch.arange(n, dtype=torch.float64) // 2).expand(batch, n).clone()
        kind = torch.arange(batch) % 3  # 0: identity, 1: diagonal, 2: rotated
        lam[kind == 0] = 1.0
        q[kind != 2] = torch.eye(n, dtype=torch.float64)
    else:
        raise ValueError(f"unknown condition {condition!r}")
    x = (q * lam.unsqueeze(-2)) @ q.mT
    x = ((x + x.mT) / 2).to(dtype)
    g = torch.randn(n, n, generator=gen, dtype=torch.float64).to(dtype)
    return {"x": x, "q": q, "lam": lam.contiguous(), "g": g}


def _sym(a: torch.Tensor) -> torch.Tensor:
    return (a + a.mT) / 2


def reference_logm(x: torch.Tensor) -> torch.Tensor:
    """float64 ``eigh`` reference of the (rounded) input actually benchmarked."""
    return logm_eigh(x.detach().double())


def reference_grad_eigh(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """float64 autograd-through-eigh gradient of ``sum(logm(x) * g)``, symmetrized."""
    x64 = x.detach().double().requires_grad_()
    (grad,) = torch.autograd.grad((logm_eigh(x64) * g.double()).sum(), x64)
    return _sym(grad)


def reference_grad_exact(q: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Exact gradient from the known spectrum: ``Q (L o Q^T sym(G) Q) Q^T``, float64.

    ``L_ij = (log lam_i - log lam_j) / (lam_i - lam_j)``, and ``1 / lam_i`` where the
    eigenvalues are equal, which is exactly where autograd through eigh divides by zero.
    """
    a, b = lam.unsqueeze(-1), lam.unsqueeze(-2)
    same = a == b
    loewner = torch.where(same, 1 / a, (a.log() - b.log()) / torch.where(same, 1.0, a - b))
    return q @ (loewner * (q.mT @ _sym(g.double()) @ q)) @ q.mT


def hessian_vector(
    impl: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """What the timed double-backward pass computes: ``grad <grad L, 1>``, symmetrized."""
    x = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(impl, g)(x), x, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.sum(), x)
    return _sym(hvp)


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float64:
        return {"rtol": 1e-8, "atol": 1e-9}
    return {"rtol": 1e-3, "atol": 1e-3}


def loss_fn(impl: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor):
    def loss(x: torch.Tensor) -> torch.Tensor:
        return (impl(x) * g).sum()

    return loss


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def gradients(problem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetrized gradient of each method on the problem, in its dtype."""
    out = {}
    for name, impl in IMPLEMENTATIONS.items():
        x = problem["x"].clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(impl, problem["g"])(x), x)
        out[name] = _sym(grad)
    return out


def check_and_count(
    condition: str, problem: dict[str, torch.Tensor], label: str
) -> dict[str, dict[str, float]]:
    """Correctness checks (raise on failure) and per-method gradient statistics.

    Returns ``{method: {"nonfinite_grad", "grad_max_abs_err", "forward_max_abs_err"}}``;
    the gradient error is against the exact gradient of the known spectrum, over the
    matrices whose gradient is finite.
    """
    x, g, dtype = problem["x"], problem["g"], problem["x"].dtype
    tol = tolerances(dtype)
    ref_y = reference_logm(x)
    exact = reference_grad_exact(problem["q"], problem["lam"], g)
    if condition == "well":
        ref_grad = reference_grad_eigh(x, g)
        # The two references must agree (up to the rounding of x to dtype).
        check_close(f"{label} eigh reference grad", ref_grad, exact, **tol)
        # Double backward: torsion against float64 autograd through eigh.
        ref_hvp = hessian_vector(logm_eigh, x.double(), g.double())
        hvp = hessian_vector(logm_torsion, x, g)
        check_close(f"{label} torsion double backward", hvp, ref_hvp, **tol)
    else:
        ref_grad = exact

    grads = gradients(problem)
    stats: dict[str, dict[str, float]] = {}
    for name, impl in IMPLEMENTATIONS.items():
        with torch.no_grad():
            y = impl(x)
        if name == "torsion" or condition == "well":
            check_close(f"{label} {name} forward", y, ref_y, **tol)
        if name == "torsion":
            check_close(f"{label} torsion grad", grads[name], ref_grad, **tol)
        finite = torch.isfinite(grads[name]).flatten(-2).all(-1)
        grad_err = (grads[name][finite].double() - exact[finite]).abs()
        stats[name] = {
            "nonfinite_grad": nonfinite_matrices(grads[name]),
            "grad_max_abs_err": float(grad_err.max()) if grad_err.numel() else float("nan"),
            "forward_max_abs_err": float((y.double() - ref_y).abs().nan_to_num(torch.inf).max()),
        }
    return stats


def memory_workload(method: str, batch: int, n: int, dtype_name: str):
    """Peak-memory workload (run in a fresh subprocess): one forward+backward."""
    dtype = getattr(torch, dtype_name)
    problem = make_problem("well", batch, n, dtype, SEED)
    x = problem["x"].requires_grad_()
    loss = loss_fn(IMPLEMENTATIONS[method], problem["g"])

    def run() -> None:
        torch.autograd.grad(loss(x), x)

    return run


def main() -> int:
    args = parse_args(__doc__)
    env = setup(args)
    if args.device != "cpu":
        print("bench_linalg runs on CPU only (inputs are built on CPU)", file=sys.stderr)
        return 2
    if args.quick:
        sizes, batch, dtypes = (8, 16), 12, (torch.float64,)
    else:
        sizes, batch, dtypes = (8, 16, 32, 64), 256, (torch.float32, torch.float64)
    print(environment_line(env), flush=True)

    records = []
    for n in sizes:
        for condition in CONDITIONS:
            for dtype in dtypes:
                label = f"n={n} {condition} {str(dtype).removeprefix('torch.')}"
                problem = make_problem(condition, batch, n, dtype, SEED + n)
                stats = check_and_count(condition, problem, label)
                timings = compare_passes(
                    {name: loss_fn(impl, problem["g"]) for name, impl in IMPLEMENTATIONS.items()},
                    [problem["x"].clone().requires_grad_()],
                    double_backward=True,
                    warmup=args.warmup,
                    repeats=args.repeats,
                )
                record = {
                    "n": n,
                    "batch": batch,
                    "condition": condition,
                    "dtype": str(dtype).removeprefix("torch."),
                    "methods": {m: {"timing": timings[m], **stats[m]} for m in METHODS},
                }
                records.append(record)
                fb = {m: timings[m]["forward_backward"].median_ms for m in METHODS}
                print(
                    f"{label}: fwd+bwd ms "
                    + ", ".join(f"{m} {fmt_ms(fb[m])}" for m in METHODS)
                    + "; non-finite grads "
                    + ", ".join(f"{m} {stats[m]['nonfinite_grad']}" for m in METHODS),
                    flush=True,
                )

    compiled = [] if args.quick else compiled_records(sizes, batch, args)

    memory = []
    n_mem = max(sizes)
    for dtype in dtypes:
        dtype_name = str(dtype).removeprefix("torch.")
        row = {"n": n_mem, "batch": batch, "dtype": dtype_name}
        for m in METHODS:
            row[m] = peak_memory(memory_workload, m, batch, n_mem, dtype_name)
        memory.append(row)

    tables = [main_table(records), passes_table(records), error_table(records)]
    if compiled:
        tables.append(compiled_table(compiled))
    table = "\n\n".join([*tables, memory_table(memory)])
    print()
    print(table)
    print()
    print(environment_line(env))
    json_path, md_path = write_results(
        "linalg", args, env, [*records, {"peak_memory": memory}, {"compiled": compiled}], table
    )
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def compiled_records(sizes: tuple[int, ...], batch: int, args) -> list[dict]:
    """Forward+backward under ``torch.compile`` (float32), torsion vs autograd through eigh.

    Hot paths in training loops are compiled; there inductor fuses the elementwise work
    of both backwards, which leaves mostly ``eigh`` and the matrix products. geoopt is
    left out: its TorchScript ``sym_logm`` does not compile with ``fullgraph=True``.
    """
    records = []
    for n in sizes:
        for condition in CONDITIONS:
            problem = make_problem(condition, batch, n, torch.float32, SEED + n)
            losses = {
                m: torch.compile(loss_fn(IMPLEMENTATIONS[m], problem["g"]), fullgraph=True)
                for m in ("torsion", "eigh")
            }
            timings = compare_passes(
                losses,
                [problem["x"].clone().requires_grad_()],
                warmup=max(args.warmup, 2),
                repeats=args.repeats,
            )
            ms = {m: timings[m]["forward_backward"].median_ms for m in losses}
            records.append({"n": n, "condition": condition, "batch": batch, "ms": ms})
            print(f"compiled n={n} {condition}: fwd+bwd ms {ms}", flush=True)
    return records


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def compiled_table(records: list[dict]) -> str:
    headers = ["n", "condition", "torsion ms", "eigh ms", "eigh/torsion"]
    rows = [
        [
            r["n"],
            r["condition"],
            fmt_ms(r["ms"]["torsion"]),
            fmt_ms(r["ms"]["eigh"]),
            fmt_ratio(ratio(r["ms"]["eigh"], r["ms"]["torsion"])),
        ]
        for r in records
    ]
    return (
        "Forward+backward under torch.compile(fullgraph=True), float32, batch "
        f"{records[0]['batch']}, median ms (ratio > 1: torsion faster).\n\n"
        + render_table(headers, rows)
    )


def main_table(records: list[dict]) -> str:
    """Forward+backward medians, ratios against torsion, non-finite gradient counts."""
    headers = [
        "n",
        "condition",
        "dtype",
        "torsion ms",
        "eigh ms",
        "geoopt ms",
        "eigh/torsion",
        "geoopt/torsion",
        *(f"non-finite {m}" for m in METHODS),
    ]
    rows = []
    for r in records:
        ms = {m: r["methods"][m]["timing"]["forward_backward"].median_ms for m in METHODS}
        rows.append(
            [
                r["n"],
                r["condition"],
                r["dtype"],
                *(fmt_ms(ms[m]) for m in METHODS),
                *(fmt_ratio(ratio(ms[a], ms["torsion"])) for a in ANCHORS),
                *(f"{r['methods'][m]['nonfinite_grad']}/{r['batch']}" for m in METHODS),
            ]
        )
    return (
        f"Forward+backward of sum(logm(X) * G), median ms over a batch of "
        f"{records[0]['batch']} (ratio > 1: torsion faster); matrices with a NaN/Inf "
        f"gradient.\n\n" + render_table(headers, rows)
    )


def passes_table(records: list[dict]) -> str:
    """Forward and double-backward medians (well-conditioned problems only)."""
    headers = ["n", "dtype"]
    for p in ("fwd", "double bwd"):
        headers += [f"{p}: torsion ms", "eigh ms", "geoopt ms", "eigh/torsion"]
    rows = []
    for r in records:
        if r["condition"] != "well":
            continue
        row = [r["n"], r["dtype"]]
        for p in ("forward", "double_backward"):
            ms = {m: r["methods"][m]["timing"][p].median_ms for m in METHODS}
            row += [*(fmt_ms(ms[m]) for m in METHODS), fmt_ratio(ratio(ms["eigh"], ms["torsion"]))]
        rows.append(row)
    return (
        "Forward alone and forward+backward+double backward (grad of <grad, 1>), "
        "well-conditioned, median ms.\n\n" + render_table(headers, rows)
    )


def error_table(records: list[dict]) -> str:
    """Largest gradient error over the matrices whose gradient is finite."""
    headers = ["n", "condition", "dtype", *(f"{m} grad err" for m in METHODS)]
    rows = [
        [
            r["n"],
            r["condition"],
            r["dtype"],
            *(f"{r['methods'][m]['grad_max_abs_err']:.1e}" for m in METHODS),
        ]
        for r in records
    ]
    return (
        "Max abs gradient error against the exact gradient (closed form from the known "
        "spectrum), over matrices whose gradient is finite; gradients are O(1).\n\n"
        + render_table(headers, rows)
    )


def memory_table(memory: list[dict]) -> str:
    """Peak memory added by one forward+backward, fresh process per method."""
    headers = ["n", "batch", "dtype", *(f"{m} MB" for m in METHODS)]
    rows = [
        [row["n"], row["batch"], row["dtype"], *(f"{row[m]['delta_mb']:.1f}" for m in METHODS)]
        for row in memory
    ]
    methods = sorted({row[m]["method"] for row in memory for m in METHODS})
    return (
        "Peak memory added by one forward+backward above the inputs (well-conditioned; "
        f"fresh process per method, {'/'.join(methods)}, MB).\n\n" + render_table(headers, rows)
    )


if __name__ == "__main__":
    sys.exit(main())
