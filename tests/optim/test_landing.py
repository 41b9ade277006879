"""The landing method: the field, the safe step, convergence to known optima.

Oracles: Ablin & Peyré's square-matrix field ``(skew(G X^T) + lambda (X X^T - I)) X``;
the canonical Riemannian gradient; the distance bound of the safe step checked on the
actual next iterate; the SVD (Procrustes) and ``eigh`` (Rayleigh quotient) solutions.
"""

from __future__ import annotations

import io

import geoopt
import pytest
import torch
from geoopt import ManifoldParameter
from torch import nn

from torsion.manifolds import Grassmann, SPDAffineInvariant, Stiefel
from torsion.optim import Landing
from torsion.optim._landing import landing_field, landing_safe_step, relative_gradient

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distance(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return torch.linalg.matrix_norm(x.mT @ x - torch.eye(x.shape[-1], dtype=x.dtype))


def _near_manifold(shape, distance, seed):
    """A frame plus Gaussian noise scaled so that ``||X^T X - I||_F`` is about ``distance``."""
    g = _gen(seed)
    x = Stiefel().random(*shape, dtype=F64, generator=g)
    noise = torch.randn(shape, dtype=F64, generator=g)
    first_order = torch.linalg.matrix_norm(x.mT @ noise + noise.mT @ x, keepdim=True)
    return x + distance / first_order * noise


# ---------------------------------------------------------------------------------------
# The field and the safe step
# ---------------------------------------------------------------------------------------


def test_field_is_ablin_and_peyre_field_on_square_matrices():
    x = _near_manifold((5, 5), 0.1, seed=0)
    g = torch.randn(5, 5, dtype=F64, generator=_gen(1))
    field, distance = landing_field(x, relative_gradient(x, g), 0.7)
    skew = 0.5 * (g @ x.mT - x @ g.mT)
    expected = (skew + 0.7 * (x @ x.mT - torch.eye(5, dtype=F64))) @ x
    torch.testing.assert_close(field, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(distance, _distance(x))


def test_relative_gradient_is_half_the_canonical_gradient_on_the_manifold():
    stiefel = Stiefel(metric="canonical")
    x = stiefel.random(7, 3, dtype=F64, generator=_gen(2))
    g = torch.randn(7, 3, dtype=F64, generator=_gen(3))
    torch.testing.assert_close(
        relative_gradient(x, g), 0.5 * stiefel.egrad2rgrad(x, g), rtol=1e-13, atol=1e-13
    )


def test_relative_gradient_and_normal_term_are_orthogonal_off_the_manifold():
    x = _near_manifold((8, 3), 0.2, seed=4)
    psi = relative_gradient(x, torch.randn(8, 3, dtype=F64, generator=_gen(5)))
    skew = x.mT @ psi
    torch.testing.assert_close(skew, -skew.mT, rtol=0, atol=1e-13)  # X^T psi is skew
    normal = x @ (x.mT @ x - torch.eye(3, dtype=F64))
    assert abs(float((psi * normal).sum())) < 1e-12


@pytest.mark.parametrize("shape", [(6, 3), (4, 4), (9, 2)])
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_safe_step_keeps_the_next_iterate_within_the_tolerance(shape, lam):
    eps = 0.5
    x = torch.stack([_near_manifold(shape, scale, seed=i) for i, scale in enumerate([0.05, 0.3])])
    g = 30.0 * torch.randn(x.shape, dtype=F64, generator=_gen(6))  # steep: the step binds
    field, distance = landing_field(x, relative_gradient(x, g), lam)
    assert bool((distance < eps).all())
    step = landing_safe_step(distance, torch.linalg.matrix_norm(field), lam, eps)
    after = _distance(x - step[:, None, None] * field)
    assert bool((after <= eps + 1e-12).all())
    # the step is the root of the bound, so the bound is tight: d_next <= bound == eps
    bound = distance - 2 * step * lam * distance * (1 - distance)
    bound = bound + step**2 * torch.linalg.matrix_norm(field) ** 2
    cap = 1 / (2 * lam * (1 + distance))
    torch.testing.assert_close(torch.where(step < cap, bound, eps), torch.full_like(bound, eps))


def test_safe_step_far_from_the_manifold_is_finite_and_positive():
    distance = torch.tensor([0.7, 0.95, 1.5, 0.2], dtype=F64)  # beyond eps, beyond 1
    field_norm = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=F64)
    step = landing_safe_step(distance, field_norm, 1.0, 0.5)
    assert bool(torch.isfinite(step).all()) and bool((step > 0).all())
    # beyond eps (d < 1): the minimizer of the bound, lambda d (1 - d) / g^2, or the cap
    torch.testing.assert_close(float(step[0]), min(0.7 * 0.3 / 9.0, 1 / (2 * 1.7)))
    torch.testing.assert_close(float(step[1]), min(0.95 * 0.05 / 1.0, 1 / (2 * 1.95)))
    torch.testing.assert_close(float(step[2]), 1 / (2 * 2.5))  # d >= 1: only the cap
    torch.testing.assert_close(float(step[3]), 1 / (2 * 1.2))  # a zero field: only the cap


# ---------------------------------------------------------------------------------------
# Convergence
# ---------------------------------------------------------------------------------------


def _procrustes(shape, seed):
    m = torch.randn(shape, dtype=F64, generator=_gen(seed))
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return m, u @ vh


@pytest.mark.parametrize("shape", [(5, 5), (6, 3), (20, 4)])
@pytest.mark.parametrize(
    "options",
    [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.5}, {"lr": 0.05, "momentum": 0.5, "nesterov": True}],
)
def test_procrustes_from_off_the_manifold(shape, options):
    m, solution = _procrustes(shape, seed=7)
    start = _near_manifold(shape, 0.3, seed=8)
    if shape[0] == shape[1] and torch.linalg.det(start) * torch.linalg.det(solution) < 0:
        start[:, 0] = -start[:, 0]  # the flow stays in its connected component of O(n)
    x = ManifoldParameter(start, manifold=Stiefel())
    optimizer = Landing([x], **options)
    distances = [float(_distance(x))]
    for _ in range(300):
        optimizer.zero_grad()
        (-(x * m).sum()).backward()
        optimizer.step()
        distances.append(float(_distance(x)))
    assert 0.2 < distances[0] < 0.5
    assert max(distances) <= 0.5  # the safe step's tolerance
    assert distances[-1] < 1e-13
    torch.testing.assert_close(x.detach(), solution, rtol=0, atol=1e-9)


