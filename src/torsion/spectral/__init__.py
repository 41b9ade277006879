"""Spectral graph learning: Laplacians, batched and sparse eigensolvers, positional
encodings (transforms and sign/basis-invariant encoders such as SignNet and SPE)
and learnable polynomial spectral filters as ``MessagePassing`` layers.
"""

from torsion.spectral._encoders import SPE, BasisNet, SignNet
from torsion.spectral._filters import BernConv, ChebIIConv, GPRConv, JacobiConv, OptBasisConv

__all__: list[str] = [
    "SPE",
    "BasisNet",
    "BernConv",
    "ChebIIConv",
    "GPRConv",
    "JacobiConv",
    "OptBasisConv",
    "SignNet",
]
