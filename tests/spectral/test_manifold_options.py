"""``weight_manifold="stiefel"`` on the spectral filters and the eigenvector encoders.

Filters (``JacobiConv``, ``OptBasisConv``): an orthogonal channel frame ``Q``, checked
against the dense spectral definitions of ``test_filters`` applied along its columns.
Encoders (``SignNet``, ``SPE``, ``BasisNet``): an orthonormal last readout layer, checked
for the encoders' invariances with the constraint on. Both: the parameters are
``ManifoldParameter``s on ``Stiefel``, ``RiemannianAdam`` keeps them orthonormal while
lowering a loss, ``None`` is the previous layer, bad values raise.
"""

from __future__ import annotations

import contextlib
import doctest

import geoopt
import pytest
import torch

from tests.spectral._eigen_graphs import DTYPE, haar_orthogonal, normalized_adjacency
from tests.spectral.test_encoders import EigenBatch, K, _graphs
from tests.spectral.test_filters import (
    _apply_response,
    _graph,
    _randomize,
    favard_response,
    jacobi_response,
    optimal_basis_output,
)
from torsion.manifolds import Stiefel
from torsion.optim import RiemannianAdam, RiemannianSGD
from torsion.spectral import SPE, BasisNet, JacobiConv, OptBasisConv, SignNet
from torsion.spectral import _encoders as encoders_module
from torsion.spectral import _filters as filters_module

C = 4  # channels of the filters
OUT = 5  # output channels of the encoders


def _orthonormality_error(weight: torch.Tensor) -> torch.Tensor:
    """``||W^T W - I||_max`` of a tall frame."""
    weight = weight.detach()
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype)
    return (weight.mT @ weight - eye).abs().max()


@contextlib.contextmanager
def _default_float64():
    """Build modules in float64, so that Haar draws are orthonormal to float64 precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fit(module, loss_fn, steps: int, lr: float, optimizer=RiemannianAdam) -> tuple[float, float]:
    """``steps`` optimizer steps on ``loss_fn()``; the initial and final loss."""
    optimizer = optimizer(module.parameters(), lr=lr)
    initial = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
        optimizer.step()
    return initial, loss_fn().item()


# ---------------------------------------------------------------------------------------
# Filters: an orthogonal channel frame
# ---------------------------------------------------------------------------------------

FRAMED = {
    "jacobi": lambda **kw: JacobiConv(C, 3, a=-0.5, b=1.5, alpha=0.8, **kw),
    "favard": lambda **kw: OptBasisConv(C, 3, basis="favard", **kw),
    "optimal": lambda **kw: OptBasisConv(C, 3, **kw),
}


def _dense_filter(name: str, conv, op: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The unconstrained layer's dense spectral definition, from ``test_filters``."""
    if name == "optimal":
        return optimal_basis_output(conv, op, x)
    response = {"jacobi": jacobi_response, "favard": favard_response}[name]
    return _apply_response(op, response(conv), x)


