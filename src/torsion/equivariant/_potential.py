"""A small NequIP-style interatomic potential: species and positions in, energies out."""

from __future__ import annotations

from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

from torsion.equivariant._conv import EquivariantConv
from torsion.equivariant._gate import Gate
from torsion.equivariant._linear import Linear
from torsion.equivariant._radial import RadialBasis, SphericalHarmonics
from torsion.manifolds import check_weight_manifold

__all__ = ["EquivariantPotential", "energy_and_forces", "radius_graph"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_index(x: Any, name: str, num_atoms: int, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int64 or int32, got {x.dtype}")
    if x.shape != (num_atoms,):
        raise ValueError(
            f"{name} must have shape ({num_atoms},) (one per atom), got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, but pos is on {device}")
    return x.long()


def _check_positions(pos: Any) -> Tensor:
    if not isinstance(pos, Tensor):
        raise TypeError(f"pos must be a torch.Tensor, got {type(pos).__name__}")
    if not pos.dtype.is_floating_point:
        raise TypeError(f"pos must have a floating dtype, got {pos.dtype}")
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
    return pos


def _structure_count(batch: Tensor) -> int:
    """Number of structures, ``max(batch) + 1`` (one host sync); refuses negative ids."""
    if batch.numel() == 0:
        return 0
    low, high = (int(v) for v in torch.aminmax(batch))
    if low < 0:
        raise ValueError(f"batch holds negative structure ids (min {low})")
    return high + 1


def _radius_graph(pos: Tensor, cutoff: float, batch: Tensor, num_structures: int) -> Tensor:
    """All ordered pairs ``i != j`` of one structure closer than ``cutoff``; ``(2, E)``.

    Works on the pairs within each structure only (``sum_s N_s^2``), enumerated on the
    device from the structure sizes: two host syncs (the number of pairs, then the number of
    edges), which a graph of data-dependent size cannot avoid.
    """
    order = torch.argsort(batch, stable=True)
    counts = torch.zeros(num_structures, dtype=torch.long, device=pos.device)
    counts.index_add_(0, batch, torch.ones_like(batch))
    starts = torch.cumsum(counts, 0) - counts
    pair_counts = counts * counts
    num_pairs = int(pair_counts.sum())
    structure = torch.repeat_interleave(
        torch.arange(num_structures, device=pos.device), pair_counts, output_size=num_pairs
    )
    first_pair = torch.cumsum(pair_counts, 0) - pair_counts
    local = torch.arange(num_pairs, device=pos.device) - first_pair[structure]
    size = counts[structure]
    src = order[starts[structure] + local // size]
    dst = order[starts[structure] + local % size]
    with torch.no_grad():
        distance2 = (pos[src] - pos[dst]).pow(2).sum(-1)
    keep = (src != dst) & (distance2 < cutoff * cutoff)
    return torch.stack([src[keep], dst[keep]])


def radius_graph(pos: Tensor, cutoff: float, batch: Tensor | None = None) -> Tensor:
    """Edges between atoms of the same structure closer than ``cutoff`` (no cell, no PBC).

    Every ordered pair ``(j, i)``, ``j != i``, in one structure with
    ``|pos_j - pos_i| < cutoff`` is an edge ``j -> i`` (both directions are listed). The
    cost is quadratic in the size of each structure, not of the batch; nothing is
    differentiated through the selection.

    Args:
        pos: positions.
        cutoff: the radius ``> 0``.
        batch: structure id of each atom (``None``: one structure); need not be sorted.

    Returns:
        ``edge_index`` ``(2, E)``, int64: row 0 senders, row 1 receivers.

    Raises:
        TypeError: for wrong types or dtypes.
        ValueError: for wrong shapes, a non-positive cutoff, negative ids or mismatched
            devices.

    Shapes:
        ``pos``: ``(N, 3)``, ``batch``: ``(N,)``; output ``(2, E)``.

    Example:
        >>> radius_graph(torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]]), cutoff=1.5)
        tensor([[0, 1],
                [1, 0]])
    """
    pos = _check_positions(pos)
    if not cutoff > 0:
        raise ValueError(f"cutoff must be > 0, got {cutoff!r}")
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    batch = _check_index(batch, "batch", pos.shape[0], pos.device)
    return _radius_graph(pos, float(cutoff), batch, _structure_count(batch))


class EquivariantPotential(nn.Module):
    """A NequIP-style E(3)-equivariant interatomic potential: energy per structure.

    Species are embedded as ``channels x 0e``; edges join atoms closer than ``cutoff``
    (:func:`radius_graph`, built on every call); each of ``num_layers`` interaction
    blocks is an :class:`EquivariantConv` (spherical harmonics up to ``lmax`` of the edge
    vector, a :class:`RadialBasis` of its length) followed by a :class:`Gate`, with hidden
    irreps ``channels x (0e + 1o + 2e + ...)``. A readout (``Linear -> SiLU -> Linear`` on
    the scalars) gives each atom's energy, ``E_i = energy_scale * readout(h_i) +
    atomic_energies[species_i]``, and the energy of a structure is their sum. The energy is
    invariant to rotations, reflections, translations and permutations of the atoms, and
    smooth in the positions (the radial basis vanishes with two derivatives at the cutoff),
    so forces ``-dE/dpos`` (:func:`energy_and_forces`) are conservative.

    Args:
        num_species: number of chemical species; ``species`` holds ids in
            ``[0, num_species)``.
        cutoff: the interaction radius (default 5.0, in the units of ``pos``).
        channels: multiplicity of each hidden irrep (default 16).
        lmax: largest ``l`` of the hidden irreps and spherical harmonics (default 2).
        num_layers: number of interaction blocks (default 2).
        num_radial: size of the Bessel basis (default 8).
        radial_hidden: width of the radial MLPs (default 32).
        avg_num_neighbors: typical number of neighbours; messages are divided by its square
            root (default 16.0; set it to the mean degree of your data).
        energy_scale: multiplies the network's per-atom output (default 1.0; e.g. the
            standard deviation of the per-atom energies, or the force RMS).
        backend: kernel backend of the convolutions, ``"auto"`` (default) or a name.
        weight_manifold: ``None`` (default: free weights) or ``"stiefel"``: every
            equivariant :class:`Linear` of the model (each convolution's input, output and
            self-connection layers and the readout) gets orthonormal block weights,
            :class:`geoopt.ManifoldParameter` s on :class:`torsion.manifolds.Stiefel` (see
            :class:`Linear`); train them with :mod:`torsion.optim`'s Riemannian
            optimizers. Symmetries and conservative forces are unchanged (the constraint
            acts on multiplicity space only). The radial MLPs, the species embedding and
            the atomic energies stay free.
        dtype: of the parameters.
        device: of the parameters.

    Attributes:
        atomic_energies: learnable per-species energy offsets ``(num_species,)``, zero at
            construction (fill them with a least-squares fit of the energies to the
            composition to start close).

    Raises:
        ValueError: for ``num_species < 1``, invalid sizes, or a ``weight_manifold`` other
            than ``None`` or ``"stiefel"``.

    Shapes:
        ``pos``: ``(N, 3)``, ``species``: ``(N,)``, ``batch``: ``(N,)`` or ``None``; output
        ``(num_structures,)`` with ``num_structures = max(batch) + 1``.
    """

    def __init__(
        self,
        num_species: int,
        cutoff: float = 5.0,
        *,
        channels: int = 16,
        lmax: int = 2,
        num_layers: int = 2,
        num_radial: int = 8,
        radial_hidden: int = 32,
        avg_num_neighbors: float = 16.0,
        energy_scale: float = 1.0,
        backend: str = "auto",
        weight_manifold: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        #: ``None`` or ``"stiefel"``: the constraint on the equivariant linear layers.
        self.weight_manifold = check_weight_manifold(weight_manifold, "EquivariantPotential")
        for name, value, low in (
            ("num_species", num_species, 1),
            ("channels", channels, 1),
            ("lmax", lmax, 0),
            ("num_layers", num_layers, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(
                    f"EquivariantPotential: {name} must be an int >= {low}, got {value!r}"
                )
        if not cutoff > 0:
            raise ValueError(f"EquivariantPotential: cutoff must be > 0, got {cutoff!r}")
        factory = {"dtype": dtype, "device": device}
        self.num_species, self.cutoff = num_species, float(cutoff)
        self.embedding = nn.Embedding(num_species, channels, **factory)
        self.spherical_harmonics = SphericalHarmonics(o3.Irreps.spherical_harmonics(lmax))
        self.radial_basis = RadialBasis(num_radial, cutoff, **factory)
        irreps_sh = self.spherical_harmonics.irreps_out
        scalars = o3.Irreps(f"{channels}x0e")
        gated = o3.Irreps([(channels, (l, (-1) ** l)) for l in range(1, lmax + 1)])
        silu, sigmoid = nn.functional.silu, torch.sigmoid
        irreps = scalars
        self.convs = nn.ModuleList()
        self.gates = nn.ModuleList()
        for _ in range(num_layers):
            gate = Gate(
                scalars,
                [silu],
                o3.Irreps(f"{gated.num_irreps}x0e") if lmax else "",
                [sigmoid] if lmax else [],
                gated,
            )
            self.convs.append(
                EquivariantConv(
                    irreps,
                    irreps_sh,
                    gate.irreps_in,
                    num_radial,
                    radial_hidden,
                    avg_num_neighbors=avg_num_neighbors,
                    backend=backend,
                    weight_manifold=weight_manifold,
                    **factory,
                )
            )
            self.gates.append(gate)
            irreps = gate.irreps_out
        self.irreps_hidden = irreps
        linear = {"weight_manifold": weight_manifold, **factory}
        self.readout_hidden = Linear(irreps, scalars, **linear)
        self.readout_act = nn.SiLU()
        self.readout = Linear(scalars, "0e", **linear)
        self.atomic_energies = nn.Parameter(torch.zeros(num_species, **factory))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale), **factory))

    def _check_inputs(
        self, pos: Any, species: Any, batch: Any
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        pos = _check_positions(pos)
        if pos.dtype != self.atomic_energies.dtype:
            raise TypeError(
                f"pos has dtype {pos.dtype}, but the model's parameters have "
                f"{self.atomic_energies.dtype}"
            )
        if pos.device != self.atomic_energies.device:
            raise ValueError(
                f"pos is on {pos.device}, but the model is on {self.atomic_energies.device}"
            )
        num_atoms = pos.shape[0]
        species = _check_index(species, "species", num_atoms, pos.device)
        if batch is None:
            batch = torch.zeros(num_atoms, dtype=torch.long, device=pos.device)
        batch = _check_index(batch, "batch", num_atoms, pos.device)
        if num_atoms == 0:
            return pos, species, batch, 0
        # One host sync for every value check.
        low_s, high_s, low_b, high_b = (
            int(v) for v in torch.stack([species.min(), species.max(), batch.min(), batch.max()])
        )
        if low_s < 0 or high_s >= self.num_species:
            raise ValueError(
                f"species holds ids in [{low_s}, {high_s}], outside [0, {self.num_species}) "
                f"(num_species = {self.num_species})"
            )
        if low_b < 0:
            raise ValueError(f"batch holds negative structure ids (min {low_b})")
        return pos, species, batch, high_b + 1

    def forward(self, pos: Tensor, species: Tensor, batch: Tensor | None = None) -> Tensor:
        """Energy of each structure.

        Args:
            pos: atom positions.
            species: species id of each atom, int64 or int32, in ``[0, num_species)``.
            batch: structure id of each atom (``None``: all atoms form one structure).

        Returns:
            ``(num_structures,)`` energies; differentiable in ``pos`` to any order.

        Raises:
            TypeError: for wrong types or dtypes (``pos`` must have the parameters' dtype).
            ValueError: for wrong shapes, species out of range, negative structure ids or
                mismatched devices.
        """
        pos, species, batch, num_structures = self._check_inputs(pos, species, batch)
        edge_index = _radius_graph(pos, self.cutoff, batch, num_structures)
        edge_vec = pos[edge_index[0]] - pos[edge_index[1]]
        edge_attr = self.spherical_harmonics(edge_vec)
        edge_radial = self.radial_basis(edge_vec.norm(dim=-1))
        h = self.embedding(species)
        for conv, gate in zip(self.convs, self.gates, strict=True):
            h = gate(conv(h, edge_index, edge_attr, edge_radial))
        atom_energy = self.readout(self.readout_act(self.readout_hidden(h))).squeeze(-1)
        atom_energy = self.energy_scale * atom_energy + self.atomic_energies[species]
        return atom_energy.new_zeros(num_structures).index_add(0, batch, atom_energy)


def energy_and_forces(
    model: nn.Module,
    pos: Tensor,
    species: Tensor,
    batch: Tensor | None = None,
    *,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Energies and forces ``F = -dE/dpos`` of a potential, by autograd.

    For force training pass ``create_graph=True``: the forces stay differentiable in the
    parameters, so a loss on them back-propagates by double backward.

    Args:
        model: called as ``model(pos=pos, species=species, batch=batch)``, returning the
            energy per structure (e.g. :class:`EquivariantPotential`).
        pos: positions; not modified (a copy that requires grad is used if ``pos`` does
            not).
        species: species ids.
        batch: structure ids or ``None``.
        create_graph: keep the graph of the forces (default ``False``).

    Returns:
        ``(energy, forces)``: ``(num_structures,)`` and ``(N, 3)``.

    Shapes:
        ``pos``: ``(N, 3)``; ``forces``: ``(N, 3)``.
    """
    with torch.enable_grad():
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        energy = model(pos=pos, species=species, batch=batch)
        (gradient,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -gradient
