"""The fused retraction-and-transport maps the training optimizers call, against the
separate maps and against independent implementations (geoopt's SPD and Stiefel).

* ``SPDAffineInvariant.retr_transp``: one Cholesky factor and one square root of the
  whitened new point, equal to ``retr`` then ``transp``;
* ``SPDAffineInvariant.retr_transp_direction``: the transport of the step's own direction
  without a square root (it commutes with the whitened step), equal to ``retr_transp``;
* ``Stiefel.retr_transp``: the QR retraction, by one pass of Cholesky QR under a step
  bound of at most 1 (which Adam derives from its betas, and which the CPU reads off the
  step), else by Householder QR: equal to
  Householder QR with the sign fix to rounding and orthonormal, float32 and huge
  rank-deficient steps included (where two passes of Cholesky QR were not);
* the optimizers on these manifolds follow geoopt's optimizers on geoopt's own
  ``SymmetricPositiveDefinite`` and ``EuclideanStiefel`` (no code shared with torsion).
"""

from __future__ import annotations

import geoopt
import pytest
import torch
from geoopt import ManifoldParameter

from torsion.manifolds import SPDAffineInvariant, Stiefel
from torsion.optim import RiemannianAdam, RiemannianSGD
from torsion.optim._riemannian import adam_direction_bound, retr_transp_direction

