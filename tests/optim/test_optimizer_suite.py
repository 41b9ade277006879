"""The training optimizers bound to the shared ``OptimizerSuite`` (the ``minimize`` solvers
are bound in ``test_minimize.py``): every problem of the suite (Rayleigh quotient on
Grassmann, Brockett and Procrustes on Stiefel, the Karcher mean under each SPD metric)
solved to its oracle, with every iterate on the manifold.

Each optimizer runs as a user trains: a ``geoopt.ManifoldParameter`` at a copy of the
start, ``zero_grad`` / ``backward`` / ``step``. The SGD rates follow the scale of each
cost's Riemannian Hessian (largest eigenvalue about 24 for the Rayleigh quotient, tens for
Brockett's cost, about 1 for Procrustes and the Karcher means). Adam's step has about the
length of its rate whatever the gradient, so on Procrustes and the Karcher means the rate
decays exponentially to let it settle on the optimum.
"""

from __future__ import annotations

import geoopt
import pytest
import torch

from torsion.optim import RiemannianAdam, RiemannianSGD
from torsion.testing import OptimizationProblem, OptimizerSuite

# problem name prefix -> (learning rate, steps, exponential decay of the rate per step)
_SGD = {
    "rayleigh": (0.04, 150, 1.0),
    "brockett": (0.025, 400, 1.0),
    "procrustes": (0.3, 60, 1.0),
    "karcher": (0.9, 60, 1.0),
}
_ADAM = {
    "rayleigh": (0.06, 400, 1.0),
    "brockett": (0.06, 750, 1.0),
    "procrustes": (0.1, 450, 0.995),
    "karcher": (0.1, 240, 0.99),
}


def _train(problem: OptimizationProblem, schedule: dict, make_optimizer) -> torch.Tensor:
    """Train a parameter at a copy of ``problem.x0``; every iterate goes to ``observe``."""
    lr, steps, decay = schedule[problem.name.split("-")[0]]
    param = geoopt.ManifoldParameter(problem.x0.clone(), manifold=problem.manifold)
    optimizer = make_optimizer([param], lr)
    rate = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    problem.observe(param.detach())
    for _ in range(steps):
        optimizer.zero_grad()
        problem.cost(param).backward()
        optimizer.step()
        rate.step()
        problem.observe(param.detach())
    return param.detach()


class TestRiemannianSGD(OptimizerSuite):
    """Heavy-ball momentum: the step is a multiple of the transported momentum, so the
    optimizer takes the fused ``retr_transp_direction`` path."""

    def solve(self, problem):
        return _train(problem, _SGD, lambda p, lr: RiemannianSGD(p, lr=lr, momentum=0.5))


class TestRiemannianSGDNesterov(OptimizerSuite):
    """Nesterov momentum: the general ``retr_transp`` path."""

    problem_names = ("rayleigh-grassmann", "procrustes-stiefel", "karcher-affine-invariant")

    def solve(self, problem):
        return _train(
            problem, _SGD, lambda p, lr: RiemannianSGD(p, lr=lr, momentum=0.5, nesterov=True)
        )


class TestRiemannianAdam(OptimizerSuite):
    optimum_tolerance = 1e-5

    def solve(self, problem):
        return _train(problem, _ADAM, lambda p, lr: RiemannianAdam(p, lr=lr))


class TestRiemannianAdamAMSGradDecoupledDecay(OptimizerSuite):
    """AMSGrad with decoupled weight decay: the general ``retr_transp`` path. The decay
    pulls toward the origin, so it is only run where ``||X||_F`` is constant (Stiefel,
    Grassmann), which leaves the minimizers unchanged."""

    optimum_tolerance = 1e-5
    problem_names = ("rayleigh-grassmann", "procrustes-stiefel")

    def solve(self, problem):
        return _train(
            problem,
            _ADAM,
            lambda p, lr: RiemannianAdam(
                p, lr=lr, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True
            ),
        )


# ---------------------------------------------------------------------------------------
# Euclidean parameters (the suite's problems are all on manifolds)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_optimizer", "steps"),
    [
        (lambda p: RiemannianSGD(p, lr=0.1, momentum=0.5), 200),
        (lambda p: RiemannianAdam(p, lr=0.05), 600),
    ],
    ids=["sgd", "adam"],
)
def test_euclidean_least_squares_reaches_the_lstsq_solution(make_optimizer, steps):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, dtype=torch.float64, generator=generator)
    a = torch.linalg.qr(a)[0] @ torch.diag(torch.linspace(1.0, 2.0, 5, dtype=torch.float64))
    b = torch.randn(20, 2, dtype=torch.float64, generator=generator)
    solution = torch.linalg.lstsq(a, b).solution
    x = torch.nn.Parameter(torch.zeros(5, 2, dtype=torch.float64))
    optimizer = make_optimizer([x])
    rate = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * ((a @ x - b) ** 2).sum()).backward()
        optimizer.step()
        rate.step()
    torch.testing.assert_close(x.detach(), solution, rtol=0, atol=1e-6)
