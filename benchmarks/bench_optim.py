"""Riemannian optimizers: torsion vs geoopt, torch.optim and pymanopt, in one run.

Two measurements (issue 5):

* One optimizer step on 200 same-shape float32 parameters, gradients fixed: 64x64
  Euclidean (torsion ``RiemannianAdam`` vs geoopt's ``RiemannianAdam`` and torch's foreach
  and fused ``Adam``); St(256, 32) on torsion's ``Stiefel`` (Adam and SGD with momentum vs
  geoopt's optimizers on geoopt's ``EuclideanStiefel`` (the same metric and QR retraction),
  on geoopt's default ``Stiefel()`` (canonical, Cayley) and on torsion's ``Stiefel``);
  SPD(32) on ``SPDAffineInvariant`` (vs geoopt on its ``SymmetricPositiveDefinite`` and on
  torsion's manifold). Targets: >= 5x faster than geoopt on manifold parameters, within
  1.5x of foreach Adam on Euclidean ones. Two rows with nothing to batch, timed the same
  way: a model's five Stiefel layers of five different shapes, and one small parameter.
* Time and iterations to a Riemannian gradient norm of 1e-8 (float64), torsion
  ``minimize`` vs pymanopt, trust regions and conjugate gradients (torsion's CG also with
  ``transport="projection"``, the transport pymanopt uses), same start and tolerance:
  the dominant 10-dimensional subspace of a 2000x2000 symmetric matrix on
  Grassmann(2000, 10); Procrustes on Stiefel(500, 50); the affine-invariant Karcher mean of
  200 SPD(20) matrices. Target: faster than pymanopt on every problem.

Correctness is checked before timing: one step of torsion's optimizers equals one step of
geoopt's (the same algorithm) from the same state, on torsion's manifold and on geoopt's own
implementation of the same geometry (``EuclideanStiefel``, ``SymmetricPositiveDefinite``),
and torch's Adam on plain parameters; every ``minimize`` run reaches the tolerance, and
where pymanopt's run does too (it may stop at its minimum step size) both reach the same
cost.

With ``--device cuda`` the step table runs on the GPU (every optimizer's parameters,
gradients and state there); the ``minimize`` table is skipped, since pymanopt runs on NumPy
only.

    python benchmarks/bench_optim.py [--quick] [--out DIR] [--repeats N] [--threads N]
    python benchmarks/bench_optim.py --device cuda [--quick] [--repeats N]
"""

from __future__ import annotations

import sys
import time

import geoopt
import numpy as np
import pymanopt
import torch
from geoopt import ManifoldParameter
from pymanopt.manifolds import Grassmann as PymanoptGrassmann
from pymanopt.manifolds import Stiefel as PymanoptStiefel
from pymanopt.manifolds import SymmetricPositiveDefinite as PymanoptSPD
from pymanopt.optimizers import ConjugateGradient, TrustRegions

