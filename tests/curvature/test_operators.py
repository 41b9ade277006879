import copy
import itertools

import geoopt
import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv

from torsion.curvature._operators import EmpiricalFisherOperator, GGNOperator, HessianOperator
from torsion.manifolds import (
    SPDAffineInvariant,
    SPDBuresWasserstein,
    SPDLogEuclidean,
    Stiefel,
)
from torsion.testing import (
    LinearOperatorSuite,
    OperatorCase,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
)

F64 = torch.float64


def _mse(out, y):
    return nn.functional.mse_loss(out, y)


def _sq(out, y):  # mse without F.mse_loss: forward-over-reverse works (pytorch#123996)
    return ((out - y) ** 2).mean()


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _mlp_mse(generator):
    torch.manual_seed(0)  # module init only; data comes from the explicit generator
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).to(F64)
    x, y = (
        torch.randn(10, 3, dtype=F64, generator=generator),
        torch.randn(10, 2, dtype=F64, generator=generator),
    )
    return model, _mse, x, y


def _mlp_ce(generator):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x = torch.randn(10, 3, dtype=F64, generator=generator)
    y = torch.randint(0, 3, (10,), generator=generator)
    return model, _ce, x, y


def _cnn_bn(generator):
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), bn, nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
    ).to(F64)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.copy_(torch.randn(2, dtype=F64, generator=generator))
        bn.running_var.copy_(torch.rand(2, dtype=F64, generator=generator) + 0.5)
        bn.weight.copy_(torch.randn(2, dtype=F64, generator=generator))
    x = torch.randn(10, 1, 5, 5, dtype=F64, generator=generator)
    y = torch.randn(10, 2, dtype=F64, generator=generator)
    return model, _mse, x, y


def _tied_mse(generator):
    """An MLP whose middle layer shares the first layer's weight (``b.weight = a.weight``):
    one parameter under two names, which ``functional_call`` must receive once."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)
    ).to(F64)
    model[2].weight = model[0].weight
    x = torch.randn(10, 3, dtype=F64, generator=generator)
    y = torch.randn(10, 2, dtype=F64, generator=generator)
    return model, _mse, x, y


PROBLEMS = {"mlp_mse": _mlp_mse, "mlp_ce": _mlp_ce, "cnn_bn": _cnn_bn, "tied_mse": _tied_mse}
SPLITS = [(0, 10), (0, 2, 7, 10)]  # one batch; three unequal batches


def _batches(x, y, cuts):
    if len(cuts) == 2:
        return (x, y)
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]


def _dense_hessian(model, loss_fn, x, y):
    return dense_hessian(model, loss_fn, (x, y))


class _GCN(nn.Module):
    """Two graph convolutions and a per-node readout (node regression)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = GCNConv(3, 4), GCNConv(4, 4)
        self.readout = nn.Linear(4, 2)

    def forward(self, x, edge_index):
        h = torch.tanh(self.conv1(x, edge_index))
        return self.readout(torch.tanh(self.conv2(h, edge_index)))


def _random_graph(nodes, edges, generator):
    src = torch.randint(0, nodes, (edges,), generator=generator)
    dst = torch.randint(0, nodes, (edges,), generator=generator)
    x = torch.randn(nodes, 3, dtype=F64, generator=generator)
    y = torch.randn(nodes, 2, dtype=F64, generator=generator)
    return x, torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]), y


def _gnn(generator):
    """Three small graphs: one block-diagonal batch, and the graphs one by one."""
    torch.manual_seed(3)
    model = _GCN().to(F64)
    graphs = [_random_graph(n, e, generator) for n, e in [(4, 5), (6, 7), (3, 2)]]
    offsets = itertools.accumulate([0] + [g[0].shape[0] for g in graphs[:-1]])
    batched = (
        (
            torch.cat([g[0] for g in graphs]),
            torch.cat([g[1] + o for g, o in zip(graphs, offsets, strict=True)], dim=1),
        ),
        torch.cat([g[2] for g in graphs]),
    )
    return model, _sq, batched, [((x, e), y) for x, e, y in graphs]


ORACLES = {
    HessianOperator: dense_hessian,
    GGNOperator: dense_ggn,
    EmpiricalFisherOperator: dense_empirical_fisher,
}
CASES = [(problem, cls) for problem in PROBLEMS for cls in ORACLES] + [
    ("gnn", HessianOperator),
    ("gnn", GGNOperator),  # per-node Fisher needs the whole graph: not per-sample slices
]


