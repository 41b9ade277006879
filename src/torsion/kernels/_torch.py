"""The ``torch`` backend: the fast tensor product and fused message passing in plain PyTorch.

How it is fast (details in :mod:`torsion.kernels._torch_plan`):

* for the convolution case (every path ``uvu``, edge attributes of multiplicity 1, as in
  NequIP and MACE) the Clebsch-Gordan blocks of *all* paths are contracted with the edge
  attributes once per edge into one small matrix ``M[e]`` (output components x input
  components), shared by all channels; one batched matrix product with the node features
  laid out channels-contiguous (``ir_mul``) gives every path at once, and one broadcast
  multiply applies the per-edge weights. No per-channel outer product is formed;
* every other descriptor (``uvw``, ``uuu``, ``uvu`` with multiplicities on both inputs)
  runs one einsum per path;
* work is cut into chunks of about 4 MiB of intermediates (8 MiB in float64), whose
  buffers are reused from chunk to chunk instead of allocated (and page-faulted) anew;
* message passing (:func:`torch_conv`) is fused: per chunk of edges, gather the senders,
  evaluate, and scatter-sum into the receivers, either with ``index_add_``
  (``reduction="scatter"``; atomic, so not bitwise reproducible, on CUDA) or with a
  receiver-sorted segment reduction (``reduction="sorted"``, deterministic on every
  device); ``"auto"`` (default) takes ``index_add_`` on CPU, where it is deterministic.

Derivatives. The tensor product is trilinear, so its gradient with respect to any input
is again a tensor product with the roles permuted (the gradient with respect to ``x1`` is
the product of ``grad_out`` with ``x2`` through the transposed coefficients, and so on).
The ops are ``torch.library`` custom ops (``torsion::tp_slot``, ``torsion::conv_slot``,
and for message passing the fused first-order backward ``torsion::conv_grads`` and its own
backward ``torsion::conv_grads_backward``, the second-order pass of force training in one
sweep over the edges; see :mod:`torsion.kernels._torch_ops`) whose registered backward
calls the same ops, so backward, double backward (forces, and force training) and higher
orders are explicit tensor products, with fake (meta) implementations for
``torch.compile``.

Force training with ``torch.compile``. ``aot_autograd`` cannot differentiate twice through
a compiled region: both ``torch.compile(energy)`` and a compiled function that returns
energy *and* forces (``autograd.grad(..., create_graph=True)`` inside) raise "torch.compile
with aot_autograd does not currently support double backward" as soon as the force loss
is backpropagated. The recipe:

* inference and molecular dynamics (forces, first order): compile the energy, take forces
  with one ``torch.autograd.grad`` (no ``create_graph``); the custom ops trace with
  ``fullgraph=True``;
* force training (a loss on forces, so double backward): run the energy eagerly. The heavy
  work is in the custom ops, whose backward and double backward are the explicit
  tensor-product kernels above, so eager mode loses little::

      energy = model(pos)                                        # eager, not compiled
      (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
      loss = e_weight * (energy - e_ref).pow(2).mean() + f_weight * (grad + f_ref).pow(2).mean()
      loss.backward()                                            # double backward, explicit
"""

from __future__ import annotations

import torch
from torch import Tensor

from torsion.kernels._checks import (
    Reduction,
    check_conv_inputs,
    check_edge_indices_in_range,
    check_reduction,
    check_tensor_product_inputs,
)
from torsion.kernels._registry import Backend, BackendSupport
from torsion.kernels._torch_ops import conv_slot, plan_handle, tp_slot
from torsion.kernels._torch_plan import SLOT_OUT
from torsion.reps import LAYOUTS, TPDescriptor

__all__ = ["TorchBackend", "torch_conv", "torch_tensor_product"]

#: Scatter-sum strategies of :func:`torch_conv`.


