"""TensorProduct, Linear, Gate, SphericalHarmonics and RadialBasis against e3nn and closed
forms; equivariance; input validation."""

import dataclasses
import math
import random

import pytest
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from e3nn.util.test import assert_equivariant

from tests.equivariant._helpers import BACKENDS, F64, default_float64, e3nn_float64, randn
from tests.reps._random import MODES, random_irreps, random_problem
from torsion.equivariant import (
    Gate,
    Linear,
    RadialBasis,
    SphericalHarmonics,
    TensorProduct,
    polynomial_cutoff,
)
from torsion.reps import TPDescriptor

silu, tanh, sigmoid = torch.nn.functional.silu, torch.tanh, torch.sigmoid

# -- TensorProduct --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    ("modes", "muls"),
    [(("uvw",), (2, 3)), (("uvu",), (2, 3)), (("uuu",), (3,)), (MODES, (2, 3))],
    ids=["uvw", "uvu", "uuu", "mixed"],
)
def test_tensor_product_matches_e3nn(modes, muls, seed, backend, generator):
    """Random irreps (l <= 4, both parities, multiplicities > 1): internal shared weights
    loaded into e3nn's module, and per-sample weights, agree to 1e-10 in float64."""
    irreps1, irreps2, irreps_out, instructions = random_problem(
        random.Random(seed), modes, muls=muls
    )
    d = TPDescriptor.from_instructions(irreps1, irreps2, irreps_out, instructions)
    x1, x2 = randn(generator, 5, d.irreps_in1.dim), randn(generator, 5, d.irreps_in2.dim)

    ours = TensorProduct(d, backend=backend, dtype=F64)
    theirs = e3nn_float64(o3.TensorProduct, irreps1, irreps2, irreps_out, instructions)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x1, x2), theirs(x1, x2), atol=1e-10, rtol=1e-10)

    per_sample = TensorProduct(d, shared_weights=False, internal_weights=False, backend=backend)
    assert per_sample.weight is None
    theirs = e3nn_float64(
        o3.TensorProduct, irreps1, irreps2, irreps_out, instructions, shared_weights=False
    )
    w = randn(generator, 5, d.weight_numel)
    torch.testing.assert_close(per_sample(x1, x2, w), theirs(x1, x2, w), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_product_matches_e3nn_in_float32(backend, generator):
    irreps1, irreps2, irreps_out, instructions = random_problem(random.Random(7), MODES)
    d = TPDescriptor.from_instructions(irreps1, irreps2, irreps_out, instructions)
    ours = TensorProduct(d, backend=backend, dtype=torch.float32)
    theirs = o3.TensorProduct(irreps1, irreps2, irreps_out, instructions).to(torch.float32)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    x1 = randn(generator, 5, d.irreps_in1.dim, dtype=torch.float32)
    x2 = randn(generator, 5, d.irreps_in2.dim, dtype=torch.float32)
    torch.testing.assert_close(ours(x1, x2), theirs(x1, x2), atol=1e-5, rtol=1e-5)


def test_tensor_product_and_linear_initialise_like_e3nn_and_handle_empty_paths(generator):
    """Under the same seed the initial weights are e3nn's (one standard normal draw)."""
    d = TPDescriptor.fully_connected("3x0e + 2x1o", "1o + 2e", "4x1o + 3x2e")
    state = torch.get_rng_state()
    tp, lin = TensorProduct(d), Linear("3x0e + 2x1o", "4x1o + 3x0e")
    torch.set_rng_state(state)
    e3nn_tp, e3nn_lin = d.to_e3nn(), o3.Linear("3x0e + 2x1o", "4x1o + 3x0e")
    assert tp.weight.dtype == torch.get_default_dtype()
    torch.testing.assert_close(tp.weight, e3nn_tp.weight, atol=0, rtol=0)
    torch.testing.assert_close(lin.flat_weight(), e3nn_lin.weight, atol=0, rtol=0)

    empty = TensorProduct(TPDescriptor("2x0e", "1o", "3x1o"), dtype=F64)
    assert empty.weight is None
    out = empty(randn(generator, 4, 2), randn(generator, 4, 3))
    assert out.shape == (4, 9) and not out.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_product_is_equivariant(backend, generator):
    d = TPDescriptor.channelwise("3x0e + 2x1o + 2x2e + 1x3o", "0e + 1o + 2e + 3o + 4e")
    tp = TensorProduct(d, backend=backend, dtype=F64)
    args = [randn(generator, 6, d.irreps_in1.dim), randn(generator, 6, d.irreps_in2.dim)]
    with default_float64():
        assert_equivariant(
            tp,
            args_in=args,
            irreps_in=[d.irreps_in1, d.irreps_in2],
            irreps_out=[d.irreps_out],
            tolerance=1e-10,
        )


def test_tensor_product_rejects_bad_input(generator):
    d = TPDescriptor.fully_connected("2x0e + 1x1o", "1o", "2x1o")
    tp = TensorProduct(d, dtype=F64)
    x1, x2 = randn(generator, 3, 5), randn(generator, 3, 3)
    with pytest.raises(ValueError, match="internal_weights=True needs shared_weights=True"):
        TensorProduct(d, shared_weights=False)
    with pytest.raises(TypeError, match="TPDescriptor"):
        TensorProduct("2x0e")
    with pytest.raises(ValueError, match="x1 has shape"):
        tp(randn(generator, 3, 4), x2)
    with pytest.raises(ValueError, match="x2 has shape"):
        tp(x1, randn(generator, 3, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        tp(x1, x2, randn(generator, d.weight_numel + 1))
    with pytest.raises(ValueError, match="shared_weights=True expects weight"):
        tp(x1, x2, randn(generator, 3, d.weight_numel))
    with pytest.raises(ValueError, match="forward needs weight"):
        TensorProduct(d, shared_weights=False, internal_weights=False)(x1, x2)
    with pytest.raises(ValueError, match="is on meta"):
        tp(x1, x2.to("meta"))


# -- Linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_linear_matches_e3nn(seed, biases, generator):
    rng = random.Random(seed)
    irreps_in = random_irreps(rng, lmax=3, blocks=4, muls=(1, 2, 5)) + "3x0e"
    irreps_out = random_irreps(rng, lmax=3, blocks=4, muls=(1, 3, 4)) + "2x0e + 1x1o"
    ours = Linear(irreps_in, irreps_out, biases=biases, dtype=F64)
    theirs = e3nn_float64(o3.Linear, irreps_in, irreps_out, biases=biases)
    assert ours.weight_numel == theirs.weight_numel
    with torch.no_grad():
        theirs.weight.copy_(ours.flat_weight())
        if biases:
            ours.bias.normal_(generator=generator)
            theirs.bias.copy_(ours.bias)
    x = randn(generator, 2, 3, ours.irreps_in.dim)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)


def test_linear_has_one_parameter_per_block_pair_and_round_trips_flat_weights(generator):
    lin = Linear("2x0e + 3x1o + 1x0e", "4x0e + 2x1o + 1x2e", dtype=F64)
    assert lin.instructions == ((0, 0), (1, 1), (2, 0))
    assert [tuple(w.shape) for w in lin.weights] == [(2, 4), (3, 2), (1, 4)]
    flat = randn(generator, lin.weight_numel)
    lin.load_flat_weight(flat)
    torch.testing.assert_close(lin.flat_weight(), flat, atol=0, rtol=0)
    x = randn(generator, 4, lin.irreps_in.dim)
    lin(x).pow(2).sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in lin.weights)
    # the 2e output has no input: zeros, like e3nn's output mask
    assert not lin(x)[:, -5:].any()
    with pytest.raises(ValueError, match=r"expects shape \(18,\)"):
        lin.load_flat_weight(flat[:-1])


def test_linear_is_equivariant(generator):
    lin = Linear("3x0e + 2x1o + 2x1e + 1x2e + 2x3o", "2x0e + 3x1o + 1x1e + 2x2e + 1x3o", dtype=F64)
    with default_float64():
        assert_equivariant(
            lin,
            args_in=[randn(generator, 5, lin.irreps_in.dim)],
            irreps_in=[lin.irreps_in],
            irreps_out=[lin.irreps_out],
            tolerance=1e-10,
        )


def test_linear_rejects_bad_input(generator):
    lin = Linear("2x0e + 1x1o", "3x0e", dtype=F64)
    with pytest.raises(ValueError, match="need a last dimension of 5"):
        lin(randn(generator, 2, 4))
    with pytest.raises(
        TypeError, match=r"dtype torch\.float32, but the weights have torch\.float64"
    ):
        lin(randn(generator, 2, 5, dtype=torch.float32))
    with pytest.raises(ValueError, match="irreps_in is not a valid e3nn Irreps"):
        Linear("2xfoo", "0e")


# -- Gate -----------------------------------------------------------------------------------

GATE_CASES = [
    ("16x0e", [silu], "8x0e", [sigmoid], "8x1o"),
    ("4x0o + 3x0e", [tanh, silu], "2x0o + 3x0e", [tanh, sigmoid], "2x1e + 1x2o + 2x1o"),
    ("3x0o", [torch.abs], "2x0o", [tanh], "1x1e + 1x3o"),
    ("3x0e", [None], "", [], ""),
    ("", [], "2x0e", [sigmoid], "1x1o + 1x3e"),
]


@pytest.mark.parametrize("case", GATE_CASES, ids=[str(i) for i in range(len(GATE_CASES))])
def test_gate_matches_e3nn_and_is_equivariant(case, generator):
    ours = Gate(*case)
    theirs = e3nn_float64(e3nn_nn.Gate, *case)
    assert ours.irreps_in == theirs.irreps_in and ours.irreps_out == theirs.irreps_out
    x = randn(generator, 7, ours.irreps_in.dim)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)
    with default_float64():
        assert_equivariant(
            ours,
            args_in=[x],
            irreps_in=[ours.irreps_in],
            irreps_out=[ours.irreps_out],
            tolerance=1e-10,
        )