class TestModelOperators(LinearOperatorSuite):
    """MLP (MSE, cross-entropy), CNN with BatchNorm, GCN: one batch and split data."""

    @pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1].__name__}")
    def case(self, request):
        problem, cls = request.param
        generator = torch.Generator().manual_seed(0)
        if problem == "gnn":
            model, loss_fn, whole, split = _gnn(generator)
            data = [whole, split]
        else:
            model, loss_fn, x, y = PROBLEMS[problem](generator)
            whole = (x, y)
            data = [_batches(x, y, cuts) for cuts in SPLITS]
        model.train()  # the operators must use eval semantics anyway and leave this alone
        # GGN and Fisher: torch.func (auto) and the autograd forms must both equal the oracle
        methods = [{}] if cls is HessianOperator else [{}, {"method": "autograd"}]
        return OperatorCase(
            operators=[cls(model, loss_fn, d, **kw) for d in data for kw in methods],
            dense=ORACLES[cls](model, loss_fn, whole),
            model=model,
        )


@pytest.mark.parametrize(
    "method", ["graph_reuse", "double_backward", "forward_over_reverse", "reverse_over_reverse"]
)
def test_hessian_methods_agree(method, generator):
    model, _, x, y = _cnn_bn(generator)
    loss_fn = _sq
    dense = _dense_hessian(model, loss_fn, x, y)
    for data in [(x, y), _batches(x, y, SPLITS[1])]:
        if method == "graph_reuse" and isinstance(data, list):
            with pytest.raises(ValueError, match="3 batches"):
                HessianOperator(model, loss_fn, data, method=method)
            continue
        op = HessianOperator(model, loss_fn, data, method=method)
        V = torch.randn(op.shape[0], 3, dtype=F64, generator=generator)
        torch.testing.assert_close(op @ V, dense @ V, atol=1e-10, rtol=0)


def test_forward_over_reverse_torch_bug_is_named(generator):
    model, loss_fn, x, y = _mlp_mse(generator)  # F.mse_loss
    op = HessianOperator(model, loss_fn, [(x, y)], method="forward_over_reverse")
    with pytest.raises(RuntimeError, match="123996"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_auto_method_choice(generator):
    model, loss_fn, x, y = _mlp_mse(generator)
    assert HessianOperator(model, loss_fn, (x, y)).method == "graph_reuse"
    assert HessianOperator(model, loss_fn, [(x, y), (x, y)]).method == "auto"


def test_model_state_is_untouched(generator):
    model, loss_fn, x, y = _cnn_bn(generator)
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches(x, y, SPLITS[1])
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=F64, generator=generator)
    for op in [
        HessianOperator(model, loss_fn, (x, y)),
        HessianOperator(model, loss_fn, data),
        HessianOperator(model, loss_fn, data, method="double_backward"),
        GGNOperator(model, loss_fn, data),
        EmpiricalFisherOperator(model, loss_fn, data),
    ]:
        first = op @ V
        # a second operator on the same model gives the same products (no stale .grad)
        torch.testing.assert_close(type(op)(model, loss_fn, data) @ V, first, atol=1e-12, rtol=0)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_parameter_subset_and_pytrees(generator):
    model, loss_fn, x, y = _mlp_mse(generator)
    full = _dense_hessian(model, loss_fn, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    # the block of the full Hessian for parameters "0.bias", "3.weight": the layout takes
    # the model's order, whatever the order of the selection
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    idx = torch.cat(
        [
            torch.arange(offsets[n], offsets[n] + model.get_parameter(n).numel())
            for n in ["0.bias", "3.weight"]
        ]
    )
    expected = full[idx][:, idx]
    by_name = HessianOperator(model, loss_fn, (x, y), params=["3.weight", "0.bias"])
    by_tensor = HessianOperator(model, loss_fn, (x, y), params=[model[3].weight, model[0].bias])
    for op in (by_name, by_tensor):
        torch.testing.assert_close(op.to_dense(), expected, atol=1e-10, rtol=0)
    v = {
        "3.weight": torch.randn(2, 5, dtype=F64, generator=generator),
        "0.bias": torch.randn(5, dtype=F64, generator=generator),
    }
    out = by_name @ v
    assert set(out) == {"3.weight", "0.bias"} and out["3.weight"].shape == (2, 5)
    torch.testing.assert_close(
        by_name.flatten(out), expected @ by_name.flatten(v), atol=1e-10, rtol=0
    )
    # frozen parameters are excluded by default
    model[0].weight.requires_grad_(False)
    assert HessianOperator(model, loss_fn, (x, y)).shape[0] == sum(sizes) - 15


def test_a_selection_is_laid_out_in_model_order(generator):
    """A set of parameter tensors iterates in an order set by object addresses (it differs
    from one process to the next); the flat layout follows ``model.named_parameters()``
    whatever the order of the selection."""
    model, loss_fn, x, y = _mlp_mse(generator)
    names = [n for n, _ in model.named_parameters()]
    full = _dense_hessian(model, loss_fn, x, y)
    tensors = list(model.parameters())
    for params in (set(tensors), tensors[::-1], names[::-1]):
        op = HessianOperator(model, loss_fn, (x, y), params=params)
        assert list(op.unflatten(torch.zeros(op.shape[0], dtype=F64))) == names
        torch.testing.assert_close(op.to_dense(), full, atol=1e-10, rtol=0)


def test_bad_input(generator):
    model, loss_fn, x, y = _mlp_mse(generator)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, loss_fn, [])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, loss_fn, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        GGNOperator(model, loss_fn, (x, y), params=[torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="unknown method"):
        HessianOperator(model, loss_fn, (x, y), method="finite_differences")

    def per_sample(out, y):
        return nn.functional.mse_loss(out, y, reduction="none")

    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=F64)
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        for data in [(x, y), [(x, y), (x, y)]]:
            with pytest.raises(ValueError, match="loss_fn must return a scalar"):
                cls(model, per_sample, data) @ v


