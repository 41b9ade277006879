"""Manifolds: torsion vs geoopt, in one run.

Three measurements (issue 3):

* Stiefel retractions at St(1024, 64) and St(4096, 128): torsion's QR, polar, Cayley
  (a 2p x 2p solve) and exp retractions against geoopt's default ``Stiefel()`` (canonical
  metric, Cayley through a dense n x n solve) and ``EuclideanStiefel`` (QR).
* Batched affine-invariant SPD ``expmap``, ``logmap`` and ``dist`` (batch 256, n = 16 and
  32), forward and forward+backward, against geoopt's ``SymmetricPositiveDefinite``.
* float32 robustness: NaN fraction and relative error of ``logmap(x, expmap(x, u))`` at
  condition numbers 1e2 to 1e4 (target: 0 NaN, relative error < 1e-3 at 1e3).

Correctness is checked before timing: every retraction lands on the manifold and the
Cayley retraction equals the dense Wen-Yin formula; SPD maps agree with geoopt's in
float64 on well-conditioned input.

    python benchmarks/bench_manifolds.py [--quick] [--out DIR] [--repeats N] [--threads N]
"""

from __future__ import annotations

import sys

import geoopt
import torch

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
    time_fns,
    write_results,
)
from torsion.manifolds import SPDAffineInvariant, Stiefel

SEED = 20261124


# ---------------------------------------------------------------------------------------
# Stiefel retractions
# ---------------------------------------------------------------------------------------


