"""Representations: tensor-product descriptors as frozen plain data (irreps, paths,
modes, layouts, normalizations) and e3nn interop. No ``nn.Module`` lives here;
:mod:`torsion.kernels` executes these descriptors.

* :class:`TPDescriptor`: ``irreps_in1, irreps_in2, irreps_out, paths, layout``, with the
  builders :meth:`~TPDescriptor.channelwise` (NequIP/MACE ``uvu``),
  :meth:`~TPDescriptor.fully_connected` (``uvw``), :meth:`~TPDescriptor.from_instructions`
  (e3nn-style instruction tuples) and e3nn interop both ways
  (:meth:`~TPDescriptor.from_e3nn`, :meth:`~TPDescriptor.to_e3nn`);
* :class:`Path` and :class:`PathMode` (``uvw``, ``uvu``, ``uuu``);
* :func:`path_coefficients`: e3nn's ``irrep_normalization`` / ``path_normalization``.

e3nn's ``Irreps`` is the vocabulary of every signature, and the flat weight layout is
e3nn's, so a descriptor given the same weights computes what ``e3nn.o3.TensorProduct``
does. The Clebsch-Gordan coefficients are e3nn's Wigner 3j symbols
(``e3nn.o3.wigner_3j``).
"""

from torsion.reps._descriptor import LAYOUTS, Layout, Path, PathMode, TPDescriptor
from torsion.reps._normalization import (
    IRREP_NORMALIZATIONS,
    PATH_NORMALIZATIONS,
    IrrepNormalization,
    PathNormalization,
    path_coefficients,
)

__all__ = [
    "IRREP_NORMALIZATIONS",
    "LAYOUTS",
    "PATH_NORMALIZATIONS",
    "IrrepNormalization",
    "Layout",
    "Path",
    "PathMode",
    "PathNormalization",
    "TPDescriptor",
    "path_coefficients",
]