# ------------------------------------------------------------------------ Riemannian


class _StiefelRegression(nn.Module):
    def __init__(self, generator):
        super().__init__()
        st = Stiefel()
        self.w = geoopt.ManifoldParameter(
            st.random(4, 2, dtype=F64, generator=generator), manifold=st
        )
        self.b = nn.Parameter(torch.randn(2, dtype=F64, generator=generator))

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b)


def _riemannian_problem(generator):
    model = _StiefelRegression(generator)
    x = torch.randn(12, 4, dtype=F64, generator=generator)
    y = torch.randn(12, 2, dtype=F64, generator=generator)
    return model, _sq, x, y


def _loss_of(model, loss_fn, x, y):
    ref = copy.deepcopy(model)

    def loss(w, b):
        return loss_fn(torch.func.functional_call(ref, {"w": w, "b": b}, (x,)), y)

    return loss


def test_tied_weight_left_out_of_the_selection_stays_tied(generator):
    """The tied weight frozen (not selected): both layers keep using the one tensor."""
    model, loss_fn, x, y = _tied_mse(generator)
    names = ["0.bias", "2.bias", "4.weight", "4.bias"]
    for cls in ORACLES:
        op = cls(model, loss_fn, (x, y), params=names)
        torch.testing.assert_close(
            op.to_dense(), ORACLES[cls](model, loss_fn, (x, y), params=names), atol=1e-10, rtol=0
        )


