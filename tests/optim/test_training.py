"""RiemannianSGD and RiemannianAdam: oracles, batching, state, and known optima.

Oracles: :mod:`torch.optim` on plain parameters; geoopt's optimizers on the same manifold
(the algorithms are geoopt's); a literal transcription of Li et al.'s (2020) Cayley SGD /
Adam with dense ``n x n`` Cayley transforms; ``eigh``, the SVD and the SPD Frechet means
(closed forms where they exist) for the optima.
"""

from __future__ import annotations

import copy
import io
import math

import geoopt
import pytest
import torch
from geoopt import ManifoldParameter
from torch import nn

from torsion.manifolds import (
    Grassmann,
    ProductManifold,
    Scaled,
    SPDAffineInvariant,
    SPDLogCholesky,
    SPDLogEuclidean,
    Stiefel,
)
from torsion.optim import Landing, RiemannianAdam, RiemannianSGD
from torsion.optim import _grouping as grouping
from torsion.optim._grouping import (
    CPU_BATCH_BYTES,
    Workspace,
    manifold_key,
    split_into_batches,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stiefel_gap(x: torch.Tensor) -> float:
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return float((x.detach().mT @ x.detach() - eye).abs().amax())


# ---------------------------------------------------------------------------------------
# Plain parameters: torch.optim is the oracle
# ---------------------------------------------------------------------------------------


def _plain_params(seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    g = _gen(seed)
    shapes = [(4, 3), (4, 3), (5,), (2, 3, 2), (4, 3)]
    return [nn.Parameter(torch.randn(s, dtype=dtype, generator=g)) for s in shapes]


def _train_plain(params, optimizer, steps=6):
    g = _gen(99)
    targets = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    for _ in range(steps):
        optimizer.zero_grad()
        sum(
            ((p - t) ** 2 * (1 + p**2)).sum() for p, t in zip(params, targets, strict=True)
        ).backward()
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"amsgrad": True},
        {"weight_decay": 0.1},
        {"betas": (0.8, 0.9), "eps": 1e-6},
    ],
)
def test_adam_is_torch_adam_on_plain_parameters(options, foreach):
    ours = _train_plain(
        a := _plain_params(), RiemannianAdam(a, lr=0.05, foreach=foreach, **options)
    )
    ref = _train_plain(
        b := _plain_params(), torch.optim.Adam(b, lr=0.05, foreach=foreach, **options)
    )
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(x, y)


def test_adam_with_decoupled_weight_decay_is_adamw():
    ours = _train_plain(
        a := _plain_params(),
        RiemannianAdam(a, lr=0.05, weight_decay=0.3, decoupled_weight_decay=True),
    )
    ref = _train_plain(
        b := _plain_params(), torch.optim.AdamW(b, lr=0.05, weight_decay=0.3, foreach=True)
    )
    for x, y in zip(ours, ref, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05},
    ],
)
def test_sgd_is_torch_sgd_on_plain_parameters(options):
    ours = _train_plain(a := _plain_params(), RiemannianSGD(a, lr=0.01, **options))
    ref = _train_plain(b := _plain_params(), torch.optim.SGD(b, lr=0.01, foreach=True, **options))
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: RiemannianSGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda p: RiemannianAdam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
        lambda p: RiemannianAdam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ],
)
def test_step_leaves_gradients_alone(make):
    stiefel = Stiefel()
    params = [*_plain_params(), ManifoldParameter(stiefel.random(5, 2, generator=_gen(1)), stiefel)]
    optimizer = make(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=_gen(2))
    grads = [p.grad.clone() for p in params]
    for _ in range(2):
        optimizer.step()
    for p, g in zip(params, grads, strict=True):
        assert torch.equal(p.grad, g)


# ---------------------------------------------------------------------------------------
# Manifold parameters: geoopt's optimizers are the oracle
# ---------------------------------------------------------------------------------------


def _sphere_point(shape, generator):
    return nn.functional.normalize(torch.randn(shape, dtype=F64, generator=generator), dim=-1)


def _spd_point(shape, generator):
    # well conditioned and of size about one, so that SGD on the affine-invariant metric
    # (whose gradient is X G X) stays stable at the learning rates below
    return 0.5 * SPDAffineInvariant().random(*shape, dtype=F64, generator=generator, condition=2.0)


def _frame(shape, generator):
    return Stiefel().random(*shape, dtype=F64, generator=generator)


MANIFOLDS = {
    "stiefel-qr": (Stiefel, _frame, (6, 3)),
    "stiefel-canonical-cayley": (
        lambda: Stiefel(metric="canonical", retraction="cayley"),
        _frame,
        (6, 3),
    ),
    "stiefel-polar-square": (lambda: Stiefel(retraction="polar"), _frame, (4, 4)),
    "grassmann": (Grassmann, _frame, (5, 2)),
    "spd-affine": (SPDAffineInvariant, _spd_point, (3, 3)),
    "spd-log-cholesky": (SPDLogCholesky, _spd_point, (3, 3)),
    "geoopt-stiefel": (geoopt.Stiefel, _frame, (6, 3)),
    "geoopt-canonical-stiefel": (geoopt.CanonicalStiefel, _frame, (6, 3)),
    "geoopt-sphere": (geoopt.Sphere, _sphere_point, (3, 4)),
    "geoopt-spd": (geoopt.SymmetricPositiveDefinite, _spd_point, (3, 3)),
}

