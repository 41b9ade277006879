"""Equivariant layers: E(3)-equivariant tensor products, linears, gates, radial
bases and message passing (``EquivariantConv``) on top of :mod:`torsion.kernels`.
"""

__all__: list[str] = []
