"""Fuzz the manifold-valued layers of ``torsion.nn``.

SPD inputs come with generic, repeated, identity, ill-conditioned and badly scaled
spectra; singular and indefinite inputs are fed to the layers that promise a finite
result for them (``ReEig``, ``LogEig`` without ``check``). Oracles: the definitions
(``W^T X W``, numpy ``eigh`` for the spectral layers), SPD-ness of the outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz._strategies import (
    assert_finite,
    assert_unchanged,
    clones,
    fuzz_settings,
    generator,
    spd_cases,
    spectrum,
    symmetric_with_spectrum,
)
from torsion.nn import (
    BiMap,
    FRMap,
    LogEig,
    OrthMap,
    ProjMap,
    ReEig,
    ReOrth,
    SPDBatchNorm,
    SPDConv,
)

WELL_RESOLVED = ("generic", "repeated", "identity")


def _oracle(x: torch.Tensor, f) -> np.ndarray:
    a = x.detach().double().numpy()
    w, v = np.linalg.eigh((a + np.swapaxes(a, -1, -2)) / 2)
    return (v * f(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


def _is_spd(x: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    x = x.detach()
    tolerance = 100 * torch.finfo(x.dtype).eps * float(x.abs().max())
    x = x.double()
    symmetric = torch.allclose(x, x.mT, rtol=0, atol=tolerance)
    return symmetric and bool((torch.linalg.eigvalsh(x)[..., 0] > 0).all())


@fuzz_settings(40)
@given(
    case=spd_cases(max_n=5),
    out=st.integers(1, 5),
    channels=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bimap_is_the_congruence(case, out, channels, seed):
    x64, dtype, _ = case
    n = x64.shape[-1]
    out = min(out, n)
    torch.manual_seed(seed)
    layer = BiMap(n, out, 2, 3, dtype=dtype) if channels else BiMap(n, out, dtype=dtype)
    x = x64.to(dtype)
    if channels:
        x = torch.stack([x, 2 * x], dim=-3)
    before = clones(x=x)
    y = layer(x)
    assert_unchanged(before, {"x": x})
    assert_finite(y, "BiMap")
    w = layer.weight.detach().double()
    if channels:
        expected = (w.mT @ x.double().unsqueeze(-4) @ w).sum(dim=-3)
    else:
        expected = w[0, 0].mT @ x.double() @ w[0, 0]
    scale = 1.0 + float(x64.abs().max()) if x64.numel() else 1.0
    assert torch.allclose(y.double(), expected, rtol=0, atol=50 * torch.finfo(dtype).eps * scale)
    with pytest.raises(TypeError, match=r"dtype|float"):
        # Regression (fuzz find): a float32 input to float64 weights failed in matmul
        layer(x.to(torch.float32 if dtype == torch.float64 else torch.float64))


@fuzz_settings(50)
@given(
    n=st.integers(1, 5),
    batch=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    kind=st.sampled_from(["generic", "singular", "indefinite", "ill_conditioned", "identity"]),
    eps=st.sampled_from([1e-4, 1e-2, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reeig_and_logeig_match_eigh_oracle(n, batch, kind, eps, dtype, seed):
    gen = generator(seed)
    base = "ill_conditioned" if kind == "ill_conditioned" else "generic"
    w = spectrum("identity" if kind == "identity" else base, n, batch, gen)
    if kind == "singular":
        w[..., 0] = 0.0
    if kind == "indefinite":
        w[..., 0] = -w[..., 0]
    x = symmetric_with_spectrum(w, gen).to(dtype)
    before = clones(x=x)
    rectified = ReEig(eps)(x)
    logs = LogEig()(rectified)
    unchecked = LogEig()(x)  # singular / indefinite: floored, finite (documented)
    assert_unchanged(before, {"x": x})
    for name, value in (("ReEig", rectified), ("LogEig", logs), ("LogEig(raw)", unchecked)):
        assert_finite(value, name)
    tolerance = 100 * n * torch.finfo(dtype).eps * (1 + float(w.abs().max()) if w.numel() else 1)
    expected = _oracle(x, lambda v: np.maximum(v, eps))
    np.testing.assert_allclose(rectified.double().numpy(), expected, rtol=0, atol=tolerance)
    expected = _oracle(rectified, np.log)
    np.testing.assert_allclose(
        logs.double().numpy(),
        expected,
        rtol=0,
        atol=tolerance / eps + 1e-5 * (dtype == torch.float32),
    )
    if kind in ("singular", "indefinite") and x.numel():
        with pytest.raises(ValueError, match="positive definite"):
            LogEig(check=True)(x)


@pytest.mark.parametrize("metric", ["airm", "lem", "lcm"])
@fuzz_settings(25)
@given(
    case=spd_cases(max_n=4, max_batch=4, kinds=(*WELL_RESOLVED, "ill_conditioned")),
    momentum=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_spd_batchnorm_outputs_spd_and_finite_statistics(metric, case, momentum):
    x64, dtype, _ = case
    n = x64.shape[-1]
    layer = SPDBatchNorm(n, metric, momentum, dtype=dtype)
    x = x64.to(dtype)
    before = clones(x=x)
    if x.numel() == 0:
        # Regression (fuzz find): an empty training batch failed inside eigh with "the
        # algorithm failed to converge"; it now names the problem.
        with pytest.raises(ValueError, match="empty batch"):
            layer(x)
        layer.eval()
        assert layer(x).shape == x.shape
        return
    if x.ndim == 2:
        x = x.unsqueeze(0)
        before = clones(x=x)
    y = layer(x)
    assert_unchanged(before, {"x": x})
    assert_finite(y, f"SPDBatchNorm({metric})")
    assert_finite(layer.running_mean, "running_mean")
    assert_finite(layer.running_var, "running_var")
    if torch.finfo(dtype).eps * _max_condition(x64) < 1e-4:
        assert _is_spd(y)
        assert _is_spd(layer.running_mean)
    layer.eval()
    assert_finite(layer(x), f"SPDBatchNorm({metric}) in eval mode")


def _max_condition(x64: torch.Tensor) -> float:
    w = torch.linalg.eigvalsh(x64)
    return float((w[..., -1] / w[..., 0]).max())


@pytest.mark.parametrize("aggregation", ["log_euclidean", "affine_invariant"])
@fuzz_settings(30)
@given(
    num_nodes=st.integers(0, 6),
    num_edges=st.integers(0, 10),
    n=st.integers(2, 4),
    kind=st.sampled_from(WELL_RESOLVED),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_spd_conv_on_sparse_and_empty_graphs(
    aggregation, num_nodes, num_edges, n, kind, weighted, seed
):
    gen = generator(seed)
    num_edges = num_edges if num_nodes else 0
    x = symmetric_with_spectrum(spectrum(kind, n, (num_nodes,), gen), gen)
    edge_index = torch.randint(0, max(num_nodes, 1), (2, num_edges), generator=gen)
    weight = torch.rand(num_edges, dtype=torch.float64, generator=gen) + 0.1 if weighted else None
    torch.manual_seed(seed)
    layer = SPDConv(n, n - 1, aggregation, dtype=torch.float64)
    tensors = {"x": x, "edge_index": edge_index} | ({"weight": weight} if weighted else {})
    before = clones(**tensors)
    y = layer(x, edge_index, weight)
    assert_unchanged(before, tensors)
    assert y.shape == (num_nodes, n - 1, n - 1)
    assert_finite(y, "SPDConv")
    assert _is_spd(y)
    if num_nodes:
        with pytest.raises((IndexError, ValueError), match=r"edge_index|index"):
            layer(x, torch.tensor([[0], [num_nodes]]))


@fuzz_settings(30)
@given(
    n=st.integers(2, 6),
    q=st.integers(1, 3),
    p=st.integers(1, 3),
    rank_deficient=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_grassmann_layers_are_finite_on_degenerate_input(n, q, p, rank_deficient, seed):
    q = min(q, n)
    p = min(p, n)
    gen = generator(seed)
    x = torch.randn(3, n, q, dtype=torch.float64, generator=gen)
    if rank_deficient:
        x[..., 0] = 0.0
    before = clones(x=x)
    torch.manual_seed(seed)
    frames = ReOrth()(FRMap(n, n, dtype=torch.float64)(x))
    projection = ProjMap()(frames)
    top = OrthMap(p)(projection)  # eigenvalues 1 (q-fold) and 0 repeat: ties everywhere
    assert_unchanged(before, {"x": x})
    for name, value in (("ReOrth", frames), ("ProjMap", projection), ("OrthMap", top)):
        assert_finite(value, name)
    eye = torch.eye(p, dtype=torch.float64).expand(3, p, p)
    assert torch.allclose(top.mT @ top, eye, atol=1e-10)
    if rank_deficient:
        return  # QR is not differentiable at rank-deficient input (torch's backward is NaN)
    # gradients through the repeated eigenvalues stay finite
    z = x.clone().requires_grad_()
    OrthMap(p)(ProjMap()(ReOrth()(z))).pow(2).sum().backward()
    assert_finite(z.grad, "the gradient through OrthMap")