@dataclasses.dataclass
class _Softplus:
    """A callable that cannot be hashed (``eq=True`` sets ``__hash__`` to ``None``)."""

    beta: float = 2.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(x, beta=self.beta)


def test_gate_takes_an_unhashable_activation_like_e3nn(generator):
    case = ("2x0e", [_Softplus()], "1x0e", [_Softplus(beta=0.5)], "1x1o")
    ours, theirs = Gate(*case), e3nn_float64(e3nn_nn.Gate, *case)
    x = randn(generator, 5, ours.irreps_in.dim)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)


def test_gate_rejects_bad_input(generator):
    with pytest.raises(ValueError, match="has 3 irreps but irreps_gates '2x0e' has 2"):
        Gate("2x0e", [silu], "2x0e", [sigmoid], "3x1o")
    with pytest.raises(ValueError, match="irreps_scalars must be scalars"):
        Gate("2x1o", [silu], "", [], "")
    with pytest.raises(ValueError, match="neither"):
        Gate("2x0o", [silu], "", [], "")
    with pytest.raises(ValueError, match="2 blocks but act_scalars has 1"):
        Gate("2x0e + 1x0o", [silu], "", [], "")
    gate = Gate("2x0e", [silu], "1x0e", [sigmoid], "1x1o")
    with pytest.raises(ValueError, match="last dimension of 6"):
        gate(randn(generator, 3, 5))