def test_riemannian_gradient_follows_parameter_updates(generator):
    """Without a cached graph (several batches) the operator reads the parameters at
    product time: after an in-place step its products equal a fresh operator's, whose
    ``ehess2rhess`` term needs the gradient at the new point."""
    model, loss_fn, x, y = _riemannian_problem(generator)
    data = _batches(x, y, (0, 5, 12))
    op = HessianOperator(model, loss_fn, data, riemannian=True)
    v = torch.randn(op.shape[0], 2, dtype=F64, generator=generator)
    before = op @ v
    st = model.w.manifold
    with torch.no_grad():
        model.w.copy_(st.retr(model.w, st.proju(model.w, 0.3 * torch.randn_like(model.w))))
    after = op @ v
    fresh = HessianOperator(model, loss_fn, data, riemannian=True) @ v
    torch.testing.assert_close(after, fresh, atol=1e-12, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the step changed the operator


def test_riemannian_hessian_matches_ehess2rhess(generator):
    model, loss_fn, x, y = _riemannian_problem(generator)
    st, w, b = model.w.manifold, model.w.detach(), model.b.detach()
    loss = _loss_of(model, loss_fn, x, y)
    egrad_w = torch.func.grad(loss, argnums=0)(w, b)
    for data in [(x, y), _batches(x, y, (0, 5, 12))]:
        op = HessianOperator(model, loss_fn, data, riemannian=True)
        v = {
            "w": torch.randn(4, 2, dtype=F64, generator=generator),
            "b": torch.randn(2, dtype=F64, generator=generator),
        }
        u = {"w": st.proju(w, v["w"]), "b": v["b"]}
        _, (hu_w, hu_b) = torch.func.jvp(
            torch.func.grad(loss, argnums=(0, 1)), (w, b), (u["w"], u["b"])
        )
        out = op @ v
        torch.testing.assert_close(
            out["w"], st.ehess2rhess(w, egrad_w, hu_w, u["w"]), atol=1e-10, rtol=0
        )
        torch.testing.assert_close(out["b"], hu_b, atol=1e-10, rtol=0)
        # tangent output, symmetric on the tangent space
        skew = w.mT @ out["w"]
        torch.testing.assert_close(skew + skew.mT, torch.zeros(2, 2, dtype=F64), atol=1e-12, rtol=0)
        t1 = op.flatten(
            {
                "w": st.proju(w, torch.randn(4, 2, dtype=F64, generator=generator)),
                "b": torch.randn(2, dtype=F64, generator=generator),
            }
        )
        t2 = op.flatten(
            {
                "w": st.proju(w, torch.randn(4, 2, dtype=F64, generator=generator)),
                "b": torch.randn(2, dtype=F64, generator=generator),
            }
        )
        torch.testing.assert_close(t1 @ (op @ t2), (op @ t1) @ t2, atol=1e-12, rtol=0)


def test_riemannian_hessian_matches_finite_differences(generator):
    """Hess f(x)[u] = P_x d/dt rgrad(c(t)) at t = 0 for a curve with c'(0) = u."""
    model, loss_fn, x, y = _riemannian_problem(generator)
    st, w, b = model.w.manifold, model.w.detach(), model.b.detach()
    loss = _loss_of(model, loss_fn, x, y)
    u_w = st.proju(w, torch.randn(4, 2, dtype=F64, generator=generator))
    u_b = torch.randn(2, dtype=F64, generator=generator)

    def rgrad(t):
        wt, bt = st.retr(w, t * u_w), b + t * u_b
        gw, gb = torch.func.grad(loss, argnums=(0, 1))(wt, bt)
        return st.proju(wt, gw), gb

    h = 1e-5
    (pw, pb), (mw, mb) = rgrad(h), rgrad(-h)
    fd_w, fd_b = st.proju(w, (pw - mw) / (2 * h)), (pb - mb) / (2 * h)
    out = HessianOperator(model, loss_fn, (x, y), riemannian=True) @ {"w": u_w, "b": u_b}
    torch.testing.assert_close(out["w"], fd_w, atol=1e-8, rtol=0)
    torch.testing.assert_close(out["b"], fd_b, atol=1e-8, rtol=0)


class _ManifoldRegression(nn.Module):
    def __init__(self, manifold, shape, generator):
        super().__init__()
        point = manifold.random(*shape, dtype=F64, generator=generator)
        self.w = geoopt.ManifoldParameter(point, manifold=manifold)

    def forward(self, x):
        return torch.tanh(x @ self.w[:, :2])


RIEMANNIAN_CASES = {
    "stiefel-euclidean": (Stiefel(), (4, 2)),
    "stiefel-canonical": (Stiefel(metric="canonical"), (4, 2)),
    "spd-affine-invariant": (SPDAffineInvariant(), (4, 4)),
    "spd-log-euclidean": (SPDLogEuclidean(), (4, 4)),
    "spd-bures-wasserstein": (SPDBuresWasserstein(), (4, 4)),
}


@pytest.mark.parametrize("name", RIEMANNIAN_CASES)
def test_riemannian_hessian_is_the_second_derivative_along_geodesics(name, generator):
    """<v, Hess f(x)[u]>_x by polarization of d^2/dt^2 f(exp_x(t w)) at t = 0.

    Along a geodesic the second derivative of the cost is the Riemannian Hessian's
    quadratic form, for any metric (embedded or not)."""
    manifold, shape = RIEMANNIAN_CASES[name]
    model = _ManifoldRegression(manifold, shape, generator)
    x = torch.randn(9, 4, dtype=F64, generator=generator)
    y = torch.randn(9, 2, dtype=F64, generator=generator)
    point = model.w.detach().clone()
    op = HessianOperator(model, _sq, [(x[:4], y[:4]), (x[4:], y[4:])], riemannian=True)

    def cost(w):
        return _sq(torch.tanh(x @ w[:, :2]), y)

    def second_derivative(w, h=1e-4):
        return (
            cost(manifold.expmap(point, h * w))
            - 2 * cost(point)
            + cost(manifold.expmap(point, -h * w))
        ) / h**2

    u, v = (manifold.random_tangent(point, generator=generator) for _ in range(2))
    hu = op @ {"w": u}
    assert torch.equal(model.w.detach(), point)
    torch.testing.assert_close(manifold.proju(point, hu["w"]), hu["w"], atol=1e-12, rtol=0)
    torch.testing.assert_close(
        manifold.inner(point, u, hu["w"]), second_derivative(u), atol=1e-6, rtol=1e-6
    )
    polarized = (second_derivative(u + v) - second_derivative(u - v)) / 4
    torch.testing.assert_close(manifold.inner(point, v, hu["w"]), polarized, atol=1e-6, rtol=1e-6)


def test_riemannian_needs_ehess2rhess(generator):
    model = nn.Linear(3, 1).to(F64)
    model.weight = geoopt.ManifoldParameter(
        torch.tensor([[0.6, 0.8, 0.0]], dtype=F64), manifold=geoopt.Sphere()
    )
    x, y = (
        torch.randn(4, 3, dtype=F64, generator=generator),
        torch.randn(4, 1, dtype=F64, generator=generator),
    )
    with pytest.raises(TypeError, match="ehess2rhess"):
        HessianOperator(model, _mse, (x, y), riemannian=True)
    # without riemannian=True the manifold is ignored: the Euclidean Hessian
    HessianOperator(model, _mse, (x, y)).to_dense()


@pytest.mark.parametrize("problem", PROBLEMS)
def test_probes_on_model_operators_match_the_dense_hessian(problem, generator):
    # The engine and the probes together: eigsh and SLQ on a real HessianOperator.
    from torsion.curvature import eigsh, spectral_density

    model, loss_fn, x, y = PROBLEMS[problem](generator)
    dense = _dense_hessian(model, loss_fn, x, y)
    op = HessianOperator(model, loss_fn, _batches(x, y, SPLITS[-1]))
    exact = torch.linalg.eigvalsh(dense)
    result = eigsh(op, k=2, which="LA", tol=1e-10, generator=generator)
    torch.testing.assert_close(result.eigenvalues, exact.flip(0)[:2], atol=1e-8, rtol=1e-8)
    tree = result.eigenvector_trees[0]
    assert set(tree) == {name for name, p in model.named_parameters() if p.requires_grad}
    grid, density = spectral_density(op, num_probes=4, num_steps=op.shape[0], generator=generator)
    mass = torch.trapezoid(density, grid)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-3, rtol=0)