def torch_tensor_product(
    descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Evaluate ``descriptor`` with the fast path; same contract as
    :func:`torsion.kernels.reference_tensor_product`.

    Differentiable to any order through explicit tensor-product derivatives; traceable by
    ``torch.compile`` (custom op with a fake implementation).

    Args:
        descriptor: the tensor product; ``x1``, ``x2`` and the result are in its layout.
        x1: first input.
        x2: second input.
        weight: ``(weight_numel,)`` shared or ``(..., weight_numel)`` per sample; ``None``
            when ``weight_numel == 0``.

    Returns:
        The tensor product.

    Raises:
        TypeError, ValueError: as :func:`torsion.kernels.tensor_product` documents.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``, ``x2``: ``(..., irreps_in2.dim)``; leading shapes
        broadcast. Output: ``(..., irreps_out.dim)``.
    """
    if torch.compiler.is_compiling():
        # Dynamo sees the descriptor only through the constant plan handle; the op's fake
        # implementation checks the shapes against the plan while tracing.
        per_sample = weight is not None and weight.dim() > 1
        leading = [x1.shape[:-1], x2.shape[:-1], *([weight.shape[:-1]] if per_sample else [])]
        batch = torch.broadcast_shapes(*leading)
    else:
        batch, per_sample = check_tensor_product_inputs(descriptor, x1, x2, weight)
    x1 = x1.expand(*batch, x1.shape[-1]).reshape(-1, x1.shape[-1])
    x2 = x2.expand(*batch, x2.shape[-1]).reshape(-1, x2.shape[-1])
    if per_sample:
        weight = weight.expand(*batch, weight.shape[-1]).reshape(-1, weight.shape[-1])
    if weight is not None and weight.shape[-1] == 0:
        weight = None
    out = tp_slot(plan_handle(descriptor), SLOT_OUT, per_sample, False, x1, x2, weight, None)
    return out.reshape(*batch, out.shape[-1])


def torch_conv(
    descriptor: TPDescriptor,
    x_node: Tensor,
    edge_attr: Tensor,
    edge_weight: Tensor | None,
    edge_src: Tensor,
    edge_dst: Tensor,
    num_nodes: int,
    *,
    reduction: Reduction = "auto",
) -> Tensor:
    """Fused message passing: per chunk of edges, gather senders, tensor product, scatter-sum.

    Same contract as :func:`torsion.kernels.reference_conv`. Nothing per edge is kept
    beyond one chunk (about 4 MiB of intermediates); derivatives of any order are fused
    the same way (the gradient for ``x_node`` gathers at the receivers and scatters to the
    senders). In eager mode the inputs are validated and the edge indices checked against
    their ranges (one host sync); under ``torch.compile`` the op's fake implementation
    checks the shapes while tracing, the range check is skipped and ``index_select``
    reports a bad index.

    Args:
        descriptor: the tensor product applied on every edge.
        x_node: node features, in ``descriptor.layout``.
        edge_attr: edge attributes.
        edge_weight: ``(E, weight_numel)``, ``(weight_numel,)`` or ``None``.
        edge_src: sender of each edge.
        edge_dst: receiver of each edge.
        num_nodes: number of output rows.
        reduction: how messages are summed into receivers. ``"sorted"``: edges are sorted
            by receiver (by sender for the ``x_node`` gradient) and each receiver's messages
            summed by a segment reduction, then added once, so results are bitwise
            reproducible on every device; ``"scatter"``: ``index_add_`` in edge order
            (deterministic on CPU, atomic and so not bitwise reproducible on CUDA);
            ``"auto"`` (default): ``"scatter"`` on CPU (faster, and already
            deterministic there), ``"sorted"`` elsewhere.

    Returns:
        The summed messages per receiver.

    Raises:
        TypeError, ValueError: as :func:`torsion.kernels.conv` documents; ``ValueError``
            for an unknown ``reduction``.

    Shapes:
        ``x_node``: ``(N, irreps_in1.dim)``, ``edge_attr``: ``(E, irreps_in2.dim)``,
        ``edge_src``, ``edge_dst``: ``(E,)``; output ``(num_nodes, irreps_out.dim)``.
    """
    check_reduction(reduction)
    if not torch.compiler.is_compiling():
        num_nodes = check_conv_inputs(
            descriptor, x_node, edge_attr, edge_weight, edge_src, edge_dst, num_nodes
        )
        check_edge_indices_in_range(edge_src, edge_dst, x_node.shape[0], num_nodes)
    per_edge = edge_weight is not None and edge_weight.dim() == 2
    if edge_weight is not None and edge_weight.shape[-1] == 0:
        edge_weight = None
    return conv_slot(
        plan_handle(descriptor),
        SLOT_OUT,
        per_edge,
        False,
        reduction == "sorted" or (reduction == "auto" and x_node.device.type != "cpu"),
        x_node,
        edge_attr,
        edge_weight,
        None,
        edge_src,
        edge_dst,
        x_node.shape[0],
        num_nodes,
    )


class TorchBackend(Backend):
    """The ``torch`` backend: every descriptor (all path modes), CPU and CUDA, both
    layouts, float32/float64, derivatives of any order through explicit tensor-product
    custom ops.

    Args:
        reduction: how :meth:`conv` scatter-sums messages: ``"auto"`` (default),
            ``"sorted"`` or ``"scatter"`` (see :func:`torch_conv`).

    Raises:
        ValueError: for an unknown ``reduction``.
    """

    name = "torch"
    priority = 10
    support = BackendSupport(
        ops=frozenset({"tensor_product", "conv"}),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        layouts=frozenset(LAYOUTS),
        max_derivative_order=None,
    )

    def __init__(self, reduction: Reduction = "auto") -> None:
        check_reduction(reduction)
        self.reduction = reduction

    def tensor_product(
        self, descriptor: TPDescriptor, x1: Tensor, x2: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """See :func:`torch_tensor_product`."""
        return torch_tensor_product(descriptor, x1, x2, weight)

    def conv(
        self,
        descriptor: TPDescriptor,
        x_node: Tensor,
        edge_attr: Tensor,
        edge_weight: Tensor | None,
        edge_src: Tensor,
        edge_dst: Tensor,
        num_nodes: int,
    ) -> Tensor:
        """See :func:`torch_conv`; the reduction is :attr:`reduction`."""
        return torch_conv(
            descriptor,
            x_node,
            edge_attr,
            edge_weight,
            edge_src,
            edge_dst,
            num_nodes,
            reduction=self.reduction,
        )