F64 = torch.float64
BATCHES = [(), (4,), (2, 3)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd_setup(batch, seed=0, n=4):
    spd = SPDAffineInvariant()
    g = _gen(seed)
    x = spd.random(*batch, n, n, dtype=F64, generator=g)
    u = spd.random_tangent(x, generator=g)
    v = spd.random_tangent(x, generator=g)
    return spd, x, u, v


# ---------------------------------------------------------------------------------------
# SPD, affine-invariant metric
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_spd_retr_transp_equals_retr_then_transp(batch):
    spd, x, u, v = _spd_setup(batch)
    y, moved = spd.retr_transp(x, u, v)
    want_y = spd.retr(x, u)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved, spd.transp(x, want_y, v), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("batch", BATCHES)
def test_spd_transport_is_geoopts_parallel_transport(batch):
    spd, x, u, v = _spd_setup(batch, seed=1)
    y, moved = spd.retr_transp(x, u, v)
    theirs = geoopt.SymmetricPositiveDefinite()
    torch.testing.assert_close(y, theirs.retr(x, u), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(moved, theirs.transp(x, y, v), rtol=1e-9, atol=1e-9)
    # parallel transport is an isometry
    torch.testing.assert_close(spd.norm(y, moved), spd.norm(x, v), rtol=1e-10, atol=0)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("per_matrix", [False, True])
def test_spd_retr_transp_direction_equals_retr_transp(batch, per_matrix):
    spd, x, d, _ = _spd_setup(batch, seed=2)
    if per_matrix:
        t = 3.0 * torch.rand(*batch, 1, 1, dtype=F64, generator=_gen(3)) - 1.5
    else:
        t = -0.7
    y, moved = spd.retr_transp_direction(x, d, t)
    want_y, want_moved = spd.retr_transp(x, t * d, d)
    torch.testing.assert_close(y, want_y, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(moved, want_moved, rtol=1e-10, atol=1e-10)
    assert bool((torch.linalg.eigvalsh(y) > 0).all())
    torch.testing.assert_close(moved, moved.mT, rtol=0, atol=0)


def test_spd_retr_transp_direction_with_zero_step_is_the_identity():
    spd, x, d, _ = _spd_setup((3,), seed=4)
    y, moved = spd.retr_transp_direction(x, d, 0.0)
    torch.testing.assert_close(y, x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(moved, d, rtol=1e-12, atol=1e-12)


def test_spd_fused_maps_are_differentiable():
    spd, x, u, v = _spd_setup((2,), seed=5, n=3)
    t = torch.tensor([[[0.3]], [[-0.4]]], dtype=F64)
    inputs = [a.clone().requires_grad_() for a in (x, u, v, t)]

    def fused(x, u, v, t):
        y, moved = spd.retr_transp(x, u, v)
        z, moved_direction = spd.retr_transp_direction(x, u, t)
        return y, moved, z, moved_direction

    assert torch.autograd.gradcheck(fused, inputs)


def test_spd_fused_maps_validate_shapes():
    spd, x, u, _ = _spd_setup((2,), seed=6)
    with pytest.raises(ValueError, match="retr_transp"):
        spd.retr_transp(x, u, torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match="retr_transp_direction"):
        spd.retr_transp_direction(x, torch.zeros(2, 4, 5, dtype=F64), 1.0)


# ---------------------------------------------------------------------------------------
# Stiefel
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    ("metric", "retraction"),
    [
        ("euclidean", "qr"),
        ("euclidean", "polar"),
        ("euclidean", "cayley"),
        ("canonical", "exp"),
        ("canonical", "qr"),
    ],
)
def test_stiefel_retr_transp_equals_retr_then_transp(batch, metric, retraction):
    st = Stiefel(metric=metric, retraction=retraction)
    g = _gen(7)
    x = st.random(*batch, 7, 3, dtype=F64, generator=g)
    u = st.random_tangent(x, generator=g)
    v = st.random_tangent(x, generator=g)
    y, moved = st.retr_transp(x, u, v)
    want_y = st.retr(x, u)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moved, st.transp(x, want_y, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("rank", [6, 1])
@pytest.mark.parametrize(
    ("step", "step_bound"),
    # one pass of Cholesky QR under a bound <= 1; any step without one (a rank-one float32
    # step of norm 2e4 left two passes of Cholesky QR 6e7 away from orthonormal)
    [
        (1e-4, None),
        (1.0, None),
        (30.0, None),
        (1e3, None),
        (2e4, None),
        (1e6, None),
        (1e-4, 1.0),
        (0.3, 1.0),
        (1.0, 1.0),
    ],
)
def test_stiefel_qr_retr_transp_is_householder_qr(dtype, rank, step, step_bound):
    st = Stiefel()
    g = _gen(8)
    x = st.random(16, 40, 6, dtype=F64, generator=g)
    direction = torch.randn(16, 40, rank, dtype=F64, generator=g)
    u = st.proju(x, direction @ torch.randn(16, rank, 6, dtype=F64, generator=g))
    u = u * (step / torch.linalg.matrix_norm(u, ord=2, keepdim=True))
    x, u = x.to(dtype), u.to(dtype)
    y, moved = st.retr_transp(x, u, u, step_bound=step_bound)
    eps = torch.finfo(dtype).eps
    gap = (y.mT @ y - torch.eye(6, dtype=dtype)).abs().amax()
    assert float(gap) < 20 * eps
    # geoopt's EuclideanStiefel: Householder QR with its own sign fix
    want = geoopt.EuclideanStiefel().retr(x, u)
    torch.testing.assert_close(y, want, rtol=0, atol=50 * eps)
    torch.testing.assert_close(moved, st.transp(x, y, u), rtol=0, atol=0)


def test_stiefel_qr_retr_transp_traces_whole_without_a_bound():
    # on the CPU an unbounded call reads ||u||_F to pick Cholesky QR; under torch.compile
    # it must not (a graph break), and takes Householder QR, equal to rounding
    st = Stiefel()
    g = _gen(9)
    x = st.random(4, 20, 3, dtype=F64, generator=g)
    u = 0.1 * st.random_tangent(x, generator=g)
    compiled = torch.compile(st.retr_transp, backend="eager", fullgraph=True)
    for want, got in zip(st.retr_transp(x, u, u), compiled(x, u, u), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.99), (0.5, 0.9), (0.0, 0.999)])
def test_adam_direction_bound_is_attained_by_the_worst_gradient_sequence(betas):
    """Aligned gradients with norms growing like ``(b2 / b1)`` per step (the equality case
    of Cauchy-Schwarz) drive ``||m_hat|| / sqrt(v_hat)`` to the bound, never above."""
    b1, b2 = betas
    bound = adam_direction_bound(b1, b2)
    ratios = []
    for length in (1, 3, 30, 300):
        for quiet in (0, 20_000):  # zero gradients first: the bias corrections go to 1
            m = v = 0.0
            for t in range(1, quiet + length + 1):
                k = quiet + length - t  # steps before the last
                norm = 0.0 if t <= quiet else (b1 / b2) ** k if b1 > 0 else float(k == 0)
                m, v = b1 * m + (1 - b1) * norm, b2 * v + (1 - b2) * norm**2
            t = quiet + length
            ratios.append((m / (1 - b1**t)) / (v / (1 - b2**t)) ** 0.5)
    assert max(ratios) <= bound * (1 + 1e-12)
    assert max(ratios) >= bound * (1 - 1e-3)
    assert adam_direction_bound(0.99, 0.9) is None  # b1^2 >= b2: unbounded
    assert adam_direction_bound(0.5, 0.0) is None  # v forgets at once, m does not
    assert adam_direction_bound(0.0, 0.0) == 1.0  # normalized gradient steps


def test_adam_steps_on_stiefel_stay_within_the_bound_it_passes():
    """Random gradients with spikes and sign flips: every step's norm (from the state, as
    the optimizer computes it) stays below ``lr * adam_direction_bound``."""
    g = _gen(13)
    st = Stiefel()
    params = [ManifoldParameter(st.random(8, 3, dtype=F64, generator=g), manifold=st)]
    lr, betas = 0.05, (0.9, 0.999)
    optimizer = RiemannianAdam(params, lr=lr, betas=betas, eps=0.0)
    limit = lr * adam_direction_bound(*betas)
    passed = []  # the bound the optimizer hands to the retraction
    retr_transp = st.retr_transp

    def recording(*args, **kw):
        passed.append(kw.get("step_bound"))
        return retr_transp(*args, **kw)

    st.retr_transp = recording
    worst = 0.0
    for t in range(1, 201):
        spike = 1e4 if t % 37 == 0 else (1e-3 if t % 11 == 0 else 1.0)
        params[0].grad = spike * torch.randn(8, 3, dtype=F64, generator=g)
        optimizer.step()
        state = optimizer.state[params[0]]
        m_hat = state["exp_avg"] / (1 - betas[0] ** t)
        v_hat = state["exp_avg_sq"] / (1 - betas[1] ** t)
        worst = max(worst, float(lr * torch.linalg.matrix_norm(m_hat) / v_hat.sqrt()))
    assert worst <= limit
    assert passed and all(bound == pytest.approx(limit) for bound in passed)
    x = params[0].detach()
    assert float((x.mT @ x - torch.eye(3, dtype=F64)).abs().max()) < 1e-14


# ---------------------------------------------------------------------------------------
# The optimizers through the fused maps vs geoopt on geoopt's own manifolds
# ---------------------------------------------------------------------------------------


def _train(params, optimizer, steps=6, seed=9):
    g = _gen(seed)
    targets = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    for _ in range(steps):
        optimizer.zero_grad()
        pairs = zip(params, targets, strict=True)
        sum(((p - t) ** 2).sum() + (p * t).sum() ** 2 for p, t in pairs).backward()
        optimizer.step()
    return [p.detach().clone() for p in params]


def _points(kind: str, seed: int = 10):
    g = _gen(seed)
    if kind == "spd":
        return [
            0.5 * SPDAffineInvariant().random(3, 3, dtype=F64, generator=g, condition=2.0)
            for _ in range(5)
        ]
    return [Stiefel().random(6, 3, dtype=F64, generator=g) for _ in range(5)]


OURS = {"spd": SPDAffineInvariant, "stiefel": Stiefel}
THEIRS = {"spd": geoopt.SymmetricPositiveDefinite, "stiefel": geoopt.EuclideanStiefel}
OPTIMIZERS = {
    "adam": (RiemannianAdam, geoopt.optim.RiemannianAdam, {"lr": 0.02}),
    "adam-amsgrad": (
        RiemannianAdam,
        geoopt.optim.RiemannianAdam,
        {"lr": 0.02, "amsgrad": True, "betas": (0.8, 0.95)},
    ),
    "sgd-momentum": (RiemannianSGD, geoopt.optim.RiemannianSGD, {"lr": 0.01, "momentum": 0.7}),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["spd", "stiefel"])
def test_optimizer_on_torsion_manifold_follows_geoopt_on_its_own(kind, optimizer):
    ours_cls, theirs_cls, options = OPTIMIZERS[optimizer]
    points = _points(kind)
    ours = [ManifoldParameter(x.clone(), manifold=OURS[kind]()) for x in points]
    ref = [ManifoldParameter(x.clone(), manifold=THEIRS[kind]()) for x in points]
    reference = theirs_cls(ref, **options)
    if "momentum" in options:
        # geoopt starts the buffer at the raw gradient, torsion (as torch) at the first
        # Riemannian one, which a zero buffer reproduces when dampening = 0
        for p in ref:
            reference.state[p]["momentum_buffer"] = torch.zeros_like(p)
    got = _train(ours, ours_cls(ours, **options))
    want = _train(ref, reference)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_retr_transp_direction_falls_back_to_the_manifolds_retr_transp():
    sphere = geoopt.Sphere()
    g = _gen(11)
    x = torch.nn.functional.normalize(torch.randn(4, 5, dtype=F64, generator=g), dim=-1)
    d = sphere.proju(x, torch.randn(4, 5, dtype=F64, generator=g))
    t = torch.rand(4, 1, dtype=F64, generator=g)
    y, moved = retr_transp_direction(sphere, x, d, t)
    want_y, want_moved = sphere.retr_transp(x, t * d, d)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(moved, want_moved, rtol=0, atol=0)