@pytest.mark.parametrize("manifold", [Stiefel(), geoopt.Stiefel(), geoopt.CanonicalStiefel()])
def test_rayleigh_quotient_on_a_rectangular_stiefel(manifold):
    q = Stiefel().random(9, 9, dtype=F64, generator=_gen(9))
    a = q @ torch.diag(torch.tensor([6.0, 5, 4, 1, 0.5, 0, -1, -2, -3], dtype=F64)) @ q.mT
    x = ManifoldParameter(Stiefel().random(9, 3, dtype=F64, generator=_gen(10)), manifold=manifold)
    optimizer = Landing([x], lr=0.05, momentum=0.5)
    for _ in range(400):
        optimizer.zero_grad()
        (-0.5 * (x * (a @ x)).sum()).backward()
        optimizer.step()
    projector = q[:, :3] @ q[:, :3].mT
    assert float(_distance(x)) < 1e-12
    torch.testing.assert_close(x.detach() @ x.detach().mT, projector, rtol=0, atol=1e-8)


def test_a_huge_learning_rate_never_leaves_the_tolerance():
    m, _ = _procrustes((7, 3), seed=11)
    x = ManifoldParameter(_near_manifold((7, 3), 0.05, seed=12), manifold=Stiefel())
    optimizer = Landing([x], lr=100.0, safe_step=0.3)
    for _ in range(50):
        optimizer.zero_grad()
        (-(x * m).sum() * 100).backward()
        optimizer.step()
        assert float(_distance(x)) <= 0.3 + 1e-12


def test_without_safe_step_the_step_is_lr_times_the_field():
    x0 = _near_manifold((6, 2), 0.05, seed=13)
    g = torch.randn(6, 2, dtype=F64, generator=_gen(14))
    x = ManifoldParameter(x0.clone(), manifold=Stiefel())
    optimizer = Landing([x], lr=0.3, lambda_regul=2.0, safe_step=None)
    x.grad = g.clone()
    optimizer.step()
    field, _ = landing_field(x0, relative_gradient(x0, g), 2.0)
    torch.testing.assert_close(x.detach(), x0 - 0.3 * field, rtol=1e-14, atol=1e-14)


def _landing_params(device="cpu"):
    g = _gen(15)
    return [
        ManifoldParameter(x.to(device), manifold=manifold)
        for x, manifold in [
            *[(_near_manifold((6, 3), 0.1, 20 + i), Stiefel()) for i in range(3)],
            (_near_manifold((6, 3), 0.1, 30), geoopt.Stiefel()),
            (_near_manifold((2, 5, 5), 0.1, 31), Stiefel()),
            (torch.randn(4, 2, dtype=F64, generator=g), Stiefel()),
        ]
    ]


def _train_landing(ps, **options):
    optimizer = Landing(ps, lr=0.1, momentum=0.3, **options)
    targets = [
        torch.randn(p.shape, dtype=F64, generator=_gen(40 + i)).to(p.device)
        for i, p in enumerate(ps)
    ]
    for _ in range(10):
        optimizer.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(ps, targets, strict=True)).backward()
        optimizer.step()
    return [p.detach() for p in ps]