def _framed(name: str, generator: torch.Generator):
    """A float64 layer with random coefficients and a Haar-random channel frame."""
    conv = _randomize(FRAMED[name](weight_manifold="stiefel"), generator)
    with torch.no_grad():
        conv.channel_frame.copy_(haar_orthogonal(C, generator))
    return conv


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_channel_frame_is_an_identity_stiefel_parameter(name):
    conv = FRAMED[name](weight_manifold="stiefel")
    assert conv.weight_manifold == "stiefel"
    frame = conv.channel_frame
    assert isinstance(frame, geoopt.ManifoldParameter)
    assert isinstance(frame.manifold, Stiefel)
    assert torch.equal(frame, torch.eye(C))
    assert "on stiefel" in repr(conv)
    conv = conv.double()
    assert isinstance(conv.channel_frame, geoopt.ManifoldParameter)
    assert conv.channel_frame.dtype == DTYPE
    with torch.no_grad():
        conv.channel_frame.mul_(-1.0)
    conv.reset_parameters()
    assert torch.equal(conv.channel_frame, torch.eye(C, dtype=DTYPE))


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_none_is_the_previous_layer_and_the_untrained_frame_changes_nothing(name, generator):
    edge_index, weight, n = _graph(generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    default, free, framed = (
        FRAMED[name]().double(),
        FRAMED[name](weight_manifold=None).double(),
        FRAMED[name](weight_manifold="stiefel").double(),
    )
    assert free.weight_manifold is None and free.channel_frame is None
    assert [p for p, _ in free.named_parameters()] == [p for p, _ in default.named_parameters()]
    assert "channel_frame" not in free.state_dict()
    expected = default(x, edge_index, weight)
    assert torch.equal(free(x, edge_index, weight), expected)
    # x @ I and y @ I^T are exact: an untrained constrained layer is the paper's layer
    assert torch.equal(framed(x, edge_index, weight), expected)


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_filters_along_the_frame_columns(name, generator):
    """Oracle: the dense spectral definition applied to ``x Q``, mapped back by ``Q^T``."""
    edge_index, weight, n = _graph(generator)
    conv = _framed(name, generator)
    q = conv.channel_frame.detach()
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    op = normalized_adjacency(edge_index, n, weight)
    expected = _dense_filter(name, conv, op, x @ q) @ q.T
    torch.testing.assert_close(conv(x, edge_index, weight), expected, rtol=0, atol=1e-8)
    # A signal along one frame column q_c comes back along q_c, filtered by channel c.
    u = torch.randn(n, 1, generator=generator, dtype=DTYPE)
    for c in range(C):
        along = _dense_filter(name, conv, op, u * torch.eye(C, dtype=DTYPE)[c])[:, c : c + 1]
        torch.testing.assert_close(
            conv(u * q[:, c], edge_index, weight), along * q[:, c], rtol=0, atol=1e-8
        )


def test_jacobi_with_equal_channel_coefficients_does_not_see_the_frame(generator):
    edge_index, weight, n = _graph(generator)
    conv = _framed("jacobi", generator)
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:, :1].expand(-1, C))
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    out = conv(x, edge_index, weight)
    with torch.no_grad():
        conv.channel_frame.copy_(torch.eye(C, dtype=DTYPE))
    torch.testing.assert_close(conv(x, edge_index, weight), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_framed_filter_is_permutation_equivariant_and_batches(name, generator):
    conv = _framed(name, generator)
    edge_index, weight, n = _graph(generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    perm = torch.randperm(n, generator=generator)
    inv = torch.argsort(perm)
    out = conv(x, edge_index, weight)
    torch.testing.assert_close(
        conv(x[perm], inv[edge_index], weight), out[perm], rtol=0, atol=1e-12
    )
    other_edges, other_weight, m = _graph(generator, 7)
    y = torch.randn(m, C, generator=generator, dtype=DTYPE)
    batch = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(m, dtype=torch.long)])
    together = conv(
        torch.cat([x, y]),
        torch.cat([edge_index, other_edges + n], 1),
        torch.cat([weight, other_weight]),
        batch=batch,
    )
    alone = torch.cat([out, conv(y, other_edges, other_weight)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_riemannian_adam_keeps_the_frame_orthogonal_and_fits_a_target(name, generator):
    edge_index, weight, n = _graph(generator)
    target = _framed(name, generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        y = target(x, edge_index, weight)
    conv = FRAMED[name](weight_manifold="stiefel").double()

    def loss() -> torch.Tensor:
        return (conv(x, edge_index, weight) - y).pow(2).mean()

    initial, final = _fit(conv, loss, steps=40, lr=0.05)
    assert final < 0.5 * initial
    frame = conv.channel_frame
    assert isinstance(frame, geoopt.ManifoldParameter)
    assert _orthonormality_error(frame) < 1e-10
    assert (frame.detach() - torch.eye(C, dtype=DTYPE)).abs().max() > 1e-3  # it did move


@pytest.mark.parametrize("name", sorted(FRAMED))
def test_riemannian_sgd_recovers_the_frame_of_a_target(name, generator):
    """Coefficients fixed to the target's: only the frame learns, on ``O(C)``."""
    edge_index, weight, n = _graph(generator)
    target = _framed(name, generator)
    x = torch.randn(n, C, generator=generator, dtype=DTYPE)
    with torch.no_grad():
        y = target(x, edge_index, weight)
    conv = FRAMED[name](weight_manifold="stiefel").double()
    conv.load_state_dict({**target.state_dict(), "channel_frame": torch.eye(C, dtype=DTYPE)})
    for p in conv.parameters():
        p.requires_grad_(p is conv.channel_frame)

    def relative_loss() -> torch.Tensor:
        return (conv(x, edge_index, weight) - y).pow(2).mean() / y.pow(2).mean()

    initial, final = _fit(conv, relative_loss, steps=40, lr=0.3, optimizer=RiemannianSGD)
    assert final < 0.2 * initial
    assert _orthonormality_error(conv.channel_frame) < 1e-10


# ---------------------------------------------------------------------------------------
# Encoders: an orthonormal readout
# ---------------------------------------------------------------------------------------

ENCODERS = {
    "signnet": lambda **kw: SignNet(OUT, hidden_channels=8, **kw),
    "spe": lambda **kw: SPE(OUT, num_partitions=4, hidden_channels=8, **kw),
    "basisnet": lambda **kw: BasisNet(K, OUT, hidden_channels=8, **kw),
    # a readout that widens: 3 -> 5, stored as its (5, 3) transpose
    "signnet_wide": lambda **kw: SignNet(OUT, hidden_channels=3, rho_layers=1, **kw),
}


def _stiefel_encoder(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # module initialisation draws from the global generator
    with _default_float64():
        return ENCODERS[name](weight_manifold="stiefel")


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_readout_is_an_orthonormal_stiefel_projection(name, generator):
    enc = _stiefel_encoder(name)
    assert enc.weight_manifold == "stiefel"
    readout = enc.rho.layers[-1]
    weight = readout.weight
    assert isinstance(weight, geoopt.ManifoldParameter)
    assert isinstance(weight.manifold, Stiefel)
    assert [p for p in enc.parameters() if isinstance(p, geoopt.ManifoldParameter)] == [weight]
    fan_in, fan_out = readout.in_features, readout.out_features
    assert tuple(weight.shape) == (max(fan_in, fan_out), min(fan_in, fan_out))
    assert _orthonormality_error(weight) < 1e-12
    assert torch.equal(readout.bias, torch.zeros(fan_out, dtype=DTYPE))
    h = torch.randn(6, fan_in, generator=generator, dtype=DTYPE)
    matrix = weight if fan_in >= fan_out else weight.T  # (fan_in, fan_out)
    torch.testing.assert_close(readout(h), h @ matrix, rtol=0, atol=1e-14)
    norms_in, norms_out = h.norm(dim=-1), readout(h).norm(dim=-1)
    if fan_in <= fan_out:  # an isometric embedding
        torch.testing.assert_close(norms_out, norms_in, rtol=0, atol=1e-12)
    else:  # an orthogonal projection, in the coordinates of its range
        assert (norms_out <= norms_in + 1e-12).all()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_none_is_the_previous_encoder(name):
    data = EigenBatch(_graphs())
    torch.manual_seed(0)
    default = ENCODERS[name]().double()
    torch.manual_seed(0)
    free = ENCODERS[name](weight_manifold=None).double()
    assert free.weight_manifold is None
    assert isinstance(free.rho.layers[-1], torch.nn.Linear)
    shapes = {key: value.shape for key, value in default.state_dict().items()}
    assert {key: value.shape for key, value in free.state_dict().items()} == shapes
    assert torch.equal(data.run(free), data.run(default))
    # the constrained encoder has the same parameter names (checkpoints map one to one)
    assert _stiefel_encoder(name).state_dict().keys() == shapes.keys()


@pytest.mark.parametrize("edges", [False, True])
def test_stiefel_signnet_is_exactly_sign_invariant(edges, generator):
    enc = _stiefel_encoder("signnet")
    data = EigenBatch(_graphs())
    out = data.run(enc, edges=edges)
    for _ in range(3):
        signs = torch.randint(0, 2, (K,), generator=generator).to(DTYPE) * 2 - 1
        assert torch.equal(data.run(enc, edges=edges, eigvecs=data.eigvecs * signs), out)


@pytest.mark.parametrize("name", ["spe", "basisnet"])
@pytest.mark.parametrize("edges", [False, True])
def test_stiefel_spe_and_basisnet_are_basis_invariant(name, edges, generator):
    enc = _stiefel_encoder(name)
    out = EigenBatch(_graphs()).run(enc, edges=edges)
    rotated = EigenBatch(_graphs(), generator, rotate=True)
    torch.testing.assert_close(rotated.run(enc, edges=edges), out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["signnet", "spe", "basisnet"])
def test_stiefel_encoders_are_permutation_equivariant(name, generator):
    enc = _stiefel_encoder(name)
    data = EigenBatch(_graphs())
    out = data.run(enc, edges=True)
    perm = torch.randperm(data.batch.numel(), generator=generator)
    moved = EigenBatch(_graphs())
    moved.eigvecs, moved.batch = data.eigvecs[perm], data.batch[perm]
    moved.edge_index = torch.argsort(perm)[data.edge_index]
    torch.testing.assert_close(moved.run(enc, edges=True), out[perm], rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_riemannian_adam_keeps_the_readout_orthonormal_and_fits_a_target(name):
    data = EigenBatch(_graphs())
    target = data.run(_stiefel_encoder(name, seed=1)).detach()
    enc = _stiefel_encoder(name)

    def loss() -> torch.Tensor:
        return (data.run(enc, edges=True) - target).pow(2).mean()

    initial, final = _fit(enc, loss, steps=25, lr=0.02)
    assert final < 0.7 * initial
    assert _orthonormality_error(enc.rho.layers[-1].weight) < 1e-10


# ---------------------------------------------------------------------------------------
# Bad values
# ---------------------------------------------------------------------------------------

ALL = {**FRAMED, **ENCODERS}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("bad", ["Stiefel", "grassmann", "", 1, Stiefel()])
def test_bad_weight_manifold_raises(name, bad):
    with pytest.raises(ValueError, match="weight_manifold must be None or 'stiefel', got"):
        ALL[name](weight_manifold=bad)


@pytest.mark.parametrize("module", [filters_module, encoders_module])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
    assert result.failed == 0
