"""Spectral graph learning: Laplacians, batched and sparse eigensolvers, positional
encodings (transforms and sign/basis-invariant encoders such as SignNet and SPE)
and learnable polynomial spectral filters as ``MessagePassing`` layers.
"""

from torsion.spectral._encoders import SPE, BasisNet, SignNet
from torsion.spectral._filters import BernConv, ChebIIConv, GPRConv, JacobiConv, OptBasisConv
from torsion.spectral._laplacian import LaplacianEigs, laplacian, laplacian_eigs
from torsion.spectral._transforms import AddLaplacianPE, AddRandomWalkPE, canonical_signs

__all__: list[str] = [
    "SPE",
    "AddLaplacianPE",
    "AddRandomWalkPE",
    "BasisNet",
    "BernConv",
    "ChebIIConv",
    "GPRConv",
    "JacobiConv",
    "LaplacianEigs",
    "OptBasisConv",
    "SignNet",
    "canonical_signs",
    "laplacian",
    "laplacian_eigs",
]
