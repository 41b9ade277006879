"""Curvature: torsion's HVP engine and probes vs PyHessian and curvlinops, in one run.

Three measurements (issue 4, TARGETS.md section 4), float32 on the CPU (with ``--device
cuda``: the correctness checks and the HVP cost table only, on the GPU):

* **HVP cost** relative to one gradient (forward+backward of the same loss on the same
  batch, ``torch.autograd.grad``), on an MLP (about 1.1M parameters), a small CNN and a
  small GNN (two PyG ``GCNConv`` layers on a random stochastic-block-model graph; the
  graph is a buffer of the module, so every library sees a plain ``model(x)`` call).
  torsion: ``HessianOperator(...) @ v`` inside a probe loop (the gradient graph is built
  at the first product and reused), and per vector for a block of 8 through ``matmat``:
  on the reused graph, one-shot (a fresh operator per block, graph built inside the
  timing), and vmapped reverse-over-reverse (``method="reverse_over_reverse"``).
  PyHessian: ``pyhessian.utils.hessian_vector_product`` on the graph its ``hessian``
  object builds (what its power iteration and Hutchinson loops call). curvlinops:
  ``HessianLinearOperator @ v`` and ``@ V`` (vmapped forward-over-reverse, fresh each
  call). Targets: torsion <= 1.5x a gradient in the probe loop, <= 2x per vector for a
  block of 8.
* **Top eigenvalues**: products and wall time to the top eigenvalue within 1e-3 relative
  error. torsion ``eigsh(k=1, tol=1e-3)`` (its default eigenvalue-accuracy stop: the
  Kato-Temple estimate ``||r||^2 / gap``, or ``||r||`` where no gap can be trusted, at most
  ``1e-3 |theta|``; the residual stop ``criterion="residual"`` is run too) against
  PyHessian's power iteration (``eigenvalues()``, default
  ``tol=1e-3`` relative change), and SciPy's ARPACK on curvlinops' operator
  (``to_scipy()``, ``tol=1e-3``). For both torsion and PyHessian the products needed with
  an oracle stop (the first product from which the estimate stays within 1e-3 of the
  reference) are reported too. Top-5 likewise (PyHessian: deflated power iteration).
  Target: torsion <= 1/3 of PyHessian's products. The reference is a float64 ``eigsh``
  at ``tol=1e-9`` whose residual is re-checked with an independent float64 double
  backward; on the small model it is checked against dense ``eigvalsh`` as well.
* **Trace**: relative error against the exact trace (dense float64 Hessian of a
  ~2.4k-parameter MLP) for budgets of 12, 30 and 96 products (divisible by 2 and 3, as
  curvlinops' Hutch++ and XTrace require), averaged over seeds: torsion Hutchinson,
  Hutch++, XTrace and ``auto``; PyHessian's Hutchinson (``trace(maxIter=m, tol=0)``: its
  stopping rule disabled so it spends exactly ``m``); curvlinops' ``hutchinson_trace``,
  ``hutchpp_trace`` and ``xtrace``. Plus each library's adaptive stopping rule.

How anchor products are counted: PyHessian's ``hessian`` module calls the
``hessian_vector_product`` it imported from ``pyhessian.utils``; the benchmark replaces
that name in ``sys.modules["pyhessian.hessian"]`` with a wrapper that counts calls and
records the Rayleigh quotient ``v^T H v`` of every (unit) iterate. ARPACK's products are
counted by wrapping the SciPy operator's ``matvec``/``matmat`` (a block of ``j`` counts
``j``); curvlinops' trace estimators spend exactly their budget.

Fairness: all libraries get the same model, the same batch, the same float32 dtype and
the same threads. PyHessian's ``hessian(...)`` leaves a graph-carrying ``.grad`` on every
parameter (a second object would see twice the Hessian) and switches the model to
``eval()``: the benchmark clears ``.grad`` before each construction and restores the mode
after (the models have neither BatchNorm nor dropout, so the mode changes no number).
PyHessian's ``density()`` is not benchmarked: it calls ``torch.eig``, removed from torch.

Correctness is checked before any timing: torsion's, PyHessian's and curvlinops' products
against a float64 double-backward reference on the same vector; on the small model the
dense Hessian (float64, column by column) against torsion's ``to_dense()``.

``--quick`` runs tiny models with one thread unless ``--threads`` says otherwise.

    python benchmarks/bench_curvature.py [--quick] [--out DIR] [--repeats N] [--threads N]
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import curvlinops
import pyhessian
import scipy.sparse.linalg
import torch
from torch import nn
from torch_geometric.nn import GCNConv

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
from torsion.curvature import HessianOperator, eigsh, trace

SEED = 20261124
BLOCK = 8
EIG_RTOL = 1e-3
# Block steps allowed to torsion's eigsh (and restarts to ARPACK): PyHessian's power
# iteration stops after maxIter=100 products per eigenvalue by default.
MAX_STEPS = 100
PYHESSIAN_MODULE = sys.modules["pyhessian.hessian"]


# ---------------------------------------------------------------------------------------
# Problems: model, batch, loss
# ---------------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    description: str

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def criterion() -> nn.Module:
    """The loss every library sees: mean cross-entropy (a module, as curvlinops needs)."""
    return nn.CrossEntropyLoss()


def mixture(n: int, dim: int, classes: int, gen: torch.Generator, noise: float = 1.5):
    """Gaussian-mixture classification data: ``x = mean[y] + noise * N(0, I)``."""
    means = torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return means[y] + noise * torch.randn(n, dim, generator=gen), y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """A few full-batch Adam steps, so the Hessian is that of a partly trained model."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = criterion()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


