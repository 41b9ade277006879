"""Linear operators on flat vectors and on parameter pytrees.

A :class:`LinearOperator` is a square ``(n, n)`` map known only through its products with
blocks of vectors. Curvature operators act on the parameters of a model, so an operator
may also know the shapes of those parameters (its *layout*) and then accepts and returns
parameter pytrees: a ``dict`` of tensors or a ``tuple``/``list`` of tensors. A block of
``k`` vectors as a pytree is the same pytree with a leading ``k`` dimension on every leaf.

SciPy is imported only inside :meth:`LinearOperator.to_scipy`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DenseOperator", "LinearOperator", "TangentSpace"]

Pytree = Tensor | Mapping[str, Tensor] | Sequence[Tensor]


@runtime_checkable
class TangentSpace(Protocol):
    """What the curvature operators need from a manifold (structural; geoopt verbs).

    ``proju(x, u)`` projects an ambient vector onto the tangent space at ``x``;
    ``ehess2rhess(x, egrad, ehess, u)`` turns the Euclidean gradient and the Euclidean
    Hessian-vector product ``ehess = H u`` into the Riemannian Hessian-vector product.
    torsion's manifolds satisfy it; ``curvature`` never imports them.
    """

    def proju(self, x: Tensor, u: Tensor) -> Tensor: ...

    def ehess2rhess(self, x: Tensor, egrad: Tensor, ehess: Tensor, u: Tensor) -> Tensor: ...


class _Layout:
    """Shapes of a parameter pytree (dict or sequence) and their flat offsets."""

    def __init__(self, shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]]):
        if isinstance(shapes, Mapping):
            self.keys: tuple[str, ...] | None = tuple(shapes)
            self.shapes = tuple(torch.Size(s) for s in shapes.values())
        else:
            self.keys = None
            self.shapes = tuple(torch.Size(s) for s in shapes)
        self.numels = tuple(math.prod(s) for s in self.shapes)
        self.size = sum(self.numels)

    def leaves(self, tree: Any) -> list[Tensor]:
        if self.keys is not None:
            if not isinstance(tree, Mapping) or set(tree) != set(self.keys):
                got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
                raise ValueError(f"expected a dict with keys {sorted(self.keys)}, got {got}")
            leaves = [tree[key] for key in self.keys]
        else:
            if not isinstance(tree, (tuple, list)) or len(tree) != len(self.shapes):
                got = len(tree) if isinstance(tree, (tuple, list)) else type(tree).__name__
                raise ValueError(f"expected a tuple/list of {len(self.shapes)} tensors, got {got}")
            leaves = list(tree)
        if not all(isinstance(leaf, Tensor) for leaf in leaves):
            raise TypeError("every leaf of a parameter pytree must be a torch.Tensor")
        return leaves

    def flatten(self, tree: Any) -> Tensor:
        leaves = self.leaves(tree)
        if all(leaf.shape == s for leaf, s in zip(leaves, self.shapes, strict=True)):
            return torch.cat([leaf.reshape(-1) for leaf in leaves])
        k = leaves[0].shape[0] if leaves[0].ndim > 0 else -1
        if all(leaf.shape == (k, *s) for leaf, s in zip(leaves, self.shapes, strict=True)):
            return torch.cat([leaf.reshape(k, -1) for leaf in leaves], dim=1).mT
        got = [tuple(leaf.shape) for leaf in leaves]
        want = [tuple(s) for s in self.shapes]
        raise ValueError(f"leaf shapes {got} match neither the parameter shapes {want} nor a block")

    def unflatten(self, flat: Tensor) -> Any:
        if flat.ndim not in (1, 2) or flat.shape[0] != self.size:
            raise ValueError(
                f"expected a flat tensor (n,) or (n, k) with n={self.size}, got {tuple(flat.shape)}"
            )
        pieces = torch.split(flat, self.numels, dim=0)
        if flat.ndim == 1:
            leaves = [p.reshape(s) for p, s in zip(pieces, self.shapes, strict=True)]
        else:
            k = flat.shape[1]
            leaves = [p.mT.reshape(k, *s) for p, s in zip(pieces, self.shapes, strict=True)]
        if self.keys is not None:
            return dict(zip(self.keys, leaves, strict=True))
        return tuple(leaves)


class LinearOperator(ABC):
    """A square linear operator known through its products with blocks of vectors.

    Subclasses implement :meth:`_matmat` on validated flat blocks. Everything else
    (``matvec``, ``@`` on tensors and pytrees, ``+``, ``-``, scalar ``*`` and ``/``, ``to_dense``,
    ``to_scipy``) is derived from it.

    Args:
        shape: ``(n, n)``.
        dtype: floating dtype of the vectors the operator acts on.
        device: their device.
        param_shapes: optional layout, a dict ``name -> shape`` or a sequence of shapes
            whose sizes add up to ``n``; enables pytree input and output.
        symmetric: whether the operator is symmetric (then ``to_scipy`` gives an adjoint).

    Attributes:
        distributed: ``True`` when every product is summed over the ranks of a
            :mod:`torch.distributed` group (the model operators' data shards); the probes then
            broadcast their random vectors from rank 0 so that all ranks compute alike.

    Shapes:
        ``matvec``: ``(n,) -> (n,)``; ``matmat``: ``(n, k) -> (n, k)``; pytrees: leaves
        shaped like the parameters, or with a leading ``k`` for a block.
    """

    distributed: bool = False

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        param_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
        symmetric: bool = False,
    ):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"a LinearOperator must be square (n, n), got shape {shape}")
        if not dtype.is_floating_point:
            raise TypeError(f"a LinearOperator needs a floating dtype, got {dtype}")
        self.shape: tuple[int, int] = shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = symmetric
        self._layout = None if param_shapes is None else _Layout(param_shapes)
        if self._layout is not None and self._layout.size != shape[0]:
            raise ValueError(
                f"param_shapes hold {self._layout.size} entries but the operator is {shape}"
            )

    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """Product with a validated block ``V`` of shape ``(n, k)``; returns ``(n, k)``."""

    # -- products ---------------------------------------------------------------------------

    def matmat(self, V: Tensor) -> Tensor:
        """Product with a block of vectors: ``(n, k) -> (n, k)``."""
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.shape[0]:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(f"matmat expects a tensor of shape ({self.shape[0]}, k), got {got}")
        if V.dtype != self.dtype:
            raise TypeError(f"matmat expects dtype {self.dtype}, got {V.dtype}")
        return self._matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        """Product with one vector: ``(n,) -> (n,)``."""
        if not isinstance(v, Tensor) or v.ndim != 1:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"matvec expects a tensor of shape ({self.shape[0]},), got {got}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def __matmul__(self, x: Any) -> Any:
        if isinstance(x, Tensor):
            return self.matvec(x) if x.ndim == 1 else self.matmat(x)
        if isinstance(x, LinearOperator):
            return NotImplemented
        flat = self.flatten(x)
        if flat.ndim == 1:
            return self.unflatten(self.matvec(flat))
        return self.unflatten(self.matmat(flat))

    # -- pytrees ----------------------------------------------------------------------------

    def flatten(self, tree: Any) -> Tensor:
        """Pytree -> flat ``(n,)``, or a block pytree -> ``(n, k)``.

        An operator without a parameter layout treats a tensor as its own pytree.
        """
        if self._layout is None:
            if isinstance(tree, Tensor):
                return tree
            raise ValueError(
                f"{type(self).__name__} has no parameter layout; pass flat tensors "
                "(or build it with param_shapes)"
            )
        return self._layout.flatten(tree)

    def unflatten(self, flat: Tensor) -> Any:
        """Flat ``(n,)`` -> pytree, or ``(n, k)`` -> block pytree (leading ``k``).

        An operator without a parameter layout returns ``flat`` unchanged.
        """
        if self._layout is None:
            return flat
        return self._layout.unflatten(flat)

    # -- algebra ----------------------------------------------------------------------------

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, other, 1.0)

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, other, -1.0)

    def __mul__(self, scalar: Any) -> LinearOperator:
        value = _real_scalar(scalar)
        return NotImplemented if value is None else _ScaledOperator(self, value)

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> LinearOperator:
        value = _real_scalar(scalar)
        if value is None:
            return NotImplemented
        if value == 0:
            raise ZeroDivisionError("cannot divide a LinearOperator by zero")
        return _ScaledOperator(self, 1.0 / value)

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    # -- conversions ------------------------------------------------------------------------

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        """The ``(n, n)`` matrix, from products with identity columns in chunks of
        ``chunk_size`` (for small operators and tests)."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return torch.cat(
            [self.matmat(eye[:, i : i + chunk_size]) for i in range(0, n, chunk_size)], 1
        )

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` that converts numpy <-> torch per call.

        SciPy is imported here, lazily. The adjoint is available when the operator is
        symmetric.
        """
        import numpy as np
        import scipy.sparse.linalg

        def convert(x: Any) -> Tensor:
            return torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)

        def matvec(x: Any) -> Any:
            return self.matvec(convert(x).reshape(-1)).cpu().numpy()

        def matmat(x: Any) -> Any:
            return self.matmat(convert(x)).cpu().numpy()

        numpy_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        extra = {"rmatvec": matvec, "rmatmat": matmat} if self.symmetric else {}
        return scipy.sparse.linalg.LinearOperator(
            self.shape, matvec=matvec, matmat=matmat, dtype=numpy_dtype, **extra
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


def _real_scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number (a Python or NumPy number, or a
    one-element real tensor, read once here), else ``None``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_compatible(a: LinearOperator, b: LinearOperator) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"cannot add operators on {a.dtype}/{a.device} and {b.dtype}/{b.device}")


class _SumOperator(LinearOperator):
    """``a + sign * b``."""

    def __init__(self, a: LinearOperator, b: LinearOperator, sign: float):
        _check_compatible(a, b)
        super().__init__(a.shape, a.dtype, a.device, symmetric=a.symmetric and b.symmetric)
        self._layout = a._layout if a._layout is not None else b._layout
        # summed over the ranks if either term is: the probes must then use one set of
        # random vectors on every rank
        self.distributed = a.distributed or b.distributed
        self._a, self._b, self._sign = a, b, sign

    def _matmat(self, V: Tensor) -> Tensor:
        return self._a.matmat(V) + self._sign * self._b.matmat(V)


class _ScaledOperator(LinearOperator):
    """``scale * a``."""

    def __init__(self, a: LinearOperator, scale: float):
        super().__init__(a.shape, a.dtype, a.device, symmetric=a.symmetric)
        self._layout = a._layout
        self.distributed = a.distributed
        self._a, self._scale = a, scale

    def _matmat(self, V: Tensor) -> Tensor:
        return self._scale * self._a.matmat(V)


class DenseOperator(LinearOperator):
    """A :class:`LinearOperator` backed by an explicit square matrix.

    Args:
        matrix: ``(n, n)`` floating tensor.
        param_shapes: optional parameter layout (see :class:`LinearOperator`).
        symmetric: declare the matrix symmetric (not checked).

    Shapes:
        ``matrix``: ``(n, n)``.

    Example:
        >>> op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0])))
        >>> op @ torch.ones(2)
        tensor([1., 2.])
    """

    def __init__(
        self,
        matrix: Tensor,
        *,
        param_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None = None,
        symmetric: bool = False,
    ):
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"DenseOperator needs a square matrix (n, n), got {got}")
        super().__init__(
            tuple(matrix.shape),
            matrix.dtype,
            matrix.device,
            param_shapes=param_shapes,
            symmetric=symmetric,
        )
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def to_dense(self, chunk_size: int = 256) -> Tensor:
        return self.matrix.clone()
