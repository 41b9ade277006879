"""``Linear(..., weight_manifold="stiefel")``: orthonormal channel mixing per block pair."""

import geoopt
import pytest
import torch
from e3nn.util.test import assert_equivariant

from tests.equivariant._helpers import F64, default_float64, randn
from torsion.equivariant import Linear
from torsion.manifolds import Stiefel
from torsion.optim import RiemannianAdam

# mul_in == mul_out, mul_in > mul_out, mul_in < mul_out, and an irrep with two input blocks
MIXED = ("3x0e + 2x1o + 2x1e + 1x2e + 2x3o", "2x0e + 3x1o + 1x1e + 2x2e + 1x3o")


def _orthonormality_error(weight: torch.Tensor) -> torch.Tensor:
    """``||W^T W - I||_max`` of a tall frame."""
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype)
    return (weight.mT @ weight - eye).abs().max()


def _block_matrices(lin: Linear) -> list[torch.Tensor]:
    """Each weight as its ``(mul_in, mul_out)`` matrix, from the parameters and the irreps."""
    out = []
    for weight, (i, o) in zip(lin.weights, lin.instructions, strict=True):
        shape = (lin.irreps_in[i].mul, lin.irreps_out[o].mul)
        out.append(weight if tuple(weight.shape) == shape else weight.mT)
    return out


@pytest.mark.parametrize("irreps", [MIXED, ("4x0e + 3x1o", "4x0e + 3x1o"), ("2x1o", "5x1o")])
def test_weights_are_orthonormal_stiefel_parameters_stored_tall(irreps):
    lin = Linear(*irreps, weight_manifold="stiefel", dtype=F64)
    assert lin.weight_manifold == "stiefel"
    assert len(lin.weights) == len(lin.instructions) > 0
    for weight, (i, o) in zip(lin.weights, lin.instructions, strict=True):
        mul_in, mul_out = lin.irreps_in[i].mul, lin.irreps_out[o].mul
        assert isinstance(weight, geoopt.ManifoldParameter)
        assert isinstance(weight.manifold, Stiefel)
        assert weight.dtype == F64
        assert tuple(weight.shape) == (max(mul_in, mul_out), min(mul_in, mul_out))
        assert _orthonormality_error(weight) < 1e-12
    assert "on stiefel" in repr(lin)


