import copy

import numpy as np
import pytest
import scipy.linalg
import torch

from tests.nn._spd import F64, eigvals, random_spd
from torsion.nn import BiMap, CovPool, ExpEig, LogEig, PowEig, ReEig, SPDBatchNorm, SPDVectorize


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- BiMap


def test_bimap_is_the_congruence_with_orthonormal_weights(generator):
    layer = BiMap(6, 3, dtype=F64)
    w = layer.weight.detach()[0, 0]
    torch.testing.assert_close(w.mT @ w, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)
    x = random_spd(4, n=6, generator=generator)
    y = layer(x)
    torch.testing.assert_close(y, w.mT @ x @ w)
    assert y.shape == (4, 3, 3) and (eigvals(y) > 0).all()


def test_bimap_channels_sum_the_input_channels(generator):
    layer = BiMap(5, 2, in_channels=3, out_channels=4, dtype=F64)
    x = random_spd(7, 3, n=5, generator=generator)
    y = layer(x)
    w = layer.weight.detach()
    expected = torch.stack(
        [sum(w[o, i].mT @ x[:, i] @ w[o, i] for i in range(3)) for o in range(4)], dim=1
    )
    torch.testing.assert_close(y, expected)
    assert y.shape == (7, 4, 2, 2) and (eigvals(y) > 0).all()


def test_bimap_gradcheck(generator):
    layer = BiMap(4, 2, in_channels=2, out_channels=2, dtype=F64)
    x = random_spd(3, 2, n=4, generator=generator).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


