import pytest
import torch

from tests.nn._spd import F64, random_spd
from torsion.curvature import hvp
from torsion.nn import FRMap, OrthMap, ProjMap, ProjPooling, ReOrth


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def _frames(*shape, n, p, generator):
    return torch.linalg.qr(torch.randn(*shape, n, p, dtype=F64, generator=generator))[0]


def test_frmap_reorth_projmap_pipeline(generator):
    x = _frames(5, n=8, p=3, generator=generator)
    frmap = FRMap(8, 6, dtype=F64)
    y = frmap(x)
    torch.testing.assert_close(y, frmap.weight.detach() @ x)
    q = ReOrth()(y)
    torch.testing.assert_close(
        q.mT @ q, torch.eye(3, dtype=F64).expand(5, 3, 3), atol=1e-12, rtol=0
    )
    # same subspace as W X: the projector onto the column space
    proj = ProjMap()(q)
    torch.testing.assert_close(proj @ y, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(proj, proj.mT)
    multi = FRMap(8, 6, channels=4, dtype=F64)
    assert multi(x).shape == (5, 4, 6, 3)
    torch.testing.assert_close(multi(x)[:, 2], multi.weight.detach()[2] @ x)


def test_projpooling_averages_channel_groups(generator):
    x = ProjMap()(_frames(2, 6, n=5, p=2, generator=generator))
    y = ProjPooling(3)(x)
    assert y.shape == (2, 2, 5, 5)
    torch.testing.assert_close(y[:, 1], x[:, 3:6].mean(dim=1))
    with pytest.raises(ValueError, match="divisible by 4"):
        ProjPooling(4)(x)


def test_orthmap_spans_the_top_eigenspace(generator):
    x = random_spd(4, n=6, generator=generator, spread=2.0)
    u = OrthMap(2)(x)
    lam, vectors = torch.linalg.eigh(x)
    top = vectors[..., -2:]
    torch.testing.assert_close(u @ u.mT, top @ top.mT, atol=1e-10, rtol=0)
    rayleigh = (u * (x @ u)).sum(-2)
    torch.testing.assert_close(rayleigh, lam[..., -2:].flip(-1))  # descending order


def test_subspace_gradient_matches_finite_differences(generator):
    x = random_spd(3, n=5, generator=generator, spread=2.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ProjMap()(OrthMap(2)(a)), (x,))


def test_orthmap_gradient_finite_with_repeated_top_eigenvalues():
    x = torch.diag(torch.tensor([5.0, 5.0, 1.0, 0.5], dtype=F64)).requires_grad_()
    target = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    (ProjMap()(OrthMap(2)(x)) * target).sum().backward()
    assert torch.isfinite(x.grad).all()


def _symmetric(lam, generator):
    """``Q diag(lam) Q^T`` in float64 with a Haar ``Q``."""
    q = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=F64, generator=generator))[0]
    return (q * torch.tensor(lam, dtype=F64)) @ q.mT


def _eigh_top(x, p):
    """The top-``p`` eigenvectors by plain ``eigh`` autograd: exact away from exact ties."""
    return torch.linalg.eigh((x + x.mT) / 2)[1][..., -p:]


def test_orthmap_second_derivatives_pass_gradgradcheck(generator):
    x = random_spd(2, n=5, generator=generator, spread=2.0).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: ProjMap()(OrthMap(2)(a)), (x,))


@pytest.mark.parametrize(
    "lam",
    [
        [5.0, 3.0, 2.0, 1.0, 0.5, 0.2],
        [5.0, 5.0, 5.0, 1.0, 0.5, 0.5],
        [5.0, 4.0, 4.0, 1.0, 1.0, 0.2],
    ],
    ids=["distinct", "tied-top", "tied-inside"],
)
@pytest.mark.parametrize("method", ["double_backward", "reverse_over_reverse"])
def test_orthmap_hessian_vector_product_matches_finite_differences(lam, method, generator):
    # any function of the subspace (here not through ProjMap) has exact second
    # derivatives, also where eigenvalues repeat on one side of the cut
    x = _symmetric(lam, generator)
    a = torch.randn(6, 6, dtype=F64, generator=generator)
    metric = a @ a.mT + torch.eye(6, dtype=F64)

    def loss(s):
        u = OrthMap(3)(s)
        return torch.logdet(u.mT @ metric @ u)

    def gradient(s):
        s = s.clone().requires_grad_()
        return torch.autograd.grad(loss(s), s)[0]

    v = torch.randn(6, 6, dtype=F64, generator=generator)
    v = v + v.mT
    h = 1e-6
    expected = (gradient(x + h * v) - gradient(x - h * v)) / (2 * h)
    torch.testing.assert_close(hvp(loss, x, v, method=method), expected, rtol=1e-7, atol=1e-7)


def test_grassmann_net_hessian_vector_product_matches_finite_differences(generator):
    net = torch.nn.Sequential(
        FRMap(6, 5, channels=2), ReOrth(), ProjMap(), ProjPooling(2), OrthMap(2), ProjMap()
    ).double()
    x = _frames(4, n=6, p=2, generator=generator)
    target = torch.randn(4, 1, 5, 5, dtype=F64, generator=generator)
    weight = net[0].weight.detach()

    def loss(w):
        return (torch.func.functional_call(net, {"0.weight": w}, (x,)) * target).sum()

    def gradient(w):
        w = w.clone().requires_grad_()
        return torch.autograd.grad(loss(w), w)[0]

    v = torch.randn(weight.shape, dtype=F64, generator=generator)
    h = 1e-6
    expected = (gradient(weight + h * v) - gradient(weight - h * v)) / (2 * h)
    torch.testing.assert_close(hvp(loss, weight, v), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("dtype", "gap"), [(torch.float32, 1e-3), (F64, 1e-6)])
