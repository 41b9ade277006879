"""Equivariant layers: E(3)-equivariant tensor products, linears, gates, radial bases and
message passing on top of :mod:`torsion.kernels`, and a small interatomic potential.

* :class:`TensorProduct`: a :class:`~torsion.reps.TPDescriptor` with weights (e3nn's flat
  layout and initialisation), run by :func:`torsion.kernels.tensor_product`;
* :class:`Linear`: ``e3nn.o3.Linear``'s map, one weight matrix per pair of blocks and one
  matrix product per irrep;
* :class:`Gate`: ``e3nn.nn.Gate``'s nonlinearity;
* :class:`SphericalHarmonics` (e3nn's, reused), :class:`RadialBasis` (Bessel functions with
  the smooth polynomial cutoff :func:`polynomial_cutoff`);
* :class:`EquivariantConv`: NequIP's interaction block, a
  ``torch_geometric.nn.MessagePassing`` on the fused :func:`torsion.kernels.conv` op, with
  per-edge weights from a :class:`RadialMLP`;
* :class:`EquivariantPotential`: species and positions to energies, with
  :func:`radius_graph` and :func:`energy_and_forces` (forces by autograd).

All layers read and write e3nn's ``mul_ir`` layout and agree with e3nn given the same
weights.
"""

from torsion.equivariant._conv import EquivariantConv, RadialMLP
from torsion.equivariant._gate import Gate
from torsion.equivariant._linear import Linear
from torsion.equivariant._potential import EquivariantPotential, energy_and_forces, radius_graph
from torsion.equivariant._radial import RadialBasis, SphericalHarmonics, polynomial_cutoff
from torsion.equivariant._tensor_product import TensorProduct

__all__ = [
    "EquivariantConv",
    "EquivariantPotential",
    "Gate",
    "Linear",
    "RadialBasis",
    "RadialMLP",
    "SphericalHarmonics",
    "TensorProduct",
    "energy_and_forces",
    "polynomial_cutoff",
    "radius_graph",
]