class GraphConvNet(nn.Module):
    """Two GCNConv layers for node classification on a fixed graph (a buffer)."""

    def __init__(self, edge_index: torch.Tensor, dims: tuple[int, int, int]):
        super().__init__()
        self.register_buffer("edge_index", edge_index)
        self.conv1 = GCNConv(dims[0], dims[1])
        self.conv2 = GCNConv(dims[1], dims[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x, self.edge_index)), self.edge_index)


def sbm_graph(nodes: int, classes: int, degree: int, gen: torch.Generator):
    """Stochastic-block-model graph: each node links to ``degree`` others, 80 % of them in
    its own class; undirected; features are noisy class means."""
    x, y = mixture(nodes, 32, classes, gen, noise=2.0)
    src = torch.arange(nodes).repeat_interleave(degree)
    same = torch.rand(nodes * degree, generator=gen) < 0.8
    random_dst = torch.randint(0, nodes, (nodes * degree,), generator=gen)
    members = [torch.nonzero(y == c).flatten() for c in range(classes)]
    pick = torch.empty(nodes * degree, dtype=torch.long)
    for c, idx in enumerate(members):
        rows = y[src] == c
        pick[rows] = idx[torch.randint(0, len(idx), (int(rows.sum()),), generator=gen)]
    dst = torch.where(same, pick, random_dst)
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    return x, y, edge_index


def make_problems(quick: bool) -> list[Problem]:
    gen = torch.Generator().manual_seed(SEED)
    problems = []
    # MLP, ~1.1M parameters.
    width, dim, batch = (64, 32, 64) if quick else (1024, 64, 256)
    x, y = mixture(batch, dim, 10, gen, noise=3.0)
    torch.manual_seed(SEED)
    mlp = nn.Sequential(
        nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    problems.append(Problem("MLP", mlp, x, y, f"{dim}-{width}-{width}-10 ReLU, batch {batch}"))
    # Small CNN on 1x12x12 images.
    channels, batch = (4, 32) if quick else (16, 256)
    xi, y = mixture(batch, 144, 10, gen, noise=2.0)
    torch.manual_seed(SEED + 1)
    cnn = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 36, 10),
    )
    problems.append(
        Problem(
            "CNN",
            cnn,
            xi.reshape(batch, 1, 12, 12),
            y,
            f"conv{channels}-conv{2 * channels}-pool-linear on 1x12x12, batch {batch}",
        )
    )
    # GNN on a random SBM graph (all nodes are the batch).
    nodes, hidden = (60, 16) if quick else (1000, 128)
    xg, y, edge_index = sbm_graph(nodes, 5, 8, gen)
    torch.manual_seed(SEED + 2)
    gnn = GraphConvNet(edge_index, (32, hidden, 5))
    problems.append(
        Problem(
            "GNN",
            gnn,
            xg,
            y,
            f"GCNConv 32-{hidden}-5 on an SBM graph, {nodes} nodes, {edge_index.shape[1]} edges",
        )
    )
    # The MLP memorises its batch fast; 20 steps leave its loss near 1e-3 with an O(1)
    # sharpness and clustered top eigenvalues (60 would leave lambda_1 ~ 0.05).
    steps = (3, 3, 3) if quick else (20, 60, 60)
    for p, n_steps in zip(problems, steps, strict=True):
        train(p.model, p.x, p.y, n_steps, lr=1e-3)
    return problems


def small_problem(quick: bool, feature_decay: float = 0.0) -> Problem:
    """A ~2.4k-parameter MLP whose dense Hessian is cheap (trace and dense eigenvalues).

    ``feature_decay > 0`` scales input feature ``j`` by ``10 ** (-feature_decay * j / dim)``
    (unnormalised features), which makes a few Hessian eigenvalues dominate.
    """
    gen = torch.Generator().manual_seed(SEED + 3)
    dim, width, batch = (16, 16, 64) if quick else (64, 32, 512)
    x, y = mixture(batch, dim, 10, gen, noise=3.0)
    x = x * torch.logspace(0, -feature_decay, dim)
    torch.manual_seed(SEED + 3)
    model = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, 10))
    train(model, x, y, 10 if quick else 200, lr=1e-2)
    if feature_decay:
        name = "small MLP, decaying features"
        desc = (
            f"{dim}-{width}-10 tanh, batch {batch}, feature j scaled by "
            f"10^(-{feature_decay:g} j/{dim})"
        )
    else:
        name, desc = "small MLP", f"{dim}-{width}-10 tanh, batch {batch}"
    return Problem(name, model, x, y, desc)


# ---------------------------------------------------------------------------------------
# Anchors and references
# ---------------------------------------------------------------------------------------


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def pyhessian_object(problem: Problem) -> pyhessian.hessian:
    """PyHessian's ``hessian`` on the problem, without its side effects on the model.

    Its constructor adds the gradient (with graph) to ``.grad``, so ``.grad`` is cleared
    first (else the Hessian doubles) and after; its ``model.eval()`` is undone.
    """
    model = problem.model
    training = [(m, m.training) for m in model.modules()]
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns of a cycle
        warnings.simplefilter("ignore", UserWarning)
        data = (problem.x, problem.y)
        h = pyhessian.hessian(model, criterion(), data=data, cuda=problem.x.is_cuda)
    model.zero_grad(set_to_none=True)
    for m, flag in training:
        m.training = flag
    return h


def curvlinops_operator(problem: Problem) -> curvlinops.HessianLinearOperator:
    return curvlinops.HessianLinearOperator(
        problem.model, criterion(), params_of(problem.model), [(problem.x, problem.y)]
    )