# -- SphericalHarmonics and RadialBasis ------------------------------------------------------


@pytest.mark.parametrize("normalization", ["component", "norm", "integral"])
@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_are_e3nns(normalize, normalization, generator):
    vectors = randn(generator, 10, 3)
    sh = SphericalHarmonics("0e + 1o + 2e + 3o", normalize, normalization)
    expected = o3.spherical_harmonics([0, 1, 2, 3], vectors, normalize, normalization)
    torch.testing.assert_close(sh(vectors), expected, atol=1e-13, rtol=1e-13)
    with default_float64():
        assert_equivariant(
            sh, args_in=[vectors], irreps_in=["1o"], irreps_out=[sh.irreps_out], tolerance=1e-10
        )


def test_spherical_harmonics_normalize_like_e3nn_with_finite_derivatives_at_zero(generator):
    """Away from 0, values and gradients are e3nn's (``normalize=True``); the zero vector (a
    self-loop's edge vector) gets e3nn's value (``Y^0``, every ``l >= 1`` harmonic 0), and
    first and second derivatives that are finite (e3nn's are of order 1e12 and NaN) and zero."""
    sh = SphericalHarmonics("0e + 1o + 2e + 3o")
    vectors = torch.cat([randn(generator, 8, 3), torch.zeros(1, 3, dtype=F64)]).requires_grad_()
    ours = sh(vectors)
    theirs = o3.spherical_harmonics([0, 1, 2, 3], vectors, True, "component")
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    cotangent = randn(generator, *ours.shape)
    (ours_grad,) = torch.autograd.grad(ours, vectors, cotangent, create_graph=True)
    (theirs_grad,) = torch.autograd.grad(theirs, vectors, cotangent)
    torch.testing.assert_close(ours_grad[:-1], theirs_grad[:-1], atol=1e-12, rtol=1e-12)
    (second,) = torch.autograd.grad(ours_grad[-1].sum(), vectors)
    assert not ours_grad[-1].any() and not second[-1].any() and second.isfinite().all()