def test_fisher_falls_back_to_autograd_on_data_dependent_control_flow(generator):
    """vmap cannot run a loss that branches on a value; "auto" must take autograd."""
    model, _, x, y = _mlp_mse(generator)

    def loss(out, target):
        d = out - target
        return (d**2).mean() if bool(d.abs().max() < 10) else d.abs().mean()

    auto = EmpiricalFisherOperator(model, loss, (x, y)).to_dense()
    by_autograd = EmpiricalFisherOperator(model, loss, (x, y), method="autograd").to_dense()
    torch.testing.assert_close(auto, by_autograd)


class _Forces(nn.Module):
    """Forces ``-dE/dpos`` of a small energy model: a forward torch.func cannot run."""

    def __init__(self, generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, dtype=F64, generator=generator))
        self.v = nn.Parameter(torch.randn(4, dtype=F64, generator=generator))

    def forward(self, pos):
        pos = pos.detach().requires_grad_()
        energy = (torch.tanh(pos @ self.w.T) @ self.v).square().sum()
        (force,) = torch.autograd.grad(-energy, pos, create_graph=True)
        return force


def test_ggn_falls_back_to_autograd_and_keeps_it(generator):
    """A model whose forward calls ``torch.autograd.grad`` cannot run under torch.func:
    ``"auto"`` computes the GGN by autograd (against a dense ``J^T H J`` with the Jacobian
    built row by row) and, as documented, its ``method`` attribute then reads
    ``"autograd"``, so that later products skip the failing torch.func attempt."""
    model = _Forces(generator)
    pos = torch.randn(6, 3, dtype=F64, generator=generator)
    y = torch.randn(6, 3, dtype=F64, generator=generator)
    op = GGNOperator(model, _sq, (pos, y))
    assert op.method == "auto"
    v = torch.randn(op.shape[0], 2, dtype=F64, generator=generator)
    got = op @ v
    assert op.method == "autograd"
    out = model(pos).reshape(-1)
    params = [model.w, model.v]
    jac = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
            for o in out
        ]
    )
    h_loss = torch.func.hessian(lambda o: _sq(o.reshape(6, 3), y))(out.detach())
    torch.testing.assert_close(got, jac.T @ h_loss @ jac @ v, atol=1e-10, rtol=0)