def torsion_operator(problem: Problem, **kw) -> HessianOperator:
    return HessianOperator(problem.model, criterion(), (problem.x, problem.y), **kw)


def float64_copy(problem: Problem) -> Problem:
    return Problem(
        problem.name,
        copy.deepcopy(problem.model).double(),
        problem.x.double(),
        problem.y,
        problem.description,
    )


class ReferenceHVP:
    """float64 Hessian products by plain double backward (independent of torsion)."""

    def __init__(self, problem: Problem):
        p64 = float64_copy(problem)
        self.params = params_of(p64.model)
        loss = criterion()(p64.model(p64.x), p64.y)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for flat ``v`` of shape (n,) or (n, k)."""
        block = v.ndim == 2
        v = v.double() if block else v.double()[:, None]
        sizes = [p.numel() for p in self.params]
        pieces = [
            c.mT.reshape(v.shape[1], *p.shape)
            for c, p in zip(v.split(sizes), self.params, strict=True)
        ]
        hv = torch.autograd.grad(
            self.grads, self.params, pieces, retain_graph=True, is_grads_batched=True
        )
        flat = torch.cat([h.reshape(v.shape[1], -1) for h in hv], dim=1).mT
        return flat if block else flat[:, 0]

    def dense(self, chunk: int = 256) -> torch.Tensor:
        n = sum(p.numel() for p in self.params)
        eye = torch.eye(n, dtype=torch.float64, device=self.params[0].device)
        return torch.cat([self(eye[:, i : i + chunk]) for i in range(0, n, chunk)], dim=1)


def unflat(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    pieces = flat.split([p.numel() for p in params])
    return [c.reshape(p.shape) for c, p in zip(pieces, params, strict=True)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def check_products(problem: Problem, reference: ReferenceHVP) -> dict[str, float]:
    """Every library's ``H v`` against the float64 reference; raises if off.

    torsion's operator on a float64 copy of the model must match to 1e-10 (relative
    2-norm and elementwise within ``1e-10 (|ref| + max|ref|)``; an exact check of its code
    path). The float32 products of all libraries must be within ``1e-2 (|ref| + max|ref|)``
    elementwise and 1e-2 in relative 2-norm: on
    the trained MLP, ``H v`` of a random ``v`` is ~1e-5 ``||v||`` while ``lambda_max`` is
    O(1), so float32 rounding alone costs ~1e-3 relative (PyHessian and curvlinops
    alike). Returns the relative 2-norm errors.
    """
    gen = torch.Generator().manual_seed(SEED + 7)
    n = problem.num_params
    v = torch.randn(n, generator=gen).to(problem.x.device)
    V = torch.randn(n, BLOCK, generator=gen).to(problem.x.device)
    ref, ref_block = reference(v), reference(V)
    params = params_of(problem.model)
    h = pyhessian_object(problem)
    cl = curvlinops_operator(problem)
    op64 = torsion_operator(float64_copy(problem))
    candidates = {
        "torsion float64 H @ v": (op64 @ v.double(), 1e-10),
        "torsion float64 matmat": (op64.matmat(V.double()), 1e-10),
        "torsion H @ v": (torsion_operator(problem) @ v, 1e-2),
        "torsion matmat (graph reuse)": (torsion_operator(problem).matmat(V), 1e-2),
        "torsion matmat (rev-over-rev)": (
            torsion_operator(problem, method="reverse_over_reverse").matmat(V),
            1e-2,
        ),
        "PyHessian hvp": (
            flat(pyhessian.utils.hessian_vector_product(h.gradsH, h.params, unflat(v, params))),
            1e-2,
        ),
        "curvlinops H @ v": (cl @ v, 1e-2),
        "curvlinops H @ V": (cl @ V, 1e-2),
    }
    errors = {}
    for name, (value, norm_tol) in candidates.items():
        expected = ref_block if value.ndim == 2 else ref
        label = f"{problem.name}: {name}"
        scale = float(expected.abs().max())
        check_close(label, value, expected, rtol=norm_tol, atol=norm_tol * scale)
        norm_err = float((value.double() - expected).norm() / expected.norm())
        if norm_err > norm_tol:
            raise CorrectnessError(f"{label}: relative 2-norm error {norm_err:.2e} > {norm_tol}")
        errors[name] = norm_err
    return errors


# ---------------------------------------------------------------------------------------
# 1. HVP cost relative to one gradient
# ---------------------------------------------------------------------------------------


SINGLE = ("torsion probe loop", "PyHessian", "curvlinops")
BLOCKED = (
    "torsion block (graph reuse)",
    "torsion block (one-shot)",
    "torsion block (rev-over-rev)",
    "curvlinops block",
)


def hvp_cost(problem: Problem, args) -> dict:
    """Median times of one gradient and of the products, in two interleaved groups.

    Single products and blocks are timed in separate round-robin groups, each with its
    own gradient timing: a block call allocates ~8x the memory of a single product, and
    timing them in one rotation would charge the page faults of its freed memory to
    whichever single product runs next.
    """
    model, x, y, loss_fn = problem.model, problem.x, problem.y, criterion()
    params = params_of(model)
    gen = torch.Generator().manual_seed(SEED + 11)
    n = problem.num_params
    v = torch.randn(n, generator=gen).to(problem.x.device)
    V = torch.randn(n, BLOCK, generator=gen).to(problem.x.device)
    v_list = unflat(v, params)

    op = torsion_operator(problem)
    op @ v  # builds the gradient graph, as the first product of a probe loop does
    h = pyhessian_object(problem)
    cl = curvlinops_operator(problem)

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(x), y), params)

    single: dict[str, Callable[[], object]] = {
        "gradient": gradient,
        "torsion probe loop": lambda: op @ v,
        "PyHessian": lambda: pyhessian.utils.hessian_vector_product(h.gradsH, h.params, v_list),
        "curvlinops": lambda: cl @ v,
    }
    blocked: dict[str, Callable[[], object]] = {
        "gradient": gradient,
        "torsion block (graph reuse)": lambda: op.matmat(V),
        "torsion block (one-shot)": lambda: torsion_operator(problem).matmat(V),
        "torsion block (rev-over-rev)": lambda: torsion_operator(
            problem, method="reverse_over_reverse"
        ).matmat(V),
        "curvlinops block": lambda: cl @ V,
    }
    record = {"model": problem.name, "description": problem.description, "params": n}
    for group, fns in (("single", single), ("block", blocked)):
        timings = time_fns(fns, warmup=args.warmup, repeats=args.repeats, device=args.device)
        divisor = 1 if group == "single" else BLOCK
        record[group] = {
            "timings": timings,
            "gradient_ms": timings["gradient"].median_ms,
            "per_vector_ms": {
                k: t.median_ms / divisor for k, t in timings.items() if k != "gradient"
            },
        }
    in_gradients = {
        k: ms / record[group]["gradient_ms"]
        for group in ("single", "block")
        for k, ms in record[group]["per_vector_ms"].items()
    }
    record["in_gradients"] = in_gradients
    print(
        f"{problem.name} ({n} params): gradient {fmt_ms(record['single']['gradient_ms'])} ms; "
        "per vector / gradient: " + ", ".join(f"{k} {r:.2f}" for k, r in in_gradients.items()),
        flush=True,
    )
    return record


def hvp_table(records: list[dict]) -> str:
    models = "; ".join(f"{r['model']}: {r['description']}" for r in records)
    headers = ["model", "params", "gradient ms", *(f"{m} ms" for m in SINGLE)]
    headers += [f"{m} / gradient" for m in SINGLE]
    headers += ["PyHessian / torsion", "curvlinops / torsion"]
    rows = []
    for r in records:
        ms = r["single"]["per_vector_ms"]
        rows.append(
            [
                r["model"],
                r["params"],
                fmt_ms(r["single"]["gradient_ms"]),
                *(fmt_ms(ms[m]) for m in SINGLE),
                *(fmt_ratio(r["in_gradients"][m]) for m in SINGLE),
                fmt_ratio(ratio(ms["PyHessian"], ms["torsion probe loop"])),
                fmt_ratio(ratio(ms["curvlinops"], ms["torsion probe loop"])),
            ]
        )
    single = (
        "One Hessian-vector product, median ms and in units of one gradient (forward+backward "
        "of the same loss on the same batch, timed in the same rotation); anchor / torsion "
        "> 1: torsion faster. torsion and PyHessian reuse the gradient graph of the batch "
        f"(a probe loop); curvlinops builds its product afresh each call. Models: {models}."
        "\n\n" + render_table(headers, rows)
    )
    headers = ["model", "gradient ms", *(f"{m} / gradient" for m in BLOCKED)]
    headers += ["curvlinops block / torsion one-shot"]
    rows = []
    for r in records:
        ms = r["block"]["per_vector_ms"]
        rows.append(
            [
                r["model"],
                fmt_ms(r["block"]["gradient_ms"]),
                *(fmt_ratio(r["in_gradients"][m]) for m in BLOCKED),
                fmt_ratio(ratio(ms["curvlinops block"], ms["torsion block (one-shot)"])),
            ]
        )
    blocked = (
        f"A block of {BLOCK} vectors through one matmat call, time per vector in gradients. "
        "torsion: graph reuse = the operator's gradient graph already built; one-shot = a "
        "fresh HessianOperator per block (default method, graph built inside the timing); "
        "rev-over-rev = method='reverse_over_reverse' (vmapped torch.func, fresh each call). "
        "curvlinops: vmapped forward-over-reverse.\n\n" + render_table(headers, rows)
    )
    return single + "\n\n" + blocked


# ---------------------------------------------------------------------------------------
# 2. Top eigenvalues
# ---------------------------------------------------------------------------------------


class PowerIterationRecorder:
    """Counts PyHessian's products and records the Rayleigh quotient of each iterate.

    Installed by replacing ``hessian_vector_product`` in ``pyhessian.hessian``'s
    namespace (where ``eigenvalues`` and ``trace`` look it up) for the ``with`` block.
    """

    def __init__(self):
        self.quotients: list[float] = []

    def __enter__(self) -> PowerIterationRecorder:
        self._original = PYHESSIAN_MODULE.hessian_vector_product

        def counted(grads, params, v):
            hv = self._original(grads, params, v)
            quotient = sum(float((a * b).sum()) for a, b in zip(hv, v, strict=True))
            norm2 = sum(float((b * b).sum()) for b in v)
            self.quotients.append(quotient / norm2)
            return hv

        PYHESSIAN_MODULE.hessian_vector_product = counted
        return self

    def __exit__(self, *exc) -> None:
        PYHESSIAN_MODULE.hessian_vector_product = self._original

    @property
    def products(self) -> int:
        return len(self.quotients)


def rel_err(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / abs(exact)


def products_to_stay_within(quotients: list[float], exact: float, rtol: float) -> int | None:
    """Products after which every later estimate is within ``rtol`` (None if never)."""
    last_bad = -1
    for i, q in enumerate(quotients):
        if rel_err(q, exact) > rtol:
            last_bad = i
    return None if last_bad == len(quotients) - 1 else last_bad + 2


def reference_eigenvalues(problem: Problem, reference: ReferenceHVP, k: int) -> torch.Tensor:
    """Top-``k`` eigenvalues by a float64 ``eigsh`` with the residual stop at tol 1e-9.

    Each residual ``||H y - theta y||`` is recomputed with ``reference`` (independent
    double backward) and must be below ``1e-7 lambda_1``: then every ``theta`` is within
    ``1e-7 lambda_1`` of an eigenvalue. (That they are the *top* ones is checked later:
    no Rayleigh quotient of PyHessian's iterates may exceed ``theta_1``.)
    """
    p64 = float64_copy(problem)
    res = eigsh(
        torsion_operator(p64),
        k=k,
        tol=1e-9,
        criterion="residual",  # the rigorous residual certificate, checked below
        generator=torch.Generator().manual_seed(SEED),
        max_iter=2000,
    )
    if not res.converged:
        raise CorrectnessError(f"{problem.name}: reference eigsh did not converge")
    residual = reference(res.eigenvectors) - res.eigenvectors * res.eigenvalues
    worst = float(torch.linalg.vector_norm(residual, dim=0).max())
    if worst > 1e-7 * float(res.eigenvalues[0]):
        raise CorrectnessError(f"{problem.name}: reference eigenpair residual {worst:.2e}")
    return res.eigenvalues


def torsion_oracle_products(op, exact: float, seed: int, limit: int) -> int | None:
    """Fewest products after which eigsh's estimate is within EIG_RTOL: eigsh is run with
    ``max_iter = 1, 2, ...`` steps (same start), so its estimate after each step is seen
    (an unreachable tol, so no stopping rule intervenes; its rounding-floor warning is
    silenced)."""
    for steps in range(1, limit + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = eigsh(
                op,
                k=1,
                tol=1e-12,
                max_iter=steps,
                criterion="residual",
                generator=torch.Generator().manual_seed(seed),
            )
        if rel_err(float(res.eigenvalues[0]), exact) <= EIG_RTOL:
            return res.matvecs
    return None


def torsion_eigsh(op, k: int, seed: int, **kw):
    return eigsh(
        op,
        k=k,
        tol=EIG_RTOL,
        max_iter=MAX_STEPS,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def arpack(problem: Problem, k: int) -> tuple[int, torch.Tensor, bool]:
    """SciPy ARPACK (``eigsh(which="LA", tol=1e-3)``) on curvlinops' operator: products,
    eigenvalues (descending; those converged if it did not), converged."""
    import numpy as np

    linop = curvlinops_operator(problem).to_scipy(np.float32)
    count = [0]

    def matmat(x):
        x2 = x.reshape(x.shape[0], -1)
        count[0] += x2.shape[1]
        return linop.matmat(x2).reshape(x.shape)

    counted = scipy.sparse.linalg.LinearOperator(
        linop.shape, matvec=matmat, matmat=matmat, dtype=np.float32
    )
    rng = np.random.default_rng(SEED)
    v0 = rng.standard_normal(linop.shape[0]).astype(np.float32)
    try:
        values = scipy.sparse.linalg.eigsh(
            counted,
            k=k,
            which="LA",
            tol=EIG_RTOL,
            v0=v0,
            maxiter=MAX_STEPS,
            return_eigenvectors=False,
        )
        converged = True
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        values, converged = error.eigenvalues, False
    values = torch.from_numpy(np.sort(values)[::-1].copy())
    return count[0], values, converged


def eigen_records(problem: Problem, exact: torch.Tensor, args, seeds) -> dict:
    """Top-1 products/errors over ``seeds``, wall times, and top-5 (first seed).

    Each run is ``(products, relative error, stopped by its own rule)``.
    """
    lam1 = float(exact[0])
    op = torsion_operator(problem)
    oracle_limit = 15 if args.quick else 40  # eigsh steps scanned for the oracle stop
    rec: dict = {"model": problem.name, "params": problem.num_params}
    rec["oracle_limit"] = {"torsion": oracle_limit, "PyHessian": MAX_STEPS}
    rec["exact_top5"] = exact.tolist()
    runs: dict[str, list] = {"torsion": [], "torsion residual": [], "PyHessian": []}
    oracles: dict[str, list] = {"torsion": [], "PyHessian": []}
    estimates = []  # torsion's own relative error estimate (error_estimates / theta)
    for seed in seeds:
        res = torsion_eigsh(op, 1, seed)
        runs["torsion"].append(
            (res.matvecs, rel_err(float(res.eigenvalues[0]), lam1), res.converged)
        )
        estimates.append(float(res.error_estimates[0] / res.eigenvalues[0].abs()))
        res = torsion_eigsh(op, 1, seed, criterion="residual")
        runs["torsion residual"].append(
            (res.matvecs, rel_err(float(res.eigenvalues[0]), lam1), res.converged)
        )
        oracles["torsion"].append(torsion_oracle_products(op, lam1, seed, oracle_limit))
        h = pyhessian_object(problem)
        torch.manual_seed(seed)
        with PowerIterationRecorder() as default:
            values, _ = h.eigenvalues(maxIter=MAX_STEPS, tol=EIG_RTOL, top_n=1)
        runs["PyHessian"].append(
            (default.products, rel_err(values[0], lam1), default.products < MAX_STEPS)
        )
        torch.manual_seed(seed)  # the same start, run to the end: tol=0 never stops early
        with PowerIterationRecorder() as long:
            h.eigenvalues(maxIter=MAX_STEPS, tol=0.0, top_n=1)
        if max(long.quotients) > lam1 * (1 + 1e-4):  # a Rayleigh quotient is <= lambda_max
            raise CorrectnessError(f"{problem.name}: reference lambda_1 = {lam1} is too low")
        oracles["PyHessian"].append(products_to_stay_within(long.quotients, lam1, EIG_RTOL))
    products, values, converged = arpack(problem, 1)
    runs["ARPACK"] = [(products, rel_err(float(values[0]), lam1), converged)]
    rec["runs"], rec["oracles"], rec["estimates"] = runs, oracles, estimates

    # Wall time (building the operator / PyHessian object included): every start in turn,
    # so the time reflects the typical product counts, not those of one start.
    pyhessian_to_target = [v or MAX_STEPS for v in oracles["PyHessian"]]

    def run_torsion() -> None:
        for seed in seeds:
            torsion_eigsh(torsion_operator(problem), 1, seed)

    def run_pyhessian(max_iters: list[int], tol: float) -> Callable[[], None]:
        def run() -> None:
            for seed, max_iter in zip(seeds, max_iters, strict=True):
                torch.manual_seed(seed)
                pyhessian_object(problem).eigenvalues(maxIter=max_iter, tol=tol, top_n=1)

        return run

    timings = time_fns(
        {
            "torsion": run_torsion,
            "PyHessian default": run_pyhessian([MAX_STEPS] * len(seeds), EIG_RTOL),
            "PyHessian to 1e-3": run_pyhessian(pyhessian_to_target, 0.0),
        },
        warmup=1,
        repeats=max(3, args.repeats // 4),
    )
    rec["ms"] = {k: t.median_ms for k, t in timings.items()}

    # Top-5, first seed.
    seed = seeds[0]
    top5 = {}
    for label, kw in (("torsion block 5", {}), ("torsion block 1", {"block_size": 1})):
        res = torsion_eigsh(op, 5, seed, **kw)
        top5[label] = (res.matvecs, max_rel_err(res.eigenvalues, exact), res.converged)
    h = pyhessian_object(problem)
    torch.manual_seed(seed)
    with PowerIterationRecorder() as five:
        values, _ = h.eigenvalues(maxIter=MAX_STEPS, tol=EIG_RTOL, top_n=5)
    top5["PyHessian"] = (five.products, max_rel_err(torch.tensor(values), exact), None)
    products, values, converged = arpack(problem, 5)
    top5["ARPACK"] = (products, max_rel_err(values, exact), converged)
    rec["top5"] = top5
    print(
        f"{problem.name} top-1 (products, error, converged): {runs}; oracle {oracles}; "
        f"ms {rec['ms']}; top-5 {top5}",
        flush=True,
    )
    return rec


def max_rel_err(values: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest relative error of the sorted ``values`` against the leading ``exact``."""
    got = torch.sort(values.double(), descending=True).values
    want = exact[: len(got)]
    return float(((got - want) / want.abs()).abs().max())


def fmt_products(products: int, converged: bool | None) -> str:
    return f"{products:g}" if converged in (True, None) else f"{products:g}, not converged"


def fmt_oracle(values: list[int | None], limit: int) -> str:
    if any(v is None for v in values):
        return f"> {limit} ({sum(v is None for v in values)} of {len(values)})"
    return f"{statistics.median(values):g}"


def eigen_table(records: list[dict], seeds) -> str:
    headers = [
        "model",
        "lambda_1",
        "lambda_2 / lambda_1",
        "torsion products",
        "torsion max err",
        "torsion max estimate",
        "torsion oracle",
        "torsion residual-rule products",
        "torsion residual-rule max err",
        "PyHessian products",
        "PyHessian max err",
        "PyHessian oracle",
        "ARPACK products",
        "ARPACK err",
        "torsion / PyHessian oracle",
        "torsion oracle / PyHessian oracle",
        "torsion ms",
        "PyHessian default ms",
        "PyHessian to 1e-3 ms",
        "PyHessian to 1e-3 / torsion",
    ]
    rows = []
    for r in records:
        row = [r["model"], f"{r['exact_top5'][0]:.4g}"]
        row.append(f"{r['exact_top5'][1] / r['exact_top5'][0]:.3f}")
        for name in ("torsion", "torsion residual", "PyHessian"):
            runs = r["runs"][name]
            products = statistics.median(p for p, _, _ in runs)
            row += [
                fmt_products(products, all(c for _, _, c in runs)),
                f"{max(e for _, e, _ in runs):.1e}",
            ]
            if name == "torsion":
                row.append(f"{max(r['estimates']):.1e}")
            if name != "torsion residual":
                row.append(fmt_oracle(r["oracles"][name], r["oracle_limit"][name]))
        products, err, converged = r["runs"]["ARPACK"][0]
        row += [fmt_products(products, converged), f"{err:.1e}"]
        t_products = statistics.median(p for p, _, _ in r["runs"]["torsion"])
        t_oracle = statistics.median(v or math.inf for v in r["oracles"]["torsion"])
        pyh_oracle = r["oracles"]["PyHessian"]
        if any(v is None for v in pyh_oracle):
            bound = r["oracle_limit"]["PyHessian"]
            row += [f"< {t_products / bound:.2f}", f"< {t_oracle / bound:.2f}"]
        else:
            pyh = statistics.median(pyh_oracle)
            row += [f"{t_products / pyh:.2f}", f"{t_oracle / pyh:.2f}"]
        ms = r["ms"]
        row += [
            fmt_ms(ms["torsion"]),
            fmt_ms(ms["PyHessian default"]),
            fmt_ms(ms["PyHessian to 1e-3"]),
            fmt_ratio(ratio(ms["PyHessian to 1e-3"], ms["torsion"])),
        ]
        rows.append(row)
    top1 = (
        f"Top eigenvalue to {EIG_RTOL:g} relative error: products (median over {len(seeds)} "
        "random starts) and the largest relative error. torsion: eigsh(k=1, tol=1e-3), whose "
        "eigenvalue-accuracy stop (Kato-Temple with a Ritz-value gap estimate, else the "
        "residual bound) certifies the 1e-3; 'max estimate' is the largest relative error it "
        "reported (error_estimates / theta); the residual rule (criterion='residual', "
        "||r|| <= 1e-3 |theta|) for comparison; PyHessian: eigenvalues(maxIter=100, tol=1e-3), "
        "which stops when the estimate changes by less than 1e-3; ARPACK: scipy "
        "eigsh(which='LA', tol=1e-3) on curvlinops' operator (one start). Oracle: the "
        "products after which the estimate stays within 1e-3 of the reference (a stopping "
        "rule no method has). torsion / PyHessian oracle: torsion's certified count over "
        "PyHessian's oracle count (target <= 0.33); '<' where PyHessian never got there. "
        f"Wall time (ms): all {len(seeds)} starts in turn, building the operator or PyHessian "
        "object included; 'PyHessian to 1e-3' runs exactly its oracle count on each start.\n\n"
        + render_table(headers, rows)
    )
    methods = ["torsion block 5", "torsion block 1", "PyHessian", "ARPACK"]
    headers5 = ["model", "lambda_5 / lambda_1"]
    for m in methods:
        headers5 += [f"{m} products", f"{m} max err"]
    rows5 = []
    for r in records:
        row = [r["model"], f"{r['exact_top5'][4] / r['exact_top5'][0]:.3f}"]
        for m in methods:
            products, err, converged = r["top5"][m]
            row += [fmt_products(products, converged), f"{err:.1e}"]
        rows5.append(row)
    top5 = (
        "Top-5 eigenvalues at tol 1e-3 (one random start): products and the largest relative "
        "error over the five. torsion: eigsh(k=5, tol=1e-3, max_iter=100) (eigenvalue stop) "
        "with blocks of 5 (default) "
        "and of 1; PyHessian: deflated power iteration eigenvalues(top_n=5, maxIter=100); "
        "ARPACK: scipy eigsh(k=5, maxiter=100).\n\n" + render_table(headers5, rows5)
    )
    return top1 + "\n\n" + top5


# ---------------------------------------------------------------------------------------
# 3. Trace
# ---------------------------------------------------------------------------------------


def trace_records(problem: Problem, dense: torch.Tensor, budgets, seeds) -> dict:
    exact = float(dense.trace())
    eig = torch.linalg.eigvalsh(dense)
    op = torsion_operator(problem)
    cl = curvlinops_operator(problem)
    h = pyhessian_object(problem)
    errors: dict[str, dict[int, list[float]]] = {}
    reported_se: dict[str, dict[int, list[float]]] = {}
    auto_picks: dict[int, list[str]] = {}

    def add(name, m, estimate, se=None):
        errors.setdefault(name, {}).setdefault(m, []).append(rel_err(float(estimate), exact))
        if se is not None:
            reported_se.setdefault(name, {}).setdefault(m, []).append(float(se) / abs(exact))

    for m in budgets:
        for seed in seeds:
            for method in ("hutchinson", "hutchpp", "xtrace", "auto"):
                gen = torch.Generator().manual_seed(seed)
                est = trace(op, m, method=method, generator=gen)
                add(f"torsion {method}", m, est.estimate, est.standard_error)
                if method == "auto":
                    auto_picks.setdefault(m, []).append(est.method)
            torch.manual_seed(seed)
            with PowerIterationRecorder() as rec:
                samples = h.trace(maxIter=m, tol=0.0)
            if rec.products != m:
                raise CorrectnessError(f"PyHessian trace spent {rec.products} products, not {m}")
            add("PyHessian Hutchinson", m, statistics.fmean(samples))
            for name, fn in (
                ("curvlinops hutchinson_trace", curvlinops.hutchinson_trace),
                ("curvlinops hutchpp_trace", curvlinops.hutchpp_trace),
                ("curvlinops xtrace", curvlinops.xtrace),
            ):
                torch.manual_seed(seed)
                add(name, m, fn(cl, m))
    # Adaptive stopping rules.
    adaptive = {"PyHessian default (tol=1e-3)": [], "torsion auto (rtol=1e-2, budget 100)": []}
    for seed in seeds:
        torch.manual_seed(seed)
        with PowerIterationRecorder() as rec:
            samples = h.trace()  # maxIter=100, tol=1e-3
        adaptive["PyHessian default (tol=1e-3)"].append(
            (rec.products, rel_err(statistics.fmean(samples), exact))
        )
        est = trace(op, 100, rtol=1e-2, generator=torch.Generator().manual_seed(seed))
        adaptive["torsion auto (rtol=1e-2, budget 100)"].append(
            (est.matvecs, rel_err(float(est.estimate), exact))
        )
    top = torch.sort(eig, descending=True).values
    return {
        "model": problem.name,
        "description": problem.description,
        "params": problem.num_params,
        "exact_trace": exact,
        "auto_picks": auto_picks,
        "lambda_max": float(top[0]),
        "top10_share": float(top[:10].sum() / eig.sum()),
        "negative_mass": float(eig.clamp(max=0).sum() / eig.abs().sum()),
        "errors": errors,
        "reported_se": reported_se,
        "adaptive": adaptive,
    }


def trace_table(rec: dict, budgets, seeds) -> str:
    headers = ["estimator", *(f"m = {m}: mean rel err" for m in budgets)]
    headers += [f"m = {m}: reported SE" for m in budgets]
    rows = []
    for name, by_m in rec["errors"].items():
        label = name
        if name == "torsion auto":
            picks = [sum(p == "hutchpp" for p in rec["auto_picks"][m]) for m in budgets]
            label += " (Hutch++ picked " + "/".join(map(str, picks)) + f" of {len(seeds)})"
        row = [label, *(f"{statistics.fmean(by_m[m]):.2e}" for m in budgets)]
        se = rec["reported_se"].get(name)
        row += [f"{statistics.fmean(se[m]):.2e}" if se else "none" for m in budgets]
        rows.append(row)
    main = (
        f"Trace of the Hessian of the {rec['model']} ({rec['description']}; "
        f"{rec['params']} parameters; exact "
        f"trace {rec['exact_trace']:.4g} from the dense float64 Hessian, lambda_max "
        f"{rec['lambda_max']:.4g}, top-10 eigenvalues {100 * rec['top10_share']:.0f} % of "
        f"the trace): mean relative error over {len(seeds)} seeds for a budget of m "
        "products; reported SE: torsion's standard-error estimate relative to the trace "
        "(mean), where the library gives one.\n\n" + render_table(headers, rows)
    )
    rows2 = []
    for name, runs in rec["adaptive"].items():
        rows2.append(
            [
                name,
                f"{statistics.fmean(p for p, _ in runs):.1f}",
                f"{statistics.fmean(e for _, e in runs):.2e}",
                f"{max(e for _, e in runs):.2e}",
            ]
        )
    adaptive = (
        f"{rec['model']}: adaptive stopping, products spent and relative error (mean and "
        "max over the seeds).\n\n"
        + render_table(["rule", "mean products", "mean rel err", "max rel err"], rows2)
    )
    return main + "\n\n" + adaptive


# ---------------------------------------------------------------------------------------


def on_device(problem: Problem, device: str) -> Problem:
    """The problem with its model (graph buffers included) and batch moved to ``device``."""
    return Problem(
        problem.name,
        problem.model.to(device),
        problem.x.to(device),
        problem.y.to(device),
        problem.description,
    )


def hvp_main(args, env: dict) -> int:
    """``--device cuda``: the correctness checks and the HVP cost table on the GPU (the
    problems are trained on the CPU, as in the CPU run, then moved)."""
    problems = [on_device(p, args.device) for p in make_problems(args.quick)]
    checks = {p.name: check_products(p, ReferenceHVP(p)) for p in problems}
    print(f"correctness (relative 2-norm error of H v against float64): {checks}", flush=True)
    records = [hvp_cost(p, args) for p in problems]
    table = f"On {env['device_name']}, float32.\n\n" + hvp_table(records)
    print()
    print(table)
    json_path, md_path = write_results(
        "curvature_cuda", args, env, [{"checks": checks}, {"hvp": records}], table
    )
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def main() -> int:
    args = parse_args(__doc__)
    if args.quick and args.threads is None:
        # The quick problems are tiny; on a loaded CI machine two OpenMP threads spin-wait
        # on each other's thousands of small kernels (measured: 164 s against 19 s).
        args.threads = 1
    env = setup(args)
    print(environment_line(env), flush=True)
    if args.device != "cpu":
        return hvp_main(args, env)
    start = time.perf_counter()
    eig_seeds = (0,) if args.quick else (0, 1, 2)
    trace_seeds = tuple(range(2 if args.quick else 20))
    budgets = (12,) if args.quick else (12, 30, 96)

    problems = make_problems(args.quick)
    small, skewed = small_problem(args.quick), small_problem(args.quick, feature_decay=4.0)
    everything = [*problems, small, skewed]
    references = {p.name: ReferenceHVP(p) for p in everything}
    dense = {p.name: references[p.name].dense() for p in (small, skewed)}
    for p in (small, skewed):
        check_close(
            f"{p.name}: torsion to_dense vs float64 double backward",
            torsion_operator(p).to_dense(),
            dense[p.name],
            rtol=1e-3,
            atol=1e-5 * float(dense[p.name].abs().max()),
        )
    checks = {p.name: check_products(p, references[p.name]) for p in everything}
    print(f"correctness (relative 2-norm error of H v against float64): {checks}", flush=True)
    top5 = {p.name: reference_eigenvalues(p, references[p.name], 5) for p in [*problems, small]}
    check_close(
        "small MLP: reference eigenvalues vs dense eigvalsh",
        top5[small.name],
        torch.linalg.eigvalsh(dense[small.name]).flip(0)[:5],
        rtol=1e-8,
        atol=0,
    )
    print(f"reference top-5 eigenvalues: {top5}", flush=True)

    sections = {"checks": time.perf_counter() - start}
    hvp_records = [hvp_cost(p, args) for p in problems]
    sections["hvp"] = time.perf_counter() - start - sum(sections.values())
    eig_records = [eigen_records(p, top5[p.name], args, eig_seeds) for p in [*problems, small]]
    sections["eigen"] = time.perf_counter() - start - sum(sections.values())
    trace_recs = [trace_records(p, dense[p.name], budgets, trace_seeds) for p in (small, skewed)]
    sections["trace"] = time.perf_counter() - start - sum(sections.values())

    table = "\n\n".join(
        [
            hvp_table(hvp_records),
            eigen_table(eig_records, eig_seeds),
            *(trace_table(r, budgets, trace_seeds) for r in trace_recs),
        ]
    )
    print()
    print(table)
    print()
    print(environment_line(env))
    print(
        f"total {time.perf_counter() - start:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items())
        + ")"
    )
    records = [
        {"checks": checks},
        {"hvp": hvp_records},
        {"eigen": eig_records},
        {"trace": trace_recs},
    ]
    json_path, md_path = write_results("curvature", args, env, records, table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