def test_spherical_harmonics_reject_bad_input(generator):
    with pytest.raises(ValueError, match="normalization must be one of"):
        SphericalHarmonics("0e + 1o", normalization="unit")
    with pytest.raises(ValueError, match="invalid irreps_out"):
        SphericalHarmonics("0e + 1o + 2o")
    with pytest.raises(ValueError, match="parity"):  # e3nn takes these for a pseudovector
        SphericalHarmonics("0e + 1e + 2e")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        SphericalHarmonics("0e + 1o")(randn(generator, 4, 2))


def test_radial_basis_is_the_bessel_basis_times_the_envelope():
    cutoff = 4.0
    basis = RadialBasis(num_basis=5, cutoff=cutoff, dtype=F64)
    r = torch.linspace(0.1, 3.9, 20, dtype=F64)
    n = torch.arange(1, 6, dtype=F64)
    d = r / cutoff
    envelope = 1 - 28 * d**6 + 48 * d**7 - 21 * d**8
    bessel = math.sqrt(2 / cutoff) * torch.sin(n * math.pi * r[:, None] / cutoff) / r[:, None]
    torch.testing.assert_close(basis(r), bessel * envelope[:, None], atol=1e-13, rtol=1e-12)
    # r = 0 is the finite limit sqrt(2 / rc) n pi / rc, with finite derivatives
    zero = torch.zeros(1, dtype=F64, requires_grad=True)
    torch.testing.assert_close(basis(zero)[0], math.sqrt(2 / cutoff) * n * math.pi / cutoff)
    (grad,) = torch.autograd.grad(basis(zero).sum(), zero, create_graph=True)
    assert torch.isfinite(grad).all()
    # the second derivative too (torch.sinc's is NaN at 0): it matches the one beside 0
    (second,) = torch.autograd.grad(grad.sum(), zero)
    near = torch.full((1,), 1e-6, dtype=F64, requires_grad=True)
    (near_grad,) = torch.autograd.grad(basis(near).sum(), near, create_graph=True)
    (near_second,) = torch.autograd.grad(near_grad.sum(), near)
    torch.testing.assert_close(second, near_second, rtol=1e-6, atol=0)


def test_radial_basis_vanishes_smoothly_at_the_cutoff():
    """Value, first and second derivatives go to 0 at the cutoff (p = 6 envelope), and
    everything beyond it is exactly 0."""
    cutoff = 3.0
    basis = RadialBasis(num_basis=8, cutoff=cutoff, dtype=F64)
    gaps = torch.tensor([1e-2, 1e-3, 1e-4], dtype=F64)
    r = (cutoff - gaps).requires_grad_()
    value = basis(r)
    (first,) = torch.autograd.grad(value.sum(), r, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), r)
    # |e(r)| = O(gap^3), |e'(r)| = O(gap^2), |e''(r)| = O(gap)
    assert value.abs().amax(-1)[-1] < 1e-9 and first.abs()[-1] < 1e-6 and second.abs()[-1] < 1e-2
    assert (value.abs().amax(-1).diff() < 0).all() and (first.abs().diff() < 0).all()
    beyond = torch.tensor([cutoff, cutoff + 0.5, 1e6], dtype=F64, requires_grad=True)
    out = basis(beyond)
    (grad,) = torch.autograd.grad(out.sum(), beyond)
    assert not out.any() and not grad.any()
    torch.testing.assert_close(
        polynomial_cutoff(torch.tensor([0.0, 3.0, 7.0]), 3.0), torch.tensor([1.0, 0.0, 0.0])
    )


def test_radial_basis_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_basis"):
        RadialBasis(0)
    with pytest.raises(ValueError, match="cutoff"):
        RadialBasis(4, cutoff=-1.0)
    with pytest.raises(TypeError, match="floating tensor"):
        RadialBasis(4)(torch.tensor([1, 2]))


