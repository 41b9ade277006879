import pytest
import torch

from tests.nn._spd import F64, random_spd
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