def stiefel_problem(n: int, p: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = Stiefel().random(n, p, generator=gen)
    u = Stiefel().proju(x, torch.randn(n, p, generator=gen))
    return x, 0.1 * u / u.norm()


def dense_cayley(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Wen & Yin's Cayley retraction through the n x n system, in float64."""
    x, u = x.double(), u.double()
    pu = u - 0.5 * x @ (x.mT @ u)
    w = pu @ x.mT - x @ pu.mT
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    return torch.linalg.solve(eye - w / 2, (eye + w / 2) @ x)


def retraction_methods(x: torch.Tensor, u: torch.Tensor) -> dict[str, object]:
    manifolds = {f"torsion {r}": Stiefel(retraction=r) for r in ("qr", "polar", "cayley", "exp")}
    manifolds["geoopt Stiefel() (canonical Cayley)"] = geoopt.Stiefel()
    manifolds["geoopt EuclideanStiefel (QR)"] = geoopt.EuclideanStiefel()
    return {name: (lambda m=m: m.retr(x, u)) for name, m in manifolds.items()}


def stiefel_retractions(sizes, args) -> list[dict]:
    records = []
    for n, p in sizes:
        gen = torch.Generator().manual_seed(SEED + n)
        x, u = stiefel_problem(n, p, gen)
        methods = retraction_methods(x, u)
        eye = torch.eye(p)
        for name, fn in methods.items():
            y = fn()
            check_close(f"St({n},{p}) {name} orthonormal", y.mT @ y, eye, rtol=0, atol=1e-4)
        if n <= 1024:
            check_close(
                f"St({n},{p}) torsion cayley = dense Cayley",
                methods["torsion cayley"](),
                dense_cayley(x, u),
                rtol=1e-4,
                atol=1e-5,
            )
        timings = time_fns(methods, warmup=args.warmup, repeats=max(3, args.repeats // 4))
        records.append({"n": n, "p": p, "ms": {m: t.median_ms for m, t in timings.items()}})
        print(
            f"St({n},{p}): " + ", ".join(f"{m} {fmt_ms(t.median_ms)}" for m, t in timings.items())
        )
    return records


def stiefel_table(records: list[dict]) -> str:
    anchor = "geoopt Stiefel() (canonical Cayley)"
    methods = list(records[0]["ms"])
    headers = ["St(n, p)", *(f"{m} ms" for m in methods), "geoopt Cayley / torsion cayley"]
    rows = [
        [
            f"St({r['n']}, {r['p']})",
            *(fmt_ms(r["ms"][m]) for m in methods),
            fmt_ratio(ratio(r["ms"][anchor], r["ms"]["torsion cayley"])),
        ]
        for r in records
    ]
    return "Stiefel retraction of one point, median ms.\n\n" + render_table(headers, rows)


# ---------------------------------------------------------------------------------------
# Batched SPD maps
# ---------------------------------------------------------------------------------------


def spd_batch(batch: int, n: int, condition: float, dtype, gen) -> torch.Tensor:
    return (
        SPDAffineInvariant()
        .random(batch, n, n, generator=gen, condition=condition, dtype=torch.float64)
        .to(dtype)
    )


def spd_losses(manifold, weights: torch.Tensor) -> dict[str, object]:
    """Scalar losses of (x, second), where second is u for expmap and y otherwise."""
    return {
        "expmap": lambda x, u: (manifold.expmap(x, u) * weights).sum(),
        "logmap": lambda x, y: (manifold.logmap(x, y) * weights).sum(),
        "dist": lambda x, y: manifold.dist(x, y).sum(),
    }


def spd_maps(sizes, batch: int, args) -> list[dict]:
    ours, theirs = SPDAffineInvariant(), geoopt.SymmetricPositiveDefinite()
    records = []
    for n in sizes:
        gen = torch.Generator().manual_seed(SEED + n)
        x64, y64 = (
            spd_batch(batch, n, 10.0, torch.float64, gen),
            spd_batch(batch, n, 10.0, torch.float64, gen),
        )
        u64 = 0.3 * ours.random_tangent(x64, generator=gen) / n
        weights = torch.randn(n, n, generator=gen, dtype=torch.float64)
        for op in ("expmap", "logmap", "dist"):
            second = u64 if op == "expmap" else y64
            mine = spd_losses(ours, weights)[op](x64, second)
            anchor = spd_losses(theirs, weights)[op](x64, second)
            check_close(f"n={n} {op} vs geoopt", mine, anchor, rtol=1e-8, atol=1e-8)
        x, y, u, w = (t.float() for t in (x64, y64, u64, weights))
        for op in ("expmap", "logmap", "dist"):
            losses = {
                "torsion": spd_losses(ours, w)[op],
                "geoopt": spd_losses(theirs, w)[op],
            }
            second = u if op == "expmap" else y
            inputs = [x.clone().requires_grad_(), second.clone().requires_grad_()]
            timings = compare_passes(losses, inputs, warmup=args.warmup, repeats=args.repeats)
            ms = {
                f"{m} {p}": timings[m][p].median_ms
                for m in losses
                for p in ("forward", "forward_backward")
            }
            records.append({"n": n, "batch": batch, "op": op, "ms": ms})
            print(
                f"SPD n={n} {op}: fwd torsion {fmt_ms(ms['torsion forward'])} geoopt "
                f"{fmt_ms(ms['geoopt forward'])}; fwd+bwd torsion "
                f"{fmt_ms(ms['torsion forward_backward'])} geoopt "
                f"{fmt_ms(ms['geoopt forward_backward'])}",
                flush=True,
            )
    return records


def spd_table(records: list[dict]) -> str:
    headers = [
        "n",
        "op",
        "fwd torsion ms",
        "fwd geoopt ms",
        "fwd geoopt/torsion",
        "fwd+bwd torsion ms",
        "fwd+bwd geoopt ms",
        "fwd+bwd geoopt/torsion",
    ]
    rows = []
    for r in records:
        ms = r["ms"]
        row = [r["n"], r["op"]]
        for p in ("forward", "forward_backward"):
            row += [
                fmt_ms(ms[f"torsion {p}"]),
                fmt_ms(ms[f"geoopt {p}"]),
                fmt_ratio(ratio(ms[f"geoopt {p}"], ms[f"torsion {p}"])),
            ]
        rows.append(row)
    return (
        f"Affine-invariant SPD maps on a float32 batch of {records[0]['batch']}, median ms "
        "(ratio > 1: torsion faster).\n\n" + render_table(headers, rows)
    )


# ---------------------------------------------------------------------------------------
# float32 robustness
# ---------------------------------------------------------------------------------------


def round_trip(manifold, batch: int, n: int, condition: float) -> dict[str, float]:
    """NaN fraction and relative error of logmap(x, expmap(x, u)) in float32."""
    gen = torch.Generator().manual_seed(SEED + int(condition))
    x = spd_batch(batch, n, condition, torch.float64, gen)
    u = SPDAffineInvariant().random_tangent(x, generator=gen)
    u = u * (1.0 / SPDAffineInvariant().norm(x, u, keepdim=True))  # unit AI norm
    x32, u32 = x.float(), u.float()
    with torch.no_grad():
        back = manifold.logmap(x32, manifold.expmap(x32, u32)).double()
    bad = ~torch.isfinite(back).flatten(-2).all(-1)
    error = (back - u).norm(dim=(-2, -1)) / u.norm(dim=(-2, -1))
    finite = error[~bad]
    return {
        "nan_fraction": float(bad.double().mean()),
        "median_rel_err": float(finite.median()) if finite.numel() else float("nan"),
        "max_rel_err": float(finite.max()) if finite.numel() else float("nan"),
    }


def robustness(conditions, batch: int, n: int) -> list[dict]:
    records = []
    for condition in conditions:
        row = {
            "condition": condition,
            "torsion": round_trip(SPDAffineInvariant(), batch, n, condition),
            "geoopt": round_trip(geoopt.SymmetricPositiveDefinite(), batch, n, condition),
        }
        records.append(row)
        print(f"float32 round trip, condition {condition:g}: {row}", flush=True)
    return records


def robustness_table(records: list[dict], batch: int, n: int) -> str:
    headers = ["condition"]
    for m in ("torsion", "geoopt"):
        headers += [f"{m} NaN", f"{m} median rel err", f"{m} max rel err"]
    rows = []
    for r in records:
        row = [f"{r['condition']:.0e}"]
        for m in ("torsion", "geoopt"):
            s = r[m]
            row += [
                f"{100 * s['nan_fraction']:.1f}%",
                f"{s['median_rel_err']:.1e}",
                f"{s['max_rel_err']:.1e}",
            ]
        rows.append(row)
    return (
        f"float32 logmap(x, expmap(x, u)) against u (unit norm), {batch} matrices of size "
        f"{n}x{n}, affine-invariant metric.\n\n" + render_table(headers, rows)
    )


def main() -> int:
    args = parse_args(__doc__)
    env = setup(args)
    if args.device != "cpu":
        print("bench_manifolds runs on CPU only", file=sys.stderr)
        return 2
    print(environment_line(env), flush=True)
    if args.quick:
        stiefel_sizes, spd_sizes, batch, conditions, robust = [(64, 8)], (8,), 16, (1e3,), 16
    else:
        stiefel_sizes = [(1024, 64), (4096, 128)]
        spd_sizes, batch, conditions, robust = (16, 32), 256, (1e2, 1e3, 1e4), 256
    stiefel = stiefel_retractions(stiefel_sizes, args)
    spd = spd_maps(spd_sizes, batch, args)
    robust_records = robustness(conditions, robust, 16)
    table = "\n\n".join(
        [stiefel_table(stiefel), spd_table(spd), robustness_table(robust_records, robust, 16)]
    )
    print()
    print(table)
    print()
    print(environment_line(env))
    records = [{"stiefel": stiefel}, {"spd": spd}, {"robustness": robust_records}]
    json_path, md_path = write_results("manifolds", args, env, records, table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
