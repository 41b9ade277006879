"""Manifold-valued layers: the SPDNet family (BiMap, ReEig, LogEig, ...), Riemannian
SPD batch normalization, Grassmann layers (GrNet) and SPD message passing.
"""

__all__: list[str] = []