def test_bimap_bad_input():
    with pytest.raises(ValueError, match="rank-deficient"):
        BiMap(3, 4)
    with pytest.raises(ValueError, match="positive int"):
        BiMap(0, 0)
    layer = BiMap(4, 2, in_channels=2, out_channels=1)
    with pytest.raises(ValueError, match="4 x 4"):
        layer(torch.eye(3).expand(2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, n, n\)"):
        layer(torch.eye(4).expand(5, 3, 4, 4))


# ----------------------------------------------------------------------------- eigen layers


def _spectral_oracle(x, f):
    lam, q = torch.linalg.eigh(x)
    return (q * f(lam)[..., None, :]) @ q.mT


def test_reeig_clamps_and_has_finite_gradients_at_the_identity(generator):
    x = random_spd(5, n=4, generator=generator, spread=3.0)
    y = ReEig(1e-1)(x)
    torch.testing.assert_close(y, _spectral_oracle(x, lambda t: t.clamp_min(1e-1)))
    assert (eigvals(y) >= 1e-1 - 1e-12).all()
    eye = torch.eye(4, dtype=F64).repeat(3, 1, 1).requires_grad_()
    (ReEig()(eye) * torch.randn(3, 4, 4, dtype=F64, generator=generator)).sum().backward()
    assert torch.isfinite(eye.grad).all()


@pytest.mark.parametrize(
    ("layer", "oracle"),
    [
        (LogEig(), scipy.linalg.logm),
        (ExpEig(), scipy.linalg.expm),
        (PowEig(0.3), lambda a: scipy.linalg.fractional_matrix_power(a, 0.3)),
        (PowEig(-1.5), lambda a: scipy.linalg.fractional_matrix_power(a, -1.5)),
    ],
    ids=["log", "exp", "pow0.3", "pow-1.5"],
)
def test_eigen_layers_match_scipy(layer, oracle, generator):
    x = random_spd(3, n=5, generator=generator)
    expected = np.stack([np.real(oracle(a.numpy())) for a in x])
    torch.testing.assert_close(layer(x), torch.from_numpy(expected), atol=1e-10, rtol=1e-10)


def test_eigen_layers_gradcheck(generator):
    x = random_spd(2, n=3, generator=generator).requires_grad_()
    for layer in (ReEig(0.05), LogEig(), ExpEig(), PowEig(0.5)):
        assert torch.autograd.gradcheck(layer, (x,))


def test_checking_names_non_spd_input():
    bad = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="positive"):
        LogEig(check=True)(bad)
    with pytest.raises(ValueError, match="symmetric"):
        ReEig(check=True)(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        LogEig()(torch.ones(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="eps"):
        ReEig(0.0)


# ----------------------------------------------------------------------------- CovPool, vectorize


def test_covpool_is_shrunk_covariance_and_spd(generator):
    x = torch.randn(4, 6, 3, dtype=F64, generator=generator)  # T = 3 < d = 6: C is singular
    y = CovPool(0.1)(x)
    cov = torch.stack([torch.cov(a) for a in x])
    mu = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    torch.testing.assert_close(y, 0.9 * cov + 0.1 * mu[:, None, None] * torch.eye(6, dtype=F64))
    assert (eigvals(y) > 0).all()
    constant = CovPool(0.5)(torch.ones(2, 3, 5, dtype=F64))
    assert (eigvals(constant) > 0).all()
    with pytest.raises(ValueError, match="shrinkage"):
        CovPool(0.0)


def test_vectorize_preserves_the_frobenius_norm(generator):
    x = random_spd(5, n=4, generator=generator)
    v = SPDVectorize()(x)
    assert v.shape == (5, 10)
    # to float64 rounding (sqrt(2) was a float32 constant: 1.6e-8 relative error)
    torch.testing.assert_close(
        torch.linalg.vector_norm(v, dim=-1), torch.linalg.matrix_norm(x), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(
        v[:, :4], torch.stack([x[:, 0, 0], *(2**0.5 * x[:, 0, j] for j in (1, 2, 3))], dim=1)
    )


# ----------------------------------------------------------------------------- SPDNet


def _spdnet():
    return torch.nn.Sequential(
        BiMap(8, 6),
        ReEig(),
        BiMap(6, 4),
        ReEig(),
        LogEig(),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )


def test_eigen_layers_compile_with_dynamic_shapes(generator):
    """Under dynamic=True the layers' float options become symbolic; a value check on
    them (math.isfinite) broke the graph (fullgraph=True raised)."""
    net = torch.nn.Sequential(ReEig(), PowEig(0.5), SPDBatchNorm(4, "airm"))
    compiled = torch.compile(net, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (3, 5):
        x = random_spd(batch, n=4, generator=generator, dtype=torch.float32)
        torch.testing.assert_close(compiled(x), copy.deepcopy(net)(x), rtol=1e-4, atol=1e-5)


def test_spdnet_compiles_without_graph_breaks(generator):
    torch.manual_seed(0)
    net = _spdnet()
    x = random_spd(5, n=8, generator=generator, dtype=torch.float32)

    def step(x):
        loss = net(x).square().sum()
        return torch.autograd.grad(loss, list(net.parameters()))

    explanation = torch._dynamo.explain(lambda x: net(x).square().sum())(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(lambda x: net(x).square().sum(), fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(x), list(net.parameters()))
    for g, e in zip(grads, step(x), strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_state_dict_and_deepcopy(generator):
    torch.manual_seed(1)
    net = _spdnet().double()
    x = random_spd(3, n=8, generator=generator)
    clone = copy.deepcopy(net)
    torch.testing.assert_close(clone(x), net(x))
    assert clone[0].weight.manifold is not net[0].weight.manifold
    torch.manual_seed(2)
    fresh = _spdnet().double()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x))


def test_spdnet_with_batchnorm_trains_with_riemannian_adam(generator):
    from torsion.nn import SPDBatchNorm
    from torsion.optim import RiemannianAdam

    torch.manual_seed(3)
    model = torch.nn.Sequential(
        BiMap(6, 4), ReEig(), SPDBatchNorm(4), LogEig(), SPDVectorize(), torch.nn.Linear(10, 2)
    ).double()
    x = random_spd(32, n=6, generator=generator)
    y = (x.diagonal(dim1=-2, dim2=-1)[:, 0] > x.diagonal(dim1=-2, dim2=-1)[:, 1]).long()
    optimizer = RiemannianAdam(model.parameters(), lr=5e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    w = model[0].weight.detach()[0, 0]
    torch.testing.assert_close(w.mT @ w, torch.eye(4, dtype=F64), atol=1e-10, rtol=0)
    assert (eigvals(model[2].bias.detach()) > 0).all()


def test_reeig_default_floor_is_spdnets_1e_4(generator):
    q = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=generator))[0]
    lam = torch.tensor([1e-6, 5e-5, 3e-4, 2.0], dtype=F64)
    x = (q * lam) @ q.mT
    torch.testing.assert_close(
        ReEig()(x), _spectral_oracle(x, lambda t: t.clamp_min(1e-4)), atol=1e-15, rtol=0
    )


def test_check_option_reaches_every_eigen_layer(generator):
    """``check=True`` validates what each layer needs: symmetry for ExpEig and ReEig,
    positive definiteness for PowEig, and nothing more (ReEig exists to rectify
    indefinite input, ExpEig accepts any symmetric matrix)."""
    skewed = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    indefinite = torch.diag(torch.tensor([-1.0, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="symmetric"):
        ExpEig(check=True)(skewed)
    with pytest.raises(ValueError, match="positive"):
        PowEig(0.5, check=True)(indefinite)
    torch.testing.assert_close(
        ExpEig(check=True)(indefinite), torch.from_numpy(scipy.linalg.expm(indefinite.numpy()))
    )
    torch.testing.assert_close(
        ReEig(0.1, check=True)(indefinite), torch.diag(torch.tensor([0.1, 0.5], dtype=F64))
    )
