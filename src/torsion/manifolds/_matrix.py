"""Small matrix helpers shared by the manifolds."""

from torch import Tensor

__all__ = ["frobenius_inner", "sym"]


def sym(a: Tensor) -> Tensor:
    """Symmetric part ``(a + a^T) / 2`` of a batch of square matrices."""
    return (a + a.mT) / 2


def frobenius_inner(a: Tensor, b: Tensor, keepdim: bool = False) -> Tensor:
    """``tr(a^T b)`` over the last two dimensions."""
    return (a * b).sum(dim=(-2, -1), keepdim=keepdim)