def test_init_draws_from_the_global_rng():
    torch.manual_seed(3)
    first = Linear(*MIXED, weight_manifold="stiefel", dtype=F64)
    torch.manual_seed(3)
    again = Linear(*MIXED, weight_manifold="stiefel", dtype=F64)
    other = Linear(*MIXED, weight_manifold="stiefel", dtype=F64)
    for a, b, c in zip(first.weights, again.weights, other.weights, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.equal(a, c)


def test_forward_is_the_unnormalized_blockwise_mixing(generator):
    """Oracle: an explicit loop over block pairs, ``y_o[w] += sum_u W_bo[u, w] x_b[u]``."""
    lin = Linear(*MIXED, weight_manifold="stiefel", dtype=F64)
    x = randn(generator, 4, lin.irreps_in.dim)
    expected = torch.zeros(4, lin.irreps_out.dim, dtype=F64)
    slices_in, slices_out = lin.irreps_in.slices(), lin.irreps_out.slices()
    for matrix, (i, o) in zip(_block_matrices(lin), lin.instructions, strict=True):
        (mul_in, ir), mul_out = lin.irreps_in[i], lin.irreps_out[o].mul
        block = x[:, slices_in[i]].reshape(4, mul_in, ir.dim)
        mixed = torch.einsum("uw,nuk->nwk", matrix, block).reshape(4, mul_out * ir.dim)
        expected[:, slices_out[o]] += mixed
    torch.testing.assert_close(lin(x.clone()), expected, atol=1e-12, rtol=0)


def test_stiefel_linear_is_equivariant(generator):
    lin = Linear(*MIXED, weight_manifold="stiefel", biases=True, dtype=F64)
    with default_float64():
        assert_equivariant(
            lin,
            args_in=[randn(generator, 5, lin.irreps_in.dim)],
            irreps_in=[lin.irreps_in],
            irreps_out=[lin.irreps_out],
            tolerance=1e-10,
        )


def test_square_blocks_preserve_the_norm_of_every_irrep_block(generator):
    lin = Linear("4x0e + 3x1o + 2x2e", "4x0e + 3x1o + 2x2e", weight_manifold="stiefel", dtype=F64)
    x = randn(generator, 6, lin.irreps_in.dim)
    y = lin(x)
    for piece in lin.irreps_in.slices():
        torch.testing.assert_close(
            y[:, piece].norm(dim=-1), x[:, piece].norm(dim=-1), atol=1e-12, rtol=0
        )


def test_widening_blocks_preserve_norms_and_narrowing_blocks_do_not_increase_them(generator):
    wide = Linear("2x0e + 3x1o", "5x0e + 4x1o", weight_manifold="stiefel", dtype=F64)
    narrow = Linear("5x0e + 4x1o", "2x0e + 3x1o", weight_manifold="stiefel", dtype=F64)
    x = randn(generator, 6, wide.irreps_in.dim)
    for x_piece, y_piece in zip(wide.irreps_in.slices(), wide.irreps_out.slices(), strict=True):
        torch.testing.assert_close(
            wide(x)[:, y_piece].norm(dim=-1), x[:, x_piece].norm(dim=-1), atol=1e-12, rtol=0
        )
    # narrowing after widening with the transposed frames is the identity (W^T W = I)
    for mine, theirs in zip(narrow.weights, wide.weights, strict=True):
        with torch.no_grad():
            mine.copy_(theirs)
    torch.testing.assert_close(narrow(wide(x)), x, atol=1e-12, rtol=0)
    z = randn(generator, 6, narrow.irreps_in.dim)
    for z_piece, y_piece in zip(narrow.irreps_in.slices(), narrow.irreps_out.slices(), strict=True):
        assert (narrow(z)[:, y_piece].norm(dim=-1) <= z[:, z_piece].norm(dim=-1) + 1e-12).all()


@pytest.mark.parametrize(
    "irreps", [("4x0e + 3x1o", "4x0e + 3x1o"), ("2x0e + 2x1o", "5x0e + 3x1o"), MIXED]
)
def test_riemannian_adam_keeps_weights_orthonormal_and_fits_a_target(irreps, generator):
    lin = Linear(*irreps, weight_manifold="stiefel", dtype=F64)
    target = Linear(*irreps, weight_manifold="stiefel", dtype=F64)
    x = randn(generator, 32, lin.irreps_in.dim)
    with torch.no_grad():
        y = target(x)
    optimizer = RiemannianAdam(lin.parameters(), lr=0.05)

    def loss() -> torch.Tensor:
        return (lin(x) - y).pow(2).mean()

    initial = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.5 * initial
    for weight in lin.weights:
        assert isinstance(weight, geoopt.ManifoldParameter)
        assert _orthonormality_error(weight.detach()) < 1e-6


def test_default_mode_is_unchanged_and_flat_weights_are_refused_on_the_manifold():
    torch.manual_seed(0)
    free = Linear(*MIXED, dtype=F64)
    assert free.weight_manifold is None
    assert not any(isinstance(w, geoopt.ManifoldParameter) for w in free.weights)
    free.load_flat_weight(free.flat_weight().detach())
    lin = Linear(*MIXED, weight_manifold="stiefel", dtype=F64)
    with pytest.raises(RuntimeError, match="flat_weight: e3nn's flat weight layout"):
        lin.flat_weight()
    with pytest.raises(RuntimeError, match="load_flat_weight: e3nn's flat weight layout"):
        lin.load_flat_weight(torch.zeros(lin.weight_numel, dtype=F64))


def test_empty_blocks_and_absent_irreps():
    lin = Linear("0x0e + 2x1o", "3x0e + 2x1o + 1x2e", weight_manifold="stiefel", dtype=F64)
    x = torch.randn(3, lin.irreps_in.dim, dtype=F64)
    y = lin(x)
    assert y.shape == (3, lin.irreps_out.dim)
    assert not y[:, :3].any() and not y[:, -5:].any()
    torch.testing.assert_close(y[:, 3:9].norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad", ["Stiefel", "grassmann", "", 1, Stiefel()])
def test_bad_weight_manifold_raises(bad):
    with pytest.raises(ValueError, match="weight_manifold must be None or 'stiefel'"):
        Linear("2x0e", "2x0e", weight_manifold=bad)
