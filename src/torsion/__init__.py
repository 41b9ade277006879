"""torsion: geometric deep learning for PyTorch.

Manifolds and Riemannian optimizers, curvature probes on one Hessian-vector-product
engine, and equivariant and spectral graph layers on fast tensor-product kernels.

Importing :mod:`torsion` is cheap: capabilities live in subpackages
(:mod:`torsion.linalg`, :mod:`torsion.manifolds`, ...) and are imported on use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