@pytest.mark.slow
def test_linear_gate_and_edge_embeddings_compile_without_graph_breaks(generator):
    """Dynamo traces each layer as one graph (``fullgraph=True``; the eager backend keeps
    this fast: the point is the absence of graph breaks and guards on e3nn objects)."""
    lin = Linear("4x0e + 3x1o + 2x2e", "5x0e + 2x1o + 1x2e", biases=True, dtype=F64)
    gate = Gate("4x0e", [silu], "2x0e", [sigmoid], "1x1o + 1x2e")
    cases = [
        (lin, randn(generator, 5, lin.irreps_in.dim)),
        (gate, randn(generator, 5, gate.irreps_in.dim)),
        (RadialBasis(8, 5.0, dtype=F64), 5 * torch.rand(5, generator=generator, dtype=F64)),
        (SphericalHarmonics("0e + 1o + 2e"), randn(generator, 5, 3)),
    ]
    for module, x in cases:
        compiled = torch.compile(module, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), module(x), atol=1e-12, rtol=1e-12)


# -- Linear: the documented block formula in the corners e3nn's comparison skips ----------


def test_linear_biases_only_the_parity_even_scalars(generator):
    """Biases go to ``0e`` outputs only: a bias on a ``0o`` output would break parity
    (``0o`` must flip sign under inversion), so those stay odd functions of the input."""
    lin = Linear("2x0e + 3x0o + 1x1o", "4x0e + 2x0o + 1x1o", biases=True, dtype=F64)
    assert lin.bias.shape == (4,)
    with torch.no_grad():
        lin.bias.normal_(generator=generator)
    x = randn(generator, 6, lin.irreps_in.dim)
    parity = lin.irreps_in.D_from_angles(*torch.zeros(3, dtype=F64), torch.tensor(1))
    odd = slice(4, 6)  # the 0o outputs: y(-x_odd) = -y(x_odd) with the even inputs fixed
    torch.testing.assert_close(lin(x @ parity.T)[:, odd], -lin(x)[:, odd], atol=1e-14, rtol=0)
    torch.testing.assert_close(lin(x @ parity.T)[:, :4], lin(x)[:, :4], atol=1e-14, rtol=0)
    assert not lin(torch.zeros_like(x))[:, 4:].any()  # no bias on 0o or 1o


def test_stiefel_linear_square_blocks_use_the_matrix_as_stored(generator):
    """``mul_in == mul_out``: the parameter is the ``(mul_in, mul_out)`` matrix itself
    (transposed storage is for ``mul_in < mul_out`` only), ``y[w] = sum_u W[u, w] x[u]``
    with no ``1/sqrt(fan_in)``; a non-symmetric orthogonal ``W`` tells ``W`` from ``W^T``."""
    lin = Linear("3x0e + 3x1o", "3x0e + 3x1o", weight_manifold="stiefel", dtype=F64)
    q = torch.linalg.qr(randn(generator, 3, 3))[0]
    assert not torch.allclose(q, q.T)
    with torch.no_grad():
        for w in lin.weights:
            w.copy_(q)
    x = randn(generator, 5, lin.irreps_in.dim)
    scalars = x[:, :3] @ q
    vectors = torch.einsum("nuk,uw->nwk", x[:, 3:].unflatten(-1, (3, 3)), q).flatten(1)
    torch.testing.assert_close(lin(x), torch.cat([scalars, vectors], 1), atol=1e-14, rtol=0)


def test_conv_divides_messages_by_the_root_of_avg_num_neighbors(generator):
    """``avg_num_neighbors = a`` scales the summed messages by ``1 / sqrt(a)``: without a
    self-connection the layer is linear in them, so its output is that of ``a = None``
    divided by ``sqrt(a)``, with the same parameters."""
    from torsion.equivariant import EquivariantConv

    irreps_in, irreps_sh, irreps_out = "4x0e + 2x1o", "0e + 1o", "3x0e + 2x1o"
    plain = EquivariantConv(
        irreps_in, irreps_sh, irreps_out, 4, 8, self_connection=False, dtype=F64
    )
    scaled = EquivariantConv(
        irreps_in,
        irreps_sh,
        irreps_out,
        4,
        8,
        avg_num_neighbors=4.0,
        self_connection=False,
        dtype=F64,
    )
    scaled.load_state_dict(plain.state_dict())
    x = randn(generator, 5, plain.irreps_node_in.dim)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 2]])
    edge_attr = randn(generator, 6, 4)
    edge_radial = randn(generator, 6, 4)
    expected = plain(x, edge_index, edge_attr, edge_radial) / 2.0
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(
        scaled(x, edge_index, edge_attr, edge_radial), expected, atol=1e-13, rtol=0
    )