def test_batched_update_equals_one_parameter_at_a_time():
    got = _train_landing(_landing_params())
    want = _train_landing(_landing_params(), foreach=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.gpu
def test_cuda_iterates_match_cpu():
    got = _train_landing(_landing_params("cuda"))
    for a, b in zip(got, _train_landing(_landing_params()), strict=True):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


def test_stabilize_projects_onto_the_manifold():
    x = ManifoldParameter(_near_manifold((6, 3), 0.1, seed=16), manifold=Stiefel())
    optimizer = Landing([x], lr=1e-3, stabilize=2)
    for step in range(2):
        x.grad = torch.zeros_like(x)
        optimizer.step()
        assert (float(_distance(x)) < 1e-13) == (step == 1)


def test_state_dict_round_trip_with_momentum():
    def make():
        x = ManifoldParameter(_near_manifold((6, 3), 0.1, seed=17), manifold=Stiefel())
        return x, Landing([x], lr=0.1, momentum=0.9, nesterov=True)

    m, _ = _procrustes((6, 3), seed=18)

    def fit(x, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (-(x * m).sum()).backward()
            optimizer.step()

    x, optimizer = make()
    fit(x, optimizer, 3)
    buffer = io.BytesIO()
    torch.save((x.detach().clone(), optimizer.state_dict()), buffer)
    fit(x, optimizer, 4)
    buffer.seek(0)
    saved_x, saved_state = torch.load(buffer, weights_only=False)
    y, resumed = make()
    with torch.no_grad():
        y.copy_(saved_x)
    resumed.load_state_dict(saved_state)
    fit(y, resumed, 4)
    assert torch.equal(x.detach(), y.detach())


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (nn.Parameter(torch.zeros(4, 2)), "parameter 0 of group 0 is a plain tensor"),
        (
            ManifoldParameter(torch.eye(4, 2), manifold=Grassmann()),
            "ManifoldParameter on Grassmann",
        ),
        (
            ManifoldParameter(torch.eye(3), manifold=SPDAffineInvariant()),
            "on SPDAffineInvariant",
        ),
        (ManifoldParameter(torch.zeros(3), manifold=geoopt.Euclidean()), "a plain tensor"),
    ],
)
def test_non_stiefel_parameters_are_refused(param, message):
    with pytest.raises(TypeError, match=message):
        Landing([param], lr=0.1)


def test_the_message_names_the_group_of_an_added_parameter():
    landing = Landing([ManifoldParameter(torch.eye(4, 2), manifold=Stiefel())], lr=0.1)
    with pytest.raises(TypeError, match="parameter 1 of group 1 is a plain tensor"):
        landing.add_param_group(
            {"params": [ManifoldParameter(torch.eye(4, 2), manifold=Stiefel()), torch.zeros(2)]}
        )
    assert len(landing.param_groups) == 1  # the refused group is not kept


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -0.1}, "Invalid learning rate"),
        ({"lr": 0.1, "lambda_regul": 0.0}, "Invalid lambda_regul value"),
        ({"lr": 0.1, "safe_step": 1.5}, "Invalid safe_step value"),
        ({"lr": 0.1, "safe_step": 0.0}, "Invalid safe_step value"),
        ({"lr": 0.1, "momentum": -0.5}, "Invalid momentum value"),
        ({"lr": 0.1, "nesterov": True}, "Nesterov momentum requires"),
        ({"lr": 0.1, "stabilize": -2}, "Invalid stabilize value"),
        ({"lr": 0.1, "lambda_regul": float("nan")}, "Invalid lambda_regul value: nan"),
    ],
)
def test_bad_hyperparameters_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        Landing([ManifoldParameter(torch.eye(4, 2), manifold=Stiefel())], **options)


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.7, "dampening": 0.4},
    ],
)
def test_momentum_steps_follow_the_documented_update(options):
    """Three steps with changing gradients against the update written out in the class
    docstring: ``m = momentum m + (1 - dampening) G`` (``m = G`` first), ``D = G + momentum
    m`` with Nesterov, else ``m``; ``X <- X - lr Lambda(X)`` for the field of ``D``."""
    momentum, dampening = options["momentum"], options.get("dampening", 0.0)
    x0 = _near_manifold((6, 3), 0.05, seed=16)
    grads = [torch.randn(6, 3, dtype=F64, generator=_gen(17 + i)) for i in range(3)]
    x = ManifoldParameter(x0.clone(), manifold=Stiefel())
    optimizer = Landing([x], lr=0.2, lambda_regul=1.5, safe_step=None, **options)
    want, buffer = x0.clone(), None
    for g in grads:
        x.grad = g.clone()
        optimizer.step()
        buffer = g.clone() if buffer is None else momentum * buffer + (1 - dampening) * g
        direction = g + momentum * buffer if options.get("nesterov") else buffer
        field, _ = landing_field(want, relative_gradient(want, direction), 1.5)
        want = want - 0.2 * field
    torch.testing.assert_close(x.detach(), want, rtol=1e-13, atol=1e-13)