from _harness import (
    CorrectnessError,
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
from torsion.manifolds import Grassmann, SPDAffineInvariant, Stiefel
from torsion.optim import RiemannianAdam, RiemannianSGD, minimize

SEED = 20261124
TOL = 1e-8
ADAM = {"lr": 1e-4}
SGD = {"lr": 1e-4, "momentum": 0.9}
# a model's manifold layers: parameters of different shapes, each a batch of its own
LAYER_SHAPES = [(16, 2), (32, 4), (64, 8), (128, 16), (256, 32)]


# ---------------------------------------------------------------------------------------
# One optimizer step on 200 same-shape parameters
# ---------------------------------------------------------------------------------------


def _points(kind: str, shapes: list[tuple[int, ...]], gen) -> list[torch.Tensor]:
    """float32 points of the given shapes: plain Gaussians, Stiefel frames or
    well-conditioned SPD matrices."""
    if kind == "euclidean":
        return [torch.randn(shape, generator=gen) for shape in shapes]
    if kind == "stiefel":
        return [
            Stiefel().random(*shape, generator=gen, dtype=torch.float64).float() for shape in shapes
        ]
    spd = SPDAffineInvariant()
    return [
        spd.random(*shape, generator=gen, condition=2.0, dtype=torch.float64).float()
        for shape in shapes
    ]


def _params(points, grads, manifold) -> list[torch.Tensor]:
    """Fresh parameters at ``points`` with ``.grad`` set to ``grads`` (copies of both)."""
    params = []
    for x, g in zip(points, grads, strict=True):
        p = (
            torch.nn.Parameter(x.clone())
            if manifold is None
            else ManifoldParameter(x.clone(), manifold=manifold)
        )
        p.grad = g.clone()
        params.append(p)
    return params


def step_candidates(kind, points, grads) -> dict[str, torch.optim.Optimizer]:
    """Optimizer name -> an optimizer over its own copy of the parameters."""
    if kind == "euclidean":
        return {
            "torsion Adam": RiemannianAdam(_params(points, grads, None), **ADAM),
            "geoopt Adam": geoopt.optim.RiemannianAdam(_params(points, grads, None), **ADAM),
            "torch Adam foreach": torch.optim.Adam(
                _params(points, grads, None), foreach=True, **ADAM
            ),
            "torch Adam fused": torch.optim.Adam(_params(points, grads, None), fused=True, **ADAM),
        }
    if kind == "stiefel":
        ours, same, default = Stiefel(), geoopt.EuclideanStiefel(), geoopt.Stiefel()
        out = {}
        for name, cls_ours, cls_geoopt, opts in (
            ("Adam", RiemannianAdam, geoopt.optim.RiemannianAdam, ADAM),
            ("SGD momentum", RiemannianSGD, geoopt.optim.RiemannianSGD, SGD),
        ):
            out[f"torsion {name}"] = cls_ours(_params(points, grads, ours), **opts)
            out[f"geoopt {name} (torsion Stiefel)"] = cls_geoopt(
                _params(points, grads, ours), **opts
            )
            out[f"geoopt {name} (EuclideanStiefel)"] = cls_geoopt(
                _params(points, grads, same), **opts
            )
            out[f"geoopt {name} (Stiefel(), canonical)"] = cls_geoopt(
                _params(points, grads, default), **opts
            )
        return out
    ours, theirs = SPDAffineInvariant(), geoopt.SymmetricPositiveDefinite()
    return {
        "torsion Adam": RiemannianAdam(_params(points, grads, ours), **ADAM),
        "geoopt Adam (torsion SPD)": geoopt.optim.RiemannianAdam(
            _params(points, grads, ours), **ADAM
        ),
        "geoopt Adam (geoopt SPD)": geoopt.optim.RiemannianAdam(
            _params(points, grads, theirs), **ADAM
        ),
    }


# (torsion candidate, an anchor that runs the same algorithm with the same retraction and
# transport): geoopt's optimizers on torsion's manifold, and on geoopt's own implementation
# of the same geometry (EuclideanStiefel: QR retraction and projection transport;
# SymmetricPositiveDefinite: the same second-order retraction and parallel transport)
SAME_ALGORITHM = {
    "euclidean": [("torsion Adam", "torch Adam foreach")],
    "stiefel": [
        ("torsion Adam", "geoopt Adam (torsion Stiefel)"),
        ("torsion Adam", "geoopt Adam (EuclideanStiefel)"),
        ("torsion SGD momentum", "geoopt SGD momentum (torsion Stiefel)"),
        ("torsion SGD momentum", "geoopt SGD momentum (EuclideanStiefel)"),
    ],
    "spd": [
        ("torsion Adam", "geoopt Adam (torsion SPD)"),
        ("torsion Adam", "geoopt Adam (geoopt SPD)"),
    ],
}


def check_one_step(kind, points, grads) -> None:
    """One step of torsion's optimizer equals one step of the same algorithm elsewhere."""
    for ours, anchor in SAME_ALGORITHM[kind]:
        candidates = step_candidates(kind, points, grads)
        if "SGD" in ours:
            # geoopt starts the momentum buffer at the raw gradient, torch and torsion at
            # the first Riemannian one; a zero buffer makes geoopt do the same
            opt = candidates[anchor]
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        for name in (ours, anchor):
            candidates[name].step()
        for i, (a, b) in enumerate(
            zip(
                candidates[ours].param_groups[0]["params"],
                candidates[anchor].param_groups[0]["params"],
                strict=True,
            )
        ):
            check_close(f"{kind} {ours} = {anchor}, param {i}", a, b, rtol=1e-5, atol=1e-6)


def optimizer_steps(configs, args) -> list[dict]:
    """Time one step per config ``(kind, shapes, label)``: one parameter per shape."""
    records = []
    for kind, shapes, label in configs:
        gen = torch.Generator().manual_seed(SEED)
        points = _points(kind, shapes, gen)
        raw = [torch.randn(shape, generator=gen) for shape in shapes]
        if kind == "stiefel":
            grads = [Stiefel().proju(x, g) for x, g in zip(points, raw, strict=True)]
        elif kind == "spd":
            grads = [(g + g.mT) / 2 for g in raw]
        else:
            grads = raw
        points = [x.to(args.device) for x in points]
        grads = [g.to(args.device) for g in grads]
        check_one_step(kind, points, grads)
        candidates = step_candidates(kind, points, grads)
        timings = time_fns(
            {name: opt.step for name, opt in candidates.items()},
            warmup=args.warmup,
            repeats=args.repeats,
            device=args.device,
        )
        for name, opt in candidates.items():  # the iterates stayed valid over the repeats
            for last in (p.detach() for p in opt.param_groups[0]["params"]):
                if not bool(torch.isfinite(last).all()):
                    raise CorrectnessError(f"{label} {name}: non-finite parameters after timing")
                if kind == "spd" and not bool((torch.linalg.eigvalsh(last) > 0).all()):
                    raise CorrectnessError(f"{label} {name}: left the SPD cone during timing")
        ms = {name: t.median_ms for name, t in timings.items()}
        records.append({"parameters": label, "count": len(shapes), "ms": ms})
        print(f"{label}: " + ", ".join(f"{m} {fmt_ms(t)}" for m, t in ms.items()), flush=True)
    return records


def steps_table(records: list[dict], env: dict) -> str:
    headers = ["parameters", "optimizer", "ms / step", "vs torsion"]
    rows = []
    for r in records:
        ms = r["ms"]
        for name, t in ms.items():
            reference = "torsion SGD momentum" if "SGD" in name else "torsion Adam"
            rows.append(
                [
                    r["parameters"],
                    name,
                    fmt_ms(t),
                    "" if name == reference else fmt_ratio(ratio(t, ms[reference])),
                ]
            )
    on_cpu = env["device"] == "cpu"
    where = f"CPU, {env['threads']} threads" if on_cpu else env["device_name"]
    return (
        f"One optimizer step, float32, {where}, gradients fixed, median ms "
        "(vs torsion = other / torsion: > 1 means torsion is faster).\n\n"
        + render_table(headers, rows)
    )


# ---------------------------------------------------------------------------------------
# minimize vs pymanopt
# ---------------------------------------------------------------------------------------


def dominant_subspace(n: int, p: int, gen) -> dict:
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    a = (a + a.mT) / 2
    an = a.numpy()
    return {
        "name": f"dominant subspace, Grassmann({n}, {p})",
        "torsion_manifold": Grassmann(),
        "x0": Grassmann().random(n, p, dtype=torch.float64, generator=gen),
        "fun": lambda x: -torch.trace(x.mT @ a @ x),
        "pymanopt_manifold": PymanoptGrassmann(n, p),
        "cost": lambda x: -np.trace(x.T @ an @ x),
        "egrad": lambda x: -2 * an @ x,
        "ehess": lambda x, u: -2 * an @ u,
        "backend": "numpy, hand-written gradient and Hessian",
    }


def procrustes(n: int, p: int, m: int, gen) -> dict:
    a = torch.randn(m, n, dtype=torch.float64, generator=gen)
    b = torch.randn(m, p, dtype=torch.float64, generator=gen)
    an, bn = a.numpy(), b.numpy()
    return {
        "name": f"Procrustes, Stiefel({n}, {p}), A {m}x{n}",
        "torsion_manifold": Stiefel(),
        "x0": Stiefel().random(n, p, dtype=torch.float64, generator=gen),
        "fun": lambda x: 0.5 * ((a @ x - b) ** 2).sum(),
        "pymanopt_manifold": PymanoptStiefel(n, p),
        "cost": lambda x: 0.5 * np.sum((an @ x - bn) ** 2),
        "egrad": lambda x: an.T @ (an @ x - bn),
        "ehess": lambda x, u: an.T @ (an @ u),
        "backend": "numpy, hand-written gradient and Hessian",
    }


def karcher_mean(count: int, n: int, gen) -> dict:
    manifold = SPDAffineInvariant()
    points = manifold.random(count, n, n, dtype=torch.float64, generator=gen)

    def fun(x):
        return 0.5 * manifold.dist2(x, points).sum() / count

    grad = torch.func.grad(fun)

    def egrad(x):
        return grad(torch.from_numpy(x)).numpy()

    def ehess(x, u):
        return torch.func.jvp(grad, (torch.from_numpy(x),), (torch.from_numpy(u),))[1].numpy()

    return {
        "name": f"Karcher mean of {count} SPD({n})",
        "torsion_manifold": manifold,
        "x0": points.mean(dim=0),
        "fun": fun,
        "pymanopt_manifold": PymanoptSPD(n),
        "cost": lambda x: float(fun(torch.from_numpy(x))),
        "egrad": egrad,
        "ehess": ehess,
        "backend": "numpy callables; gradient and Hessian from torch.func",
    }


PYMANOPT_OPTIMIZERS = {"trust-region": TrustRegions, "cg": ConjugateGradient}
# (row label, torsion method, torsion options); each row is compared with pymanopt's method.
# pymanopt's vector transport on these manifolds is the projection, torsion's default
# parallel transport where the manifold has it (Grassmann, SPD): the last row is CG with
# the transport pymanopt uses.
TORSION_METHODS = (
    ("trust-region", "trust-region", {}),
    ("cg", "cg", {}),
    ("cg, projection transport", "cg", {"transport": "projection"}),
)


def run_torsion(problem: dict, method: str, max_iter: int, options: dict | None = None) -> dict:
    start = time.perf_counter()
    result = minimize(
        problem["fun"],
        problem["x0"],
        problem["torsion_manifold"],
        method=method,
        tol=TOL,
        max_iter=max_iter,
        **(options or {}),
    )
    seconds = time.perf_counter() - start
    return {
        "nit": result.nit,
        "grad_norm": result.grad_norm,
        "fun": result.fun,
        "success": result.success,
        "s": seconds,
        "history": {"grad_norm": result.history["grad_norm"], "time": result.history["time"]},
    }


def run_pymanopt(problem: dict, method: str, max_iter: int) -> dict:
    manifold = problem["pymanopt_manifold"]
    wrap = pymanopt.function.numpy(manifold)
    pm_problem = pymanopt.Problem(
        manifold,
        wrap(problem["cost"]),
        euclidean_gradient=wrap(problem["egrad"]),
        euclidean_hessian=wrap(problem["ehess"]),
    )
    optimizer = PYMANOPT_OPTIMIZERS[method](
        verbosity=0, min_gradient_norm=TOL, max_iterations=max_iter, max_time=3600
    )
    start = time.perf_counter()
    result = optimizer.run(pm_problem, initial_point=problem["x0"].numpy())
    seconds = time.perf_counter() - start
    return {
        "nit": result.iterations,
        "grad_norm": float(result.gradient_norm),
        "fun": float(result.cost),
        "success": float(result.gradient_norm) <= TOL,
        "s": seconds,
        "stop": result.stopping_criterion,
    }


def minimize_runs(problems: list[dict], methods, max_iter: int) -> list[dict]:
    records = []
    for problem in problems:
        pymanopt_runs: dict[str, dict] = {}  # one pymanopt run per method and problem
        for label, method, options in methods:
            # warm-up (first-call overheads), then the runs, alternating torsion / pymanopt
            run_torsion(problem, method, 2, options)
            if method not in pymanopt_runs:
                run_pymanopt(problem, method, 2)
            ours = run_torsion(problem, method, max_iter, options)
            if method not in pymanopt_runs:
                pymanopt_runs[method] = run_pymanopt(problem, method, max_iter)
            theirs = pymanopt_runs[method]
            if not ours["success"]:
                raise CorrectnessError(
                    f"{problem['name']} {label} torsion: gradient norm "
                    f"{ours['grad_norm']:.3g} > {TOL:g} after {ours['nit']} iterations"
                )
            # pymanopt may stop short of the tolerance (its line search's minimum step
            # size); that is recorded, not raised: the table says so
            scale = max(1.0, abs(theirs["fun"]))
            if theirs["success"] and abs(ours["fun"] - theirs["fun"]) > 1e-8 * scale:
                raise CorrectnessError(
                    f"{problem['name']} {label}: torsion cost {ours['fun']!r} != pymanopt "
                    f"cost {theirs['fun']!r}"
                )
            # where pymanopt stops short, how long torsion took to its final gradient norm
            ours["s_to_pymanopt_grad_norm"] = next(
                (
                    t
                    for t, g in zip(
                        ours["history"]["time"], ours["history"]["grad_norm"], strict=True
                    )
                    if g <= theirs["grad_norm"]
                ),
                ours["s"],
            )
            records.append(
                {
                    "problem": problem["name"],
                    "method": label,
                    "pymanopt_backend": problem["backend"],
                    "torsion": ours,
                    "pymanopt": theirs,
                }
            )
            print(
                f"{problem['name']} {label}: torsion {ours['nit']} it {ours['s']:.3f} s, "
                f"pymanopt {theirs['nit']} it {theirs['s']:.3f} s ({theirs['stop']})",
                flush=True,
            )
    return records


def minimize_table(records: list[dict]) -> str:
    headers = [
        "problem",
        "method",
        "torsion it",
        "torsion grad norm",
        "torsion s",
        "pymanopt it",
        "pymanopt grad norm",
        "pymanopt s",
        "pymanopt / torsion",
        "torsion s to pymanopt's grad norm",
        "pymanopt / torsion, same grad norm",
    ]
    rows = [
        [
            r["problem"],
            r["method"],
            r["torsion"]["nit"],
            f"{r['torsion']['grad_norm']:.1e}",
            f"{r['torsion']['s']:.3g}",
            r["pymanopt"]["nit"],
            f"{r['pymanopt']['grad_norm']:.1e}",
            f"{r['pymanopt']['s']:.3g}",
            fmt_ratio(ratio(r["pymanopt"]["s"], r["torsion"]["s"]))
            if r["pymanopt"]["success"]
            else "stopped short",
            f"{r['torsion']['s_to_pymanopt_grad_norm']:.3g}",
            fmt_ratio(ratio(r["pymanopt"]["s"], r["torsion"]["s_to_pymanopt_grad_norm"])),
        ]
        for r in records
    ]
    return (
        f"minimize to a Riemannian gradient norm of {TOL:g}, float64, one run each "
        "(after a short warm-up), seconds (ratio > 1: torsion faster; no ratio where "
        "pymanopt stopped before the tolerance, at its minimum step size; the last two "
        "columns time torsion to the gradient norm pymanopt ended at).\n\n"
        + render_table(headers, rows)
    )


def main() -> int:
    args = parse_args(__doc__)
    env = setup(args)
    print(environment_line(env), flush=True)
    gen = torch.Generator().manual_seed(SEED)
    if args.quick:
        count = 20
        configs = [
            ("euclidean", [(16, 16)] * count, f"{count} x 16x16"),
            ("stiefel", [(32, 4)] * count, f"{count} x St(32, 4)"),
            ("spd", [(8, 8)] * count, f"{count} x SPD(8)"),
            ("stiefel", LAYER_SHAPES[:3], "St(16, 2), St(32, 4), St(64, 8)"),
        ]
        problems = [dominant_subspace(200, 5, gen), procrustes(50, 5, 100, gen)]
        problems.append(karcher_mean(20, 5, gen))
    else:
        count = 200
        configs = [
            ("euclidean", [(64, 64)] * count, f"{count} x 64x64"),
            ("stiefel", [(256, 32)] * count, f"{count} x St(256, 32)"),
            ("spd", [(32, 32)] * count, f"{count} x SPD(32)"),
            ("stiefel", LAYER_SHAPES, "5 layers, St(16, 2) ... St(256, 32)"),
            ("stiefel", [(32, 4)], "1 x St(32, 4)"),
        ]
        problems = [dominant_subspace(2000, 10, gen), procrustes(500, 50, 1000, gen)]
        problems.append(karcher_mean(200, 20, gen))
    steps = optimizer_steps(configs, args)
    tables = [steps_table(steps, env)]
    runs = []
    if args.device == "cpu":  # pymanopt runs on NumPy only
        runs = minimize_runs(problems, TORSION_METHODS, max_iter=5000)
        tables.append(minimize_table(runs))
    table = "\n\n".join(tables)
    print()
    print(table)
    print()
    print(environment_line(env))
    records = [{"steps": steps}, {"minimize": runs}]
    json_path, md_path = write_results("optim", args, env, records, table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
