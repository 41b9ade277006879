"""The tensor-product layer: a :class:`~torsion.reps.TPDescriptor` with weights, run by a kernel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torsion.kernels import tensor_product
from torsion.reps import TPDescriptor

__all__ = ["TensorProduct"]


class TensorProduct(nn.Module):
    """A tensor product of two irreps features, e3nn's ``o3.TensorProduct`` on torsion kernels.

    The descriptor says which paths there are and their coefficients (see
    :class:`torsion.reps.TPDescriptor`); this layer owns (or receives) the weights and runs
    :func:`torsion.kernels.tensor_product` on the backend picked for the inputs. The flat
    weight vector has e3nn's order, shapes and initialisation (standard normal), so with the
    same weights the output equals ``e3nn.o3.TensorProduct``'s (``descriptor.to_e3nn()``
    builds the matching e3nn module).

    Args:
        descriptor: the tensor product.
        shared_weights: one set of weights for all samples (``True``, default) or one per
            sample, passed to :meth:`forward` (``False``; e.g. from a radial MLP per edge).
        internal_weights: the layer owns its weights as the parameter :attr:`weight`
            (default ``True``; needs ``shared_weights=True``). With ``False``, :meth:`forward`
            takes them.
        backend: ``"auto"`` (default: the best registered backend for the inputs' device and
            dtype) or a backend name from :func:`torsion.kernels.available_backends`. The
            parameters do not depend on it.
        dtype: of the internal weights (default: torch's default dtype).
        device: of the internal weights.

    Raises:
        TypeError: if ``descriptor`` is not a :class:`~torsion.reps.TPDescriptor`.
        ValueError: for ``internal_weights=True`` with ``shared_weights=False``.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``, ``weight``:
        ``(weight_numel,)`` shared or ``(..., weight_numel)`` per sample; leading shapes
        broadcast; output ``(..., irreps_out.dim)``. Tensors are in ``descriptor.layout``.

    Example:
        >>> d = TPDescriptor.fully_connected("2x0e + 2x1o", "1o", "3x0e + 2x1o")
        >>> tp = TensorProduct(d)
        >>> tp.weight.shape, tp(torch.randn(4, 8), torch.randn(4, 3)).shape
        (torch.Size([10]), torch.Size([4, 9]))
    """

    def __init__(
        self,
        descriptor: TPDescriptor,
        shared_weights: bool = True,
        internal_weights: bool = True,
        backend: str = "auto",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(descriptor, TPDescriptor):
            raise TypeError(
                "TensorProduct: descriptor must be a torsion.reps.TPDescriptor, got "
                f"{type(descriptor).__name__}"
            )
        if internal_weights and not shared_weights:
            raise ValueError(
                "TensorProduct: internal_weights=True needs shared_weights=True (per-sample "
                "weights must be passed to forward)"
            )
        if not isinstance(backend, str):
            raise TypeError(f"TensorProduct: backend must be a str, got {type(backend).__name__}")
        self.descriptor = descriptor
        self.shared_weights = shared_weights
        self.internal_weights = internal_weights
        self.backend = backend
        if internal_weights and descriptor.weight_numel > 0:
            self.weight = nn.Parameter(
                torch.randn(descriptor.weight_numel, dtype=dtype, device=device)
            )
        else:
            self.register_parameter("weight", None)

    @property
    def irreps_in1(self):
        """Irreps of the first input."""
        return self.descriptor.irreps_in1

    @property
    def irreps_in2(self):
        """Irreps of the second input."""
        return self.descriptor.irreps_in2

    @property
    def irreps_out(self):
        """Irreps of the output."""
        return self.descriptor.irreps_out

    @property
    def weight_numel(self) -> int:
        """Length of the flat weight vector (e3nn's ``weight_numel``)."""
        return self.descriptor.weight_numel

    def forward(self, x1: Tensor, x2: Tensor, weight: Tensor | None = None) -> Tensor:
        """Evaluate the tensor product.

        Args:
            x1: first input.
            x2: second input.
            weight: flat weights in e3nn's order; required when ``internal_weights=False``
                (shape ``(..., weight_numel)`` for per-sample weights), otherwise optional and
                used instead of :attr:`weight`.

        Returns:
            The tensor product.

        Raises:
            ValueError: for missing weights, a weight of the wrong shape (per-sample weights
                given to a ``shared_weights=True`` layer included), features that do not
                match the irreps, or mismatched devices.
            TypeError: for non-tensors or mismatched dtypes.
        """
        if weight is None:
            if self.weight_numel > 0 and not self.internal_weights:
                raise ValueError(
                    f"TensorProduct: internal_weights=False, so forward needs weight of shape "
                    f"(..., {self.weight_numel})"
                )
            weight = self.weight
        elif self.shared_weights and isinstance(weight, Tensor) and weight.ndim != 1:
            raise ValueError(
                f"TensorProduct: shared_weights=True expects weight of shape "
                f"({self.weight_numel},), got {tuple(weight.shape)}"
            )
        return tensor_product(self.descriptor, x1, x2, weight, backend=self.backend)

    def extra_repr(self) -> str:
        d = self.descriptor
        return (
            f"{d.irreps_in1} x {d.irreps_in2} -> {d.irreps_out}, {len(d.paths)} paths, "
            f"{d.weight_numel} weights, backend={self.backend!r}"
        )