OPTIMIZERS = {
    "adam": (RiemannianAdam, geoopt.optim.RiemannianAdam, {"lr": 0.03}),
    "adam-amsgrad-wd": (
        RiemannianAdam,
        geoopt.optim.RiemannianAdam,
        {"lr": 0.03, "amsgrad": True, "weight_decay": 0.2, "betas": (0.8, 0.95)},
    ),
    "sgd": (RiemannianSGD, geoopt.optim.RiemannianSGD, {"lr": 0.02}),
    "sgd-nesterov-wd": (
        RiemannianSGD,
        geoopt.optim.RiemannianSGD,
        {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
    ),
    "sgd-momentum-stabilize": (
        RiemannianSGD,
        geoopt.optim.RiemannianSGD,
        {"lr": 0.02, "momentum": 0.5, "stabilize": 3},
    ),
}


def _manifold_params(name: str, seed: int = 0):
    make_manifold, make_point, shape = MANIFOLDS[name]
    manifold = make_manifold()
    g = _gen(seed)
    # three of one shape (one batch), one with an extra batch dimension, two managers
    points = [make_point(shape, g) for _ in range(3)] + [make_point((2, *shape), g)]
    second = make_manifold()  # an equal manifold, another object: same batch
    return [
        ManifoldParameter(x, manifold=manifold if i % 2 else second) for i, x in enumerate(points)
    ]


def _train(params, optimizer, steps=8, seed=5):
    g = _gen(seed)
    targets = [0.5 * torch.randn(p.shape, dtype=p.dtype, generator=g).to(p.device) for p in params]
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(
            0.5 * ((p - t) ** 2).sum() + 0.1 * (p * t).sum() ** 2
            for p, t in zip(params, targets, strict=True)
        )
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("manifold", list(MANIFOLDS))
def test_iterates_match_geoopt(manifold, optimizer):
    ours_cls, geoopt_cls, options = OPTIMIZERS[optimizer]
    ours = _manifold_params(manifold)
    ref = _manifold_params(manifold)
    reference = geoopt_cls(ref, **options)
    if options.get("momentum"):
        # geoopt starts the buffer at the raw gradient; torch (and torsion) at the first
        # Riemannian gradient, which a zero buffer reproduces when dampening = 0
        for p in ref:
            reference.state[p]["momentum_buffer"] = torch.zeros_like(p)
    got = _train(ours, ours_cls(ours, **options))
    want = _train(ref, reference)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("manifold", ["stiefel-qr", "grassmann", "spd-affine", "geoopt-sphere"])
def test_sgd_dampening_on_a_manifold_is_torch_sgds_rule(manifold, foreach):
    """``m = r`` on the first step, then ``m = momentum * m + (1 - dampening) * r``
    (torch.optim.SGD's rule; geoopt's differs by starting from a zero buffer, so it is no
    oracle here), ``x, m = retr(x, -lr m), transp(x, x_new, m)``: a loop over the
    manifold's own maps, one parameter at a time, is the oracle."""
    options = {"lr": 0.02, "momentum": 0.8, "dampening": 0.6}
    ours = _manifold_params(manifold)
    got = _train(ours, RiemannianSGD(ours, foreach=foreach, **options))
    g = _gen(5)  # _train's targets
    for p in _manifold_params(manifold):
        target = 0.5 * torch.randn(p.shape, dtype=p.dtype, generator=g)
        x, m = p.detach().clone(), None
        for _ in range(8):
            y = x.clone().requires_grad_()
            (egrad,) = torch.autograd.grad(
                0.5 * ((y - target) ** 2).sum() + 0.1 * (y * target).sum() ** 2, y
            )
            r = p.manifold.egrad2rgrad(x, egrad)
            m = r if m is None else options["momentum"] * m + (1 - options["dampening"]) * r
            new = p.manifold.retr(x, -options["lr"] * m)
            x, m = new, p.manifold.transp(x, new, m)
        torch.testing.assert_close(got.pop(0), x, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("manifold", ["stiefel-qr", "spd-affine", "geoopt-sphere"])
def test_cuda_iterates_match_cpu(manifold, optimizer):
    """Parameters, gradients and state on CUDA (step counts stay on the CPU, as in torch):
    the same iterates as on the CPU, batched the same way."""
    ours_cls, _, options = OPTIMIZERS[optimizer]
    cpu = _manifold_params(manifold)
    cuda = [ManifoldParameter(p.detach().cuda(), manifold=p.manifold) for p in cpu]
    want = _train(cpu, ours_cls(cpu, **options))
    optimizer_cuda = ours_cls(cuda, **options)
    got = _train(cuda, optimizer_cuda)
    for x, y in zip(got, want, strict=True):
        assert x.is_cuda
        torch.testing.assert_close(x.cpu(), y, rtol=1e-9, atol=1e-9)
    for p in cuda:
        assert all(
            t.device.type == ("cpu" if key == "step" else "cuda")
            for key, t in optimizer_cuda.state[p].items()
        )


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_batched_update_equals_one_parameter_at_a_time(optimizer):
    ours_cls, _, options = OPTIMIZERS[optimizer]
    stiefel, spd = Stiefel(), SPDAffineInvariant()

    def params():
        g = _gen(3)
        return [
            *[ManifoldParameter(_frame((5, 2), g), manifold=stiefel) for _ in range(3)],
            *[ManifoldParameter(_spd_point((3, 3), g), manifold=spd) for _ in range(2)],
            nn.Parameter(torch.randn(4, dtype=F64, generator=g)),
            ManifoldParameter(_frame((2, 5, 2), g), manifold=Stiefel()),
        ]

    a, b = params(), params()
    got = _train(a, ours_cls(a, **options))
    want = _train(b, ours_cls(b, foreach=False, **options))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_chunks_through_the_reused_workspace_equal_one_parameter_at_a_time(optimizer, monkeypatch):
    """CPU batches cut into chunks of two and one (the last one stacks into a prefix of
    the reused buffers): iterates and optimizer state equal the unbatched path's."""
    monkeypatch.setattr(grouping, "CPU_BATCH_BYTES", 2 * 5 * 2 * 8)
    ours_cls, _, options = OPTIMIZERS[optimizer]

    def params():
        g = _gen(5)
        stiefel = Stiefel()
        return [ManifoldParameter(_frame((5, 2), g), manifold=stiefel) for _ in range(5)]

    a, b = params(), params()
    batched, single = ours_cls(a, **options), ours_cls(b, foreach=False, **options)
    assert [len(c.params) for c in split_into_batches(a, batched=True)[1]] == [2, 2, 1]
    for x, y in zip(_train(a, batched), _train(b, single), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for p, q in zip(a, b, strict=True):
        for key, value in batched.state[p].items():
            torch.testing.assert_close(value, single.state[q][key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [RiemannianSGD, Landing])
def test_momentum_starts_when_one_parameter_of_a_batch_already_has_a_buffer(make):
    """Two same-shape parameters, the first with a gradient a step before the second: the
    batch's one held buffer was stacked as the tensor itself (no batch dimension), which
    failed to broadcast after scaling the live buffer in place."""
    g = _gen(4)
    starts = [_frame((6, 3), g) for _ in range(2)]
    weights = [torch.randn(6, 3, dtype=F64, generator=g) for _ in range(2)]

    def run(foreach):
        params = [ManifoldParameter(x.clone(), manifold=Stiefel()) for x in starts]
        optimizer = make(params, lr=0.1, momentum=0.9, foreach=foreach)
        for active in (params[:1], params, params):
            optimizer.zero_grad(set_to_none=True)
            sum(((p * w) ** 3).sum() for p, w in zip(active, weights, strict=False)).backward()
            optimizer.step()
        return [p.detach() for p in params]

    for x, y in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_parameter_of_a_type_or_shape_its_manifold_does_not_take_is_refused():
    """Steps skip the manifold maps' type and shape checks (``trusted_inputs``), so the
    optimizer checks each parameter when it is added (geoopt checks only the shape, when
    the parameter is made)."""
    half = ManifoldParameter(_frame((5, 2), _gen(0)).half(), manifold=Stiefel())
    with pytest.raises(TypeError, match=r"RiemannianAdam: parameter 0 on Stiefel.*float16"):
        RiemannianAdam([half], lr=0.1)
    wide = ManifoldParameter(_frame((5, 2), _gen(0)), manifold=Stiefel())
    wide.data = torch.randn(2, 5, dtype=F64)
    optimizer = RiemannianSGD([nn.Parameter(torch.randn(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 0 on Stiefel.*n >= p"):
        optimizer.add_param_group({"params": [wide]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize(
    ("key", "shape"), [("exp_avg", (6, 2)), ("exp_avg", (1, 3)), ("exp_avg_sq", (3,))]
)
def test_state_of_another_shape_is_refused_by_load_state_dict(key, shape):
    """torch's load_state_dict takes any shape; the next step would fail on it, or
    broadcast it (a first moment of shape (1, 3))."""
    param = ManifoldParameter(_frame((6, 3), _gen(0)), manifold=Stiefel())
    optimizer = RiemannianAdam([param], lr=0.1)
    param.grad = torch.randn(6, 3, dtype=F64, generator=_gen(1))
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0][key] = torch.zeros(shape, dtype=F64)
    fresh = RiemannianAdam([param], lr=0.1)
    with pytest.raises(ValueError, match=rf"state '{key}' of parameter 0 has shape"):
        fresh.load_state_dict(saved)
    fresh.load_state_dict(optimizer.state_dict())  # the matching state loads


def test_workspace_reuses_one_buffer_per_role_and_shape():
    workspace = Workspace()
    g = _gen(0)
    tensors = [torch.randn(3, 2, generator=g) for _ in range(4)]
    copies = [t.clone() for t in tensors]
    first = workspace.stack(tensors, "x")
    torch.testing.assert_close(first, torch.stack(copies), rtol=0, atol=0)
    first.mul_(0)  # the update works in place on the stack, never on the inputs
    for t, c in zip(tensors, copies, strict=True):
        assert torch.equal(t, c)
    second = workspace.stack(tensors[:2], "x")  # a smaller chunk: a prefix, same storage
    assert second.data_ptr() == first.data_ptr() and second.shape == (2, 3, 2)
    torch.testing.assert_close(second, torch.stack(copies[:2]), rtol=0, atol=0)
    other = workspace.stack(tensors, "grad")  # another role: another buffer
    assert other.data_ptr() != first.data_ptr()
    grown = workspace.stack(tensors + tensors, "x")  # a larger chunk grows the buffer
    torch.testing.assert_close(grown, torch.stack(copies + copies), rtol=0, atol=0)


def test_parameters_without_gradients_are_skipped_and_get_no_state():
    stiefel = Stiefel()
    params = [ManifoldParameter(_frame((5, 2), _gen(i)), manifold=stiefel) for i in range(3)]
    before = params[1].detach().clone()
    optimizer = RiemannianAdam(params, lr=0.1)
    (params[0].sum() + params[2].sum()).backward()
    optimizer.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in optimizer.state
    assert set(optimizer.state_dict()["state"]) == {0, 2}


def test_parameter_groups_keep_their_own_hyperparameters():
    stiefel = Stiefel()
    x0 = _frame((5, 2), _gen(0))
    fast = ManifoldParameter(x0.clone(), manifold=stiefel)
    slow = ManifoldParameter(x0.clone(), manifold=stiefel)
    optimizer = RiemannianSGD([{"params": [fast], "lr": 0.2}, {"params": [slow]}], lr=0.02)
    target = _frame((5, 2), _gen(1))
    for _ in range(3):
        optimizer.zero_grad()
        (-(fast * target).sum() - (slow * target).sum()).backward()
        optimizer.step()
    alone = ManifoldParameter(x0.clone(), manifold=stiefel)
    reference = RiemannianSGD([alone], lr=0.2)
    for _ in range(3):
        reference.zero_grad()
        (-(alone * target).sum()).backward()
        reference.step()
    torch.testing.assert_close(fast.detach(), alone.detach(), rtol=0, atol=0)
    assert not torch.equal(slow.detach(), fast.detach())


def test_closure_is_evaluated_with_gradients():
    stiefel = Stiefel()
    w = ManifoldParameter(_frame((4, 2), _gen(0)), manifold=stiefel)
    optimizer = RiemannianAdam([w], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (w**2).sum() * w[0, 0]
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.requires_grad
    assert _stiefel_gap(w) < 1e-12


# ---------------------------------------------------------------------------------------
# Cayley SGD / Adam (Li et al. 2020) is RiemannianSGD / Adam with the Cayley retraction
# ---------------------------------------------------------------------------------------


def _li_skew(m, x):
    """``W = W^ - W^T`` with ``W^ = M X^T - X (X^T M X^T) / 2`` (Li et al., eq. (8))."""
    w_hat = m @ x.mT - 0.5 * x @ (x.mT @ m @ x.mT)
    return w_hat - w_hat.mT


def _li_cayley(w, x, alpha):
    """``(I - alpha W / 2)^-1 (I + alpha W / 2) X``, the exact Cayley transform (dense)."""
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    return torch.linalg.solve(eye - 0.5 * alpha * w, (eye + 0.5 * alpha * w) @ x)


def _procrustes_gradient(x, a, b):
    return a.mT @ (a @ x - b)  # of ||A X - B||^2 / 2


def _procrustes_problem(n=7, p=3):
    g = _gen(11)
    return (
        torch.randn(n, n, dtype=F64, generator=g),
        torch.randn(n, p, dtype=F64, generator=g),
        _frame((n, p), g),
    )


def test_sgd_with_the_cayley_retraction_is_cayley_sgd():
    """Li et al., Algorithm 1 (exact transform, so their step cap 2q/||W|| is inactive)."""
    a, b, x0 = _procrustes_problem()
    lr, beta = 0.02, 0.7
    x, m = x0.clone(), torch.zeros_like(x0)
    reference = []
    for _ in range(15):
        m = beta * m - _procrustes_gradient(x, a, b)
        w = _li_skew(m, x)
        m = w @ x
        x = _li_cayley(w, x, lr)
        reference.append(x)

    stiefel = Stiefel(retraction="cayley")
    param = ManifoldParameter(x0.clone(), manifold=stiefel)
    optimizer = RiemannianSGD([param], lr=lr, momentum=beta)
    for want in reference:
        optimizer.zero_grad()
        (0.5 * ((a @ param - b) ** 2).sum()).backward()
        optimizer.step()
        torch.testing.assert_close(param.detach(), want, rtol=1e-11, atol=1e-11)


def test_adam_with_the_cayley_retraction_is_cayley_adam_with_the_riemannian_norm():
    """Li et al., Algorithm 2, with the two documented substitutions: the second moment of
    the Riemannian (not Euclidean) gradient, and ``eps`` outside the square root."""
    a, b, x0 = _procrustes_problem()
    lr, beta1, beta2, eps = 0.05, 0.9, 0.99, 1e-8
    x, m, v = x0.clone(), torch.zeros_like(x0), 0.0
    reference = []
    for k in range(1, 16):
        grad = _procrustes_gradient(x, a, b)
        riemannian = grad - x @ (0.5 * (x.mT @ grad + grad.mT @ x))
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * float((riemannian**2).sum())  # Li: ||grad||^2
        r = (1 - beta1**k) * (math.sqrt(v / (1 - beta2**k)) + eps)  # Li: sqrt(v + eps)
        w = _li_skew(m, x) / r
        m = r * w @ x
        x = _li_cayley(-w, x, lr)
        reference.append(x)

    stiefel = Stiefel(retraction="cayley")
    param = ManifoldParameter(x0.clone(), manifold=stiefel)
    optimizer = RiemannianAdam([param], lr=lr, betas=(beta1, beta2), eps=eps)
    for want in reference:
        optimizer.zero_grad()
        (0.5 * ((a @ param - b) ** 2).sum()).backward()
        optimizer.step()
        torch.testing.assert_close(param.detach(), want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Known optima; iterates stay on the manifold
# ---------------------------------------------------------------------------------------


def _symmetric_with_spectrum(eigenvalues, seed):
    q = _frame((len(eigenvalues), len(eigenvalues)), _gen(seed))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.mT, q


@pytest.mark.parametrize(
    ("manifold", "make"),
    [
        (Stiefel(), lambda p: RiemannianSGD(p, lr=0.05, momentum=0.5)),
        (Grassmann(), lambda p: RiemannianSGD(p, lr=0.05, momentum=0.5, nesterov=True)),
        (Stiefel(retraction="cayley"), lambda p: RiemannianSGD(p, lr=0.05, momentum=0.5)),
        (Grassmann(), lambda p: RiemannianAdam(p, lr=0.02, amsgrad=True)),
    ],
)
def test_rayleigh_quotient_reaches_the_dominant_eigenspace(manifold, make):
    a, q = _symmetric_with_spectrum([5.0, 4.0, 3.0, 1.0, 0.5, 0.0, -1.0], seed=4)
    projector = q[:, :3] @ q[:, :3].mT
    x = ManifoldParameter(_frame((7, 3), _gen(5)), manifold=manifold)
    optimizer = make([x])
    for _ in range(200):
        optimizer.zero_grad()
        (-0.5 * (x * (a @ x)).sum()).backward()
        optimizer.step()
    assert _stiefel_gap(x) < 1e-12
    found = x.detach() @ x.detach().mT
    tolerance = 1e-2 if isinstance(optimizer, RiemannianAdam) else 1e-8  # Adam: fixed lr
    assert float((found - projector).abs().amax()) < tolerance


@pytest.mark.parametrize("shape", [(6, 3), (4, 4)])
def test_procrustes_reaches_the_polar_factor(shape):
    m = torch.randn(shape, dtype=F64, generator=_gen(8))
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    solution = u @ vh
    start = _frame(shape, _gen(9))
    if shape[0] == shape[1] and torch.linalg.det(start) * torch.linalg.det(solution) < 0:
        start[:, 0] = -start[:, 0]  # O(n) has two components; start in the solution's
    x = ManifoldParameter(start, manifold=Stiefel())
    optimizer = RiemannianSGD([x], lr=0.1, momentum=0.5, stabilize=50)
    for _ in range(300):
        optimizer.zero_grad()
        (-(x * m).sum()).backward()
        optimizer.step()
    torch.testing.assert_close(x.detach(), solution, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("manifold", "make", "steps", "atol"),
    [
        (SPDAffineInvariant(), lambda p: RiemannianSGD(p, lr=1.0), 40, 1e-10),
        (SPDAffineInvariant(), lambda p: RiemannianAdam(p, lr=0.1), 300, 1e-4),
        (SPDLogEuclidean(), lambda p: RiemannianSGD(p, lr=0.5, momentum=0.3), 60, 1e-9),
        (SPDLogCholesky(), lambda p: RiemannianSGD(p, lr=1.0), 40, 1e-10),
    ],
)
def test_karcher_mean_on_spd(manifold, make, steps, atol):
    g = _gen(12)
    points = manifold.random(5, 3, 3, dtype=F64, generator=g)
    mean = manifold.frechet_mean(points, tol=1e-13).mean
    x = ManifoldParameter(torch.eye(3, dtype=F64), manifold=manifold)
    optimizer = make([x])
    # a decaying rate lets Adam settle (the schedulers drive the optimizers unchanged)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * manifold.dist2(x.unsqueeze(0), points).mean()).backward()
        optimizer.step()
        schedule.step()
        assert float(torch.linalg.eigvalsh(x.detach()).min()) > 0
    torch.testing.assert_close(x.detach(), mean, rtol=0, atol=atol)


def test_log_euclidean_mean_matches_the_closed_form():
    manifold = SPDLogEuclidean()
    points = manifold.random(4, 3, 3, dtype=F64, generator=_gen(13))
    evals, evecs = torch.linalg.eigh(points)
    logs = evecs @ torch.diag_embed(evals.log()) @ evecs.mT
    e, v = torch.linalg.eigh(logs.mean(0))
    closed_form = v @ torch.diag(e.exp()) @ v.mT
    x = ManifoldParameter(torch.eye(3, dtype=F64), manifold=manifold)
    optimizer = RiemannianSGD([x], lr=1.0)
    for _ in range(5):  # a flat metric: one exact step, a few for rounding
        optimizer.zero_grad()
        (0.5 * manifold.dist2(x.unsqueeze(0), points).mean()).backward()
        optimizer.step()
    torch.testing.assert_close(x.detach(), closed_form, rtol=0, atol=1e-12)


def test_decoupled_weight_decay_on_a_manifold_is_the_decay_gradient_step():
    spd = SPDAffineInvariant()
    x0 = spd.random(3, 3, dtype=F64, generator=_gen(14))
    x = ManifoldParameter(x0.clone(), manifold=spd)
    optimizer = RiemannianAdam([x], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    x.grad = torch.zeros_like(x0)  # only the decay moves the point
    optimizer.step()
    expected = spd.retr(x0, -0.1 * 0.5 * spd.egrad2rgrad(x0, x0))
    torch.testing.assert_close(x.detach(), expected, rtol=1e-13, atol=1e-13)
    stiefel = Stiefel()
    w0 = _frame((5, 2), _gen(15))
    w = ManifoldParameter(w0.clone(), manifold=stiefel)
    optimizer = RiemannianAdam([w], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    w.grad = torch.zeros_like(w0)
    optimizer.step()  # ||w||_F is constant on Stiefel: no decay
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------
# stabilize
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda p: RiemannianSGD(p, lr=1e-3, momentum=0.9, stabilize=3), "momentum_buffer"),
        (lambda p: RiemannianAdam(p, lr=1e-3, stabilize=3), "exp_avg"),
    ],
)
def test_stabilize_reprojects_every_k_steps(make, key):
    stiefel = Stiefel(retraction="cayley")  # keeps X^T X where it is: no implicit projection
    params = [ManifoldParameter(_frame((5, 2), _gen(i)), manifold=stiefel) for i in range(2)]
    plain = nn.Parameter(torch.ones(3, dtype=F64))
    optimizer = make([*params, plain])
    target = torch.randn(5, 2, dtype=F64, generator=_gen(7))

    def step():
        optimizer.zero_grad()
        (sum(-(p * target).sum() for p in params) + plain.sum()).backward()
        optimizer.step()

    step()
    with torch.no_grad():
        for p in params:
            p.mul_(1.01)  # knocked off the manifold
            optimizer.state[p][key].add_(p)  # and the momentum off the tangent space
    step()
    assert _stiefel_gap(params[0]) > 1e-3  # step 2: not yet
    step()
    for p in params:  # step 3: re-projected
        assert _stiefel_gap(p) < 1e-12
        m = optimizer.state[p][key]
        assert float((p.detach().mT @ m + m.mT @ p.detach()).abs().amax()) < 1e-12
    assert optimizer.param_groups[0]["step"] == 3


def test_stabilize_method_projects_on_demand():
    spd = SPDAffineInvariant()
    x = ManifoldParameter(spd.random(3, 3, dtype=F64, generator=_gen(0)), manifold=spd)
    optimizer = RiemannianSGD([x], lr=0.1)
    with torch.no_grad():
        x[0, 1] += 0.1  # not symmetric
    optimizer.stabilize()
    torch.testing.assert_close(x.detach(), x.detach().mT, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# state_dict, deepcopy, torch.compile
# ---------------------------------------------------------------------------------------


class _Model(nn.Module):
    """Four Stiefel frames (one batch), an SPD matrix, a Linear layer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = _gen(seed)
        stiefel = Stiefel()
        self.frames = nn.ParameterList(
            [
                ManifoldParameter(stiefel.random(6, 3, generator=g), manifold=stiefel)
                for _ in range(4)
            ]
        )
        spd = SPDAffineInvariant()
        self.spd = ManifoldParameter(
            0.5 * spd.random(3, 3, generator=g, condition=2.0), manifold=spd
        )
        self.linear = nn.Linear(3, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(2, 3, generator=g))
            self.linear.bias.zero_()

    def forward(self, x):
        h = sum(torch.tanh(x @ w) for w in self.frames) @ self.spd
        return self.linear(h)


def _batches(count: int, seed: int = 1):
    g = _gen(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(count)]


def _fit(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


OPTIMIZER_FACTORIES = {
    "adam": lambda p: RiemannianAdam(p, lr=0.01, amsgrad=True, weight_decay=1e-3, stabilize=2),
    "sgd": lambda p: RiemannianSGD(p, lr=0.01, momentum=0.9, nesterov=True, stabilize=2),
}


@pytest.mark.parametrize("name", list(OPTIMIZER_FACTORIES))
def test_training_resumes_bit_for_bit_from_a_state_dict(name):
    make = OPTIMIZER_FACTORIES[name]
    first, second = _batches(3, seed=1), _batches(3, seed=2)
    model = _Model()
    optimizer = make(model.parameters())
    _fit(model, optimizer, first)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    _fit(model, optimizer, second)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _Model(seed=7)  # different initial weights, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make(resumed.parameters())
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _fit(resumed, resumed_optimizer, second)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    assert isinstance(resumed.spd, ManifoldParameter)


def test_state_is_keyed_per_parameter_like_torch():
    model = _Model()
    optimizer = RiemannianAdam(model.parameters(), lr=0.01)
    _fit(model, optimizer, _batches(1))
    state = optimizer.state_dict()["state"]
    params = list(model.parameters())
    assert sorted(state) == list(range(len(params)))
    frame = state[next(i for i, p in enumerate(params) if p is model.frames[0])]
    assert set(frame) == {"step", "exp_avg", "exp_avg_sq"}
    assert frame["exp_avg"].shape == (6, 3)
    assert frame["exp_avg_sq"].shape == (1, 1)  # one second moment per matrix
    assert float(frame["step"]) == 1.0
    weight = next(i for i, p in enumerate(params) if p is model.linear.weight)
    assert state[weight]["exp_avg_sq"].shape == (2, 3)  # the Linear weight: torch's layout


def test_state_dict_loads_when_some_parameters_have_no_state():
    """A state saved while a parameter had no gradient loads, and that parameter gets its
    state when it first steps."""
    model = _Model()
    optimizer = RiemannianAdam(model.parameters(), lr=0.01)
    x, y = _batches(1)[0]
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model.frames[1].grad = None
    optimizer.step()
    fresh = RiemannianAdam(model.parameters(), lr=0.01)
    fresh.load_state_dict(optimizer.state_dict())
    assert model.frames[1] not in fresh.state
    _fit(model, fresh, _batches(1))
    assert model.frames[1] in fresh.state


@pytest.mark.parametrize("name", list(OPTIMIZER_FACTORIES))
def test_deepcopy_of_model_and_optimizer_trains_identically(name):
    model = _Model()
    optimizer = OPTIMIZER_FACTORIES[name](model.parameters())
    _fit(model, optimizer, _batches(2))
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    assert all(isinstance(p, ManifoldParameter) for p in model_copy.frames)
    assert isinstance(model_copy.frames[0].manifold, Stiefel)
    more = _batches(2, seed=3)
    _fit(model, optimizer, more)
    _fit(model_copy, optimizer_copy, more)
    for a, b in zip(model.parameters(), model_copy.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_deepcopy_of_the_optimizer_alone_copies_its_state():
    model = _Model()
    optimizer = RiemannianAdam(model.parameters(), lr=0.01)
    _fit(model, optimizer, _batches(1))
    clone = copy.deepcopy(optimizer)
    for p, q in zip(
        optimizer.param_groups[0]["params"], clone.param_groups[0]["params"], strict=True
    ):
        assert p is not q
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, clone.state[q][key])
            assert value.data_ptr() != clone.state[q][key].data_ptr()
    saved = clone.state_dict()  # keyed by the copy's own parameters
    assert sorted(saved["state"]) == sorted(optimizer.state_dict()["state"])


@pytest.mark.slow
def test_optimizer_steps_a_compiled_model():
    eager, compiled_source = _Model(), _Model()
    compiled = torch.compile(compiled_source, backend="aot_eager")  # inductor: same graph
    batches = _batches(3)
    _fit(eager, RiemannianAdam(eager.parameters(), lr=0.01), batches)
    _fit(compiled, RiemannianAdam(compiled.parameters(), lr=0.01), batches)
    for a, b in zip(eager.parameters(), compiled_source.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5)
    for w in compiled_source.frames:
        assert _stiefel_gap(w) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZER_FACTORIES))
def test_compiled_step_runs_eagerly_and_equals_the_eager_step(name):
    """A compiled ``optimizer.step`` (or a compiled training step around it) gives the
    eager iterates bit for bit. Traced, a ManifoldParameter looks like a plain Parameter
    and the manifold parameters would get a Euclidean update: geoopt's compiled step
    leaves the manifold that way."""
    torch._dynamo.reset()
    eager, compiled = _Model(), _Model()
    make = OPTIMIZER_FACTORIES[name]
    eager_optimizer, compiled_optimizer = make(eager.parameters()), make(compiled.parameters())
    compiled_step = torch.compile(compiled_optimizer.step, backend="eager")
    for x, y in _batches(3):
        for model, step in ((eager, eager_optimizer.step), (compiled, compiled_step)):
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step()
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------
# Batching rules
# ---------------------------------------------------------------------------------------


def test_equal_manifolds_share_a_key_and_different_ones_do_not():
    assert manifold_key(Stiefel()) == manifold_key(Stiefel())
    assert manifold_key(Stiefel()) != manifold_key(Stiefel(retraction="cayley"))
    assert manifold_key(Stiefel()) != manifold_key(Grassmann())
    assert manifold_key(geoopt.Sphere()) == manifold_key(geoopt.Sphere())
    scaled = Scaled(Stiefel(), 2.0)  # holds a tensor: only itself
    assert manifold_key(scaled) == manifold_key(scaled)
    assert manifold_key(scaled) != manifold_key(Scaled(Stiefel(), 2.0))


def test_split_into_batches_by_manifold_shape_and_dtype():
    g = _gen(0)
    p = [
        ManifoldParameter(_frame((5, 2), g), manifold=Stiefel()),
        ManifoldParameter(_frame((5, 2), g), manifold=Stiefel()),
        ManifoldParameter(_frame((5, 2), g).float(), manifold=Stiefel()),
        ManifoldParameter(_frame((6, 2), g), manifold=Stiefel()),
        ManifoldParameter(_frame((5, 2), g), manifold=Stiefel(retraction="polar")),
        nn.Parameter(torch.zeros(3)),
        ManifoldParameter(torch.zeros(3), manifold=geoopt.Euclidean()),
    ]
    euclidean, batches = split_into_batches(p, batched=True)
    assert euclidean == [p[5], p[6]]
    assert [[id(q) for q in b.params] for b in batches] == [
        [id(p[0]), id(p[1])],
        [id(p[2])],
        [id(p[3])],
        [id(p[4])],
    ]
    _, single = split_into_batches(p, batched=False)
    assert [len(b.params) for b in single] == [1] * 5


def test_cpu_batches_are_cut_to_the_cache_size():
    stiefel = Stiefel()
    per_param = 64 * 32 * 4
    count = 3 * (CPU_BATCH_BYTES // per_param) + 1
    params = [ManifoldParameter(torch.eye(64, 32), manifold=stiefel) for _ in range(count)]
    _, batches = split_into_batches(params, batched=True)
    assert [len(b.params) for b in batches] == [CPU_BATCH_BYTES // per_param] * 3 + [1]
    assert [q for b in batches for q in b.params] == params


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: RiemannianSGD(p, lr=-0.1), "Invalid learning rate: -0.1"),
        (lambda p: RiemannianSGD(p, lr=0.1, momentum=-1), "Invalid momentum value"),
        (lambda p: RiemannianSGD(p, lr=0.1, weight_decay=-1), "Invalid weight_decay value"),
        (lambda p: RiemannianSGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (
            lambda p: RiemannianSGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            "Nesterov momentum requires",
        ),
        (lambda p: RiemannianSGD(p, lr=0.1, stabilize=0), "Invalid stabilize value"),
        (lambda p: RiemannianAdam(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: RiemannianAdam(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (lambda p: RiemannianAdam(p, betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (lambda p: RiemannianAdam(p, betas=(0.9,)), "betas must be a pair"),
        (lambda p: RiemannianAdam(p, eps=-1e-8), "Invalid epsilon value"),
        (lambda p: RiemannianAdam(p, weight_decay=-0.1), "Invalid weight_decay value"),
        (lambda p: RiemannianAdam(p, stabilize=2.5), "Invalid stabilize value"),
        (lambda p: RiemannianAdam([{"params": p, "lr": -3.0}]), "Invalid learning rate: -3.0"),
        # torch.optim accepts NaN and infinity, which make every parameter NaN
        (lambda p: RiemannianSGD(p, lr=math.nan), "Invalid lr value: nan"),
        (lambda p: RiemannianSGD(p, lr=0.1, weight_decay=math.inf), "weight_decay value: inf"),
        (lambda p: RiemannianAdam(p, eps=math.nan), "Invalid eps value: nan"),
        (lambda p: RiemannianAdam(p, betas=(math.nan, 0.9)), "betas\\[0\\] value: nan"),
    ],
)
def test_bad_hyperparameters_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make([nn.Parameter(torch.zeros(2))])


def test_non_numeric_learning_rate_raises_type_error():
    with pytest.raises(TypeError, match="lr must be a Python number"):
        RiemannianAdam([nn.Parameter(torch.zeros(2))], lr="0.1")


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(4, 2, sparse=True)
    optimizer = RiemannianAdam(embedding.parameters())
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


def test_product_manifold_parameters_match_geoopt():
    def params():
        product = ProductManifold((SPDAffineInvariant(), (3, 3)), (Stiefel(), (5, 2)))
        g = _gen(21)
        points = [product.pack_point(_spd_point((3, 3), g), _frame((5, 2), g)) for _ in range(3)]
        return [ManifoldParameter(x, manifold=product) for x in points]

    ours, ref = params(), params()
    got = _train(ours, RiemannianAdam(ours, lr=0.03, amsgrad=True))
    want = _train(ref, geoopt.optim.RiemannianAdam(ref, lr=0.03, amsgrad=True))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
