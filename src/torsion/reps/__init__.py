"""Representations: tensor-product descriptors as frozen plain data (irreps, paths,
modes, layouts, normalizations), Clebsch-Gordan tables and e3nn interop. No
``nn.Module`` lives here; :mod:`torsion.kernels` executes these descriptors.
"""

__all__: list[str] = []