def test_orthmap_gradient_resolves_near_ties_across_the_cut(dtype, gap, generator):
    # the subspace is well defined at gaps far above eigh's resolution eps * max|lambda|,
    # and its derivative 1 / gap has no cancellation: nothing may be dropped there
    x = _symmetric([1.0, 1.0 - gap, 0.5, 0.1], generator)
    target = torch.randn(4, 4, dtype=F64, generator=generator)
    oracle = x.clone().requires_grad_()
    (ProjMap()(_eigh_top(oracle, 1)) * target).sum().backward()
    layer = x.to(dtype).requires_grad_()
    (ProjMap()(OrthMap(1)(layer)) * target.to(dtype)).sum().backward()
    assert (layer.grad.double() - oracle.grad).norm() < 1e-3 * oracle.grad.norm()


def test_orthmap_gradient_with_one_huge_eigenvalue(generator):
    # ties are judged at eigh's resolution, not relative to the largest eigenvalue alone:
    # the pair 1e-3, 5e-4 is resolved although 1e3 sits elsewhere in the spectrum
    x = _symmetric([1e3, 1e-3, 5e-4, 1e-4], generator)
    target = torch.randn(4, 4, dtype=F64, generator=generator)
    direction = torch.randn(4, 4, dtype=F64, generator=generator)
    direction = direction + direction.mT

    def loss(s, top):
        return (ProjMap()(top(s)) * target).sum()

    oracle = x.clone().requires_grad_()
    loss(oracle, lambda s: _eigh_top(s, 2)).backward()
    layer = x.clone().requires_grad_()
    loss(layer, OrthMap(2)).backward()
    torch.testing.assert_close(layer.grad, oracle.grad, rtol=1e-9, atol=1e-9)
    h = 1e-9
    finite = (loss(x + h * direction, OrthMap(2)) - loss(x - h * direction, OrthMap(2))) / (2 * h)
    torch.testing.assert_close((layer.grad * direction).sum(), finite, rtol=1e-4, atol=0)


def test_orthmap_gradients_under_vmap(generator):
    x = random_spd(3, n=5, generator=generator, spread=2.0)
    target = torch.randn(5, 5, dtype=F64, generator=generator)

    def loss(s):
        return (ProjMap()(OrthMap(2)(s)) * target).sum()

    batched = torch.func.vmap(torch.func.grad(loss))(x)
    torch.testing.assert_close(batched, torch.stack([torch.func.grad(loss)(s) for s in x]))


def test_orthmap_third_derivative_raises(generator):
    x = random_spd(n=4, generator=generator, spread=2.0).requires_grad_()
    (grad,) = torch.autograd.grad(ProjMap()(OrthMap(2)(x)).pow(2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives of OrthMap"):
        torch.autograd.grad(second.sum(), x)


def test_grassmann_net_compiles_without_graph_breaks(generator):
    net = torch.nn.Sequential(
        FRMap(8, 6, channels=4), ReOrth(), ProjMap(), ProjPooling(2), OrthMap(2), ProjMap()
    )
    x = _frames(3, n=8, p=2, generator=generator).float()
    explanation = torch._dynamo.explain(lambda a: net(a).sum())(x)
    assert explanation.graph_break_count == 0


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8, q\)"):
        FRMap(8, 4)(torch.ones(7, 2))
    with pytest.raises(ValueError, match="n >= 3"):
        OrthMap(3)(torch.eye(2))


@pytest.mark.parametrize(("in_size", "out_size"), [(8, 5), (3, 6)])
def test_frmap_starts_semi_orthogonal(in_size, out_size):
    """The documented initialisation: ``W`` (semi-)orthogonal, so full rank, in every channel."""
    torch.manual_seed(0)
    for layer in (FRMap(in_size, out_size, dtype=F64), FRMap(in_size, out_size, 3, dtype=F64)):
        w = layer.weight.detach()
        gram = w @ w.mT if out_size <= in_size else w.mT @ w
        eye = torch.eye(min(in_size, out_size), dtype=F64).expand_as(gram)
        torch.testing.assert_close(gram, eye, atol=1e-12, rtol=0)


def test_orthmap_gradient_treats_unresolvable_gaps_across_the_cut_as_ties(generator):
    """A gap across the cut below ``n eps max|lambda|`` (what eigh cannot resolve, see
    ``_cut``) gets the weight of an exact tie, zero, not ``1 / gap`` (1e15 here)."""
    eps = torch.finfo(F64).eps
    target = torch.randn(4, 4, dtype=F64, generator=generator)

    def gradient(lam):
        x = torch.diag(torch.tensor(lam, dtype=F64)).requires_grad_()
        (ProjMap()(OrthMap(1)(x)) * target).sum().backward()
        return x.grad

    near = gradient([0.1, 0.5, 1.0 - 2 * eps, 1.0])
    torch.testing.assert_close(near, gradient([0.1, 0.5, 1.0, 1.0]), atol=1e-12, rtol=0)
    assert near.norm() < 10 * target.norm()
