"""EquivariantPotential: symmetries, conservative forces (finite differences, a symmetric
Hessian), batching, the radius graph, backends and input validation."""

import geoopt
import pytest
import torch
from e3nn.util.test import assert_equivariant

from tests.equivariant._helpers import BACKENDS, F64, default_float64
from torsion.equivariant import EquivariantPotential, Linear, energy_and_forces, radius_graph
from torsion.manifolds import Stiefel

CUTOFF = 3.0


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EquivariantPotential(
        3, cutoff=CUTOFF, channels=4, num_layers=2, num_radial=4, radial_hidden=8, dtype=F64
    )


def _cluster(generator, num_atoms=6, spread=1.2):
    pos = spread * torch.randn(num_atoms, 3, generator=generator, dtype=F64)
    species = torch.randint(0, 3, (num_atoms,), generator=generator)
    return pos, species


def test_energy_is_invariant_and_forces_rotate_as_vectors(model, generator):
    pos, species = _cluster(generator)
    with default_float64():
        assert_equivariant(
            lambda pos: energy_and_forces(model, pos, species),
            args_in=[pos],
            irreps_in=["cartesian_points"],  # rotations, parity and translations
            irreps_out=["0e", "1o"],
            tolerance=1e-10,
        )


def test_translation_and_permutation_invariance(model, generator):
    pos, species = _cluster(generator)
    energy, forces = energy_and_forces(model, pos, species)
    shift = torch.tensor([3.0, -1.0, 7.5], dtype=F64)
    moved_energy, moved_forces = energy_and_forces(model, pos + shift, species)
    torch.testing.assert_close(moved_energy, energy, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(moved_forces, forces, atol=1e-12, rtol=1e-12)
    order = torch.randperm(len(species), generator=generator)
    permuted_energy, permuted_forces = energy_and_forces(model, pos[order], species[order])
    torch.testing.assert_close(permuted_energy, energy, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(permuted_forces, forces[order], atol=1e-12, rtol=1e-12)
    # Newton's third law: internal forces sum to zero
    torch.testing.assert_close(forces.sum(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)


def test_forces_are_minus_the_finite_difference_gradient(model, generator):
    pos, species = _cluster(generator, num_atoms=5)
    _, forces = energy_and_forces(model, pos, species)
    h = 1e-5
    numeric = torch.zeros_like(pos)
    with torch.no_grad():
        for i in range(pos.shape[0]):
            for k in range(3):
                step = torch.zeros_like(pos)
                step[i, k] = h
                numeric[i, k] = -(model(pos + step, species) - model(pos - step, species)) / (2 * h)
    torch.testing.assert_close(forces, numeric, atol=1e-7, rtol=1e-6)


def test_hessian_by_double_backward_is_symmetric(model, generator):
    pos, species = _cluster(generator, num_atoms=4, spread=1.0)
    pos.requires_grad_()
    _, forces = energy_and_forces(model, pos, species, create_graph=True)
    flat = forces.reshape(-1)
    rows = [torch.autograd.grad(-flat[i], pos, retain_graph=True)[0].reshape(-1) for i in range(12)]
    hessian = torch.stack(rows)
    assert hessian.abs().max() > 1e-3  # the atoms interact
    torch.testing.assert_close(hessian, hessian.T, atol=1e-10, rtol=0)


def test_force_training_step_reaches_every_parameter(model, generator):
    pos, species = _cluster(generator)
    energy, forces = energy_and_forces(model, pos, species, create_graph=True)
    loss = energy.pow(2).sum() + forces.pow(2).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert not pos.requires_grad  # the caller's tensor is left alone


def test_batch_equals_separate_structures_in_any_atom_order(model, generator):
    pos_a, species_a = _cluster(generator, 5)
    pos_b, species_b = _cluster(generator, 7)
    pos = torch.cat([pos_a, pos_b + 100.0])
    species = torch.cat([species_a, species_b])
    batch = torch.tensor([0] * 5 + [1] * 7)
    order = torch.randperm(12, generator=generator)  # batch need not be sorted
    energy = model(pos=pos[order], species=species[order], batch=batch[order])
    expected = torch.cat([model(pos_a, species_a), model(pos_b, species_b)])
    torch.testing.assert_close(energy, expected, atol=1e-12, rtol=1e-12)
    # atoms of different structures do not interact, even when they overlap in space
    overlap = model(pos=torch.cat([pos_a, pos_b]), species=species, batch=batch)
    torch.testing.assert_close(overlap, expected, atol=1e-12, rtol=1e-12)


def test_isolated_atoms_and_empty_structures(model):
    far = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=F64)
    species = torch.tensor([1, 1])
    energy, forces = energy_and_forces(model, far, species, torch.tensor([0, 2]))
    assert energy.shape == (3,) and energy[1] == 0 and not forces.any()
    torch.testing.assert_close(energy[0], energy[2])


def test_energy_scale_multiplies_the_network_output_but_not_the_atomic_energies(model, generator):
    """``E_i = energy_scale * readout(h_i) + atomic_energies[species_i]``: with the same
    parameters, ``E - sum(atomic_energies)`` and the forces scale linearly with it."""
    pos, species = _cluster(generator)
    offsets = torch.tensor([-1.5, 0.25, 3.0], dtype=F64)
    torch.manual_seed(0)
    scaled = EquivariantPotential(
        3,
        cutoff=CUTOFF,
        channels=4,
        num_layers=2,
        num_radial=4,
        radial_hidden=8,
        energy_scale=2.5,
        dtype=F64,
    )
    for name, p in model.named_parameters():
        assert torch.equal(scaled.get_parameter(name), p)
    with torch.no_grad():
        model.atomic_energies.copy_(offsets)
        scaled.atomic_energies.copy_(offsets)
    reference = offsets[species].sum()
    energy, forces = energy_and_forces(model, pos, species)
    scaled_energy, scaled_forces = energy_and_forces(scaled, pos, species)
    assert (energy - reference).abs() > 1e-3 and forces.abs().max() > 1e-3
    torch.testing.assert_close(scaled_energy - reference, 2.5 * (energy - reference))
    torch.testing.assert_close(scaled_forces, 2.5 * forces)


def test_avg_num_neighbors_divides_every_layers_messages_by_its_square_root(generator):
    """Each interaction block is an ``EquivariantConv`` whose summed messages are divided by
    ``sqrt(avg_num_neighbors)``: on the inputs each layer sees, its output minus its
    self-connection scales by ``sqrt(a / b)`` from ``avg_num_neighbors=a`` to ``b``."""
    pos, species = _cluster(generator)
    models = {}
    for avg in (4.0, 25.0):
        torch.manual_seed(0)
        models[avg] = EquivariantPotential(
            3,
            cutoff=CUTOFF,
            channels=4,
            num_layers=2,
            num_radial=4,
            radial_hidden=8,
            avg_num_neighbors=avg,
            dtype=F64,
        )
    inputs = []
    hooks = [
        conv.register_forward_hook(lambda module, args, out: inputs.append(args))
        for conv in models[4.0].convs
    ]
    with torch.no_grad():
        models[4.0](pos, species)
        for hook in hooks:
            hook.remove()
        assert len(inputs) == 2
        for layer, args in enumerate(inputs):
            messages = {}
            for avg, potential in models.items():
                conv = potential.convs[layer]
                messages[avg] = conv(*args) - conv.self_connection(args[0])
            assert messages[4.0].abs().max() > 1e-3  # the atoms interact
            torch.testing.assert_close(messages[4.0], (25.0 / 4.0) ** 0.5 * messages[25.0])


def test_radius_graph_matches_a_brute_force_search(generator):
    pos = 2.0 * torch.randn(30, 3, generator=generator, dtype=F64)
    batch = torch.randint(0, 4, (30,), generator=generator)
    edges = radius_graph(pos, 2.5, batch)
    distance = torch.cdist(pos, pos)
    expected = (distance < 2.5) & (batch[:, None] == batch[None, :])
    expected.fill_diagonal_(False)
    got = torch.zeros_like(expected)
    got[edges[0], edges[1]] = True
    assert torch.equal(got, expected) and edges.shape[1] == int(expected.sum())
    assert radius_graph(torch.zeros(0, 3), 1.0).shape == (2, 0)


def test_backends_agree(generator):
    if len(BACKENDS) < 2:
        pytest.skip("only the reference backend is registered")
    pos, species = _cluster(generator)
    results = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = EquivariantPotential(3, cutoff=CUTOFF, channels=4, backend=backend, dtype=F64)
        results.append(energy_and_forces(model, pos, species))
    for energy, forces in results[1:]:
        torch.testing.assert_close(energy, results[0][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(forces, results[0][1], atol=1e-10, rtol=1e-10)


def test_rejects_bad_input(model, generator):
    pos, species = _cluster(generator)
    with pytest.raises(ValueError, match=r"species holds ids in \[\d, 3\], outside \[0, 3\)"):
        model(pos, torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match="species holds ids"):
        model(pos, torch.tensor([0, -1, 2, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"pos must have shape \(N, 3\)"):
        model(pos[:, :2], species)
    with pytest.raises(TypeError, match="species must have dtype int64 or int32"):
        model(pos, species.double())
    with pytest.raises(ValueError, match=r"species must have shape \(6,\)"):
        model(pos, species[:-1])
    with pytest.raises(TypeError, match=r"pos has dtype torch\.float32"):
        model(pos.float(), species)
    with pytest.raises(ValueError, match="pos is on meta"):
        model(pos.to("meta"), species)
    with pytest.raises(ValueError, match="batch holds negative structure ids"):
        model(pos, species, -torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="num_species must be an int >= 1"):
        EquivariantPotential(0)
    with pytest.raises(ValueError, match="cutoff must be > 0"):
        radius_graph(pos, 0.0)


@pytest.fixture
def stiefel_model():
    torch.manual_seed(0)
    return EquivariantPotential(
        3,
        cutoff=CUTOFF,
        channels=4,
        num_layers=2,
        num_radial=4,
        radial_hidden=8,
        weight_manifold="stiefel",
        dtype=F64,
    )


def test_stiefel_linears_are_orthonormal_manifold_parameters(stiefel_model):
    linears = [m for m in stiefel_model.modules() if isinstance(m, Linear)]
    # per block: input, output and self-connection of each convolution, and the readout
    assert len(linears) == 3 * 2 + 2
    assert all(m.weight_manifold == "stiefel" for m in linears)
    on_stiefel = {
        name
        for name, p in stiefel_model.named_parameters()
        if isinstance(p, geoopt.ManifoldParameter)
    }
    expected = {
        f"{name}.weights.{k}"
        for name, m in stiefel_model.named_modules()
        if isinstance(m, Linear)
        for k in range(len(m.weights))
    }
    assert on_stiefel == expected
    for name in on_stiefel:
        w = stiefel_model.get_parameter(name)
        assert isinstance(w.manifold, Stiefel) and w.shape[0] >= w.shape[1]
        torch.testing.assert_close(w.mT @ w, torch.eye(w.shape[1], dtype=F64), atol=1e-12, rtol=0)
    # everything else stays free
    free = [p for p in stiefel_model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    assert free and stiefel_model.weight_manifold == "stiefel"


def test_stiefel_potential_keeps_its_symmetries_and_conservative_forces(stiefel_model, generator):
    pos, species = _cluster(generator)
    with default_float64():
        assert_equivariant(
            lambda pos: energy_and_forces(stiefel_model, pos, species),
            args_in=[pos],
            irreps_in=["cartesian_points"],
            irreps_out=["0e", "1o"],
            tolerance=1e-10,
        )
    energy, forces = energy_and_forces(stiefel_model, pos, species)
    assert forces.abs().max() > 1e-6  # not a trivially constant energy
    order = torch.randperm(len(species), generator=generator)
    permuted_energy, permuted_forces = energy_and_forces(stiefel_model, pos[order], species[order])
    torch.testing.assert_close(permuted_energy, energy, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(permuted_forces, forces[order], atol=1e-12, rtol=1e-12)
    h, i, k = 1e-5, 2, 1
    step = torch.zeros_like(pos)
    step[i, k] = h
    with torch.no_grad():
        numeric = -(stiefel_model(pos + step, species) - stiefel_model(pos - step, species)) / (
            2 * h
        )
    torch.testing.assert_close(forces[i, k], numeric[0], atol=1e-7, rtol=1e-6)


def test_weight_manifold_is_validated():
    with pytest.raises(ValueError, match="weight_manifold must be None or 'stiefel'"):
        EquivariantPotential(2, weight_manifold="grassmann")
    with pytest.raises(ValueError, match="weight_manifold must be None or 'stiefel'"):
        EquivariantPotential(2, weight_manifold=True)


@pytest.mark.slow
def test_compiled_potential_gives_the_eager_energies_and_forces(model, generator):
    """``torch.compile`` for inference, as docs/equivariant.md recommends (the radius
    graph's data-dependent size splits it into a few graphs; each convolution is one)."""
    torch._dynamo.reset()
    pos, species = _cluster(generator)
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    compiled = torch.compile(model, backend="eager")
    energy, forces = energy_and_forces(compiled, pos, species, batch)
    expected_energy, expected_forces = energy_and_forces(model, pos, species, batch)
    torch.testing.assert_close(energy, expected_energy, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(forces, expected_forces, atol=1e-12, rtol=1e-12)
    torch._dynamo.reset()
