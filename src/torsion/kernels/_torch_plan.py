"""Execution plans of the ``torch`` backend: the four slots of a tensor product.

A tensor product is trilinear, so it is one scalar form in four slots,

    ``F(x1, x2, w, g) = <g, TP(x1, x2, w)>``,

and everything the backend computes is the gradient of ``F`` with respect to one slot
given the other three: the forward is the ``out`` slot (``TP = dF/dg``), the backward
with respect to ``x1`` is the ``x1`` slot evaluated with ``g = grad_out``, and so on.
Each slot is again trilinear in the other three, so the derivative of a slot is another
slot with the roles permuted: backward and double backward (forces and force training)
are tensor products, never autograd through einsums.

Two ways to evaluate a slot on a flat batch ``(B, dim)``:

* the **merged** plan, when every path is ``uvu`` and every second-input block a path
  reads has multiplicity 1 (the NequIP/MACE convolution). Paths are grouped by the
  multiplicity ``m`` of their first input. For a group, the Clebsch-Gordan blocks of all
  its paths are contracted with ``x2`` once per sample into one small matrix
  ``M[b] = (x2[b] @ G).view(R, D1)`` (``R``: the paths' output components stacked,
  ``D1``: the first-input components of the group), so one ``bmm(M, x1)`` with ``x1``
  as ``(B, D1, m)`` (channels contiguous) gives every path's output, and a broadcast
  multiply by the per-path weights finishes it. The other slots are the transposed
  products (``M^T (g * w)``, ``(g * w) x1^T`` contracted with ``G^T``, and the row sums
  of ``(M x1) * g``). No ``(u, v)`` outer product is formed. ``M`` is block-sparse
  (in the MACE problem 115 of its 315 entries can be nonzero), but one dense ``bmm``
  beats one ``bmm`` per nonzero block by 4-10x on the CPU (small-matrix ``bmm`` cost is
  per matrix, not per flop), so the zeros stay.
* the **general** plan, every other descriptor: one einsum per path and slot (``uvw``,
  ``uvu`` with any multiplicities, ``uuu``, weighted or not).

The derivative of the first-order backward (force training) is one pass too
(:meth:`TPPlan.second_order`): its terms share ``M(x2)``, ``M(dx2)``, the scaled output
gradients and the products ``M(x2) dx1 + M(dx2) x1``, accumulated by ``baddbmm_``.
Intermediates live in :class:`Scratch` buffers that the chunks of a pass reuse.

Index tensors and coefficient tables are built once per descriptor and cached per
``(dtype, device)``; the layout conversion (``mul_ir`` <-> the channels-contiguous
internal form) is folded into those index tensors and is a view when the descriptor is
already ``ir_mul`` with blocks in order.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch
from e3nn import o3
from torch import Tensor

from torsion.kernels._layout import join_blocks, split_blocks
from torsion.reps import PathMode, TPDescriptor

__all__ = [
    "SLOT_NAMES",
    "SLOT_OUT",
    "SLOT_W",
    "SLOT_X1",
    "SLOT_X2",
    "Scratch",
    "TPPlan",
    "plan_for",
]

#: Slot indices, in argument order ``(x1, x2, w, g)``.
SLOT_X1, SLOT_X2, SLOT_W, SLOT_OUT = 0, 1, 2, 3
SLOT_NAMES = ("x1", "x2", "weight", "out")

#: Target size of the per-chunk intermediates, in elements (4 MiB in float32). Since every
#: op reuses its chunk buffers (:class:`Scratch`), bigger chunks cost no page faults and
#: amortise the Python work per chunk: 2**20 measured best of 2**18..2**21 on the MACE
#: problem's double backward (quiet 2-core Xeon: 3-5 % faster than 2**19 at one thread,
#: 6-9 % at two; 2**21 was slower in float64).
CHUNK_ELEMENTS = 1 << 20
#: The same target on other devices (CUDA): 128 MiB in float32. A GPU has memory to spare
#: and pays per launch, and the CPU size would cut E = 1e6 edges of the C = 128 problem
#: into some 4,300 chunks of a dozen small launches each. Not yet tuned on a GPU.
DEVICE_CHUNK_ELEMENTS = 1 << 25


@functools.lru_cache(maxsize=512)
def _wigner_3j(l1: int, l2: int, l_out: int) -> Tensor:
    return o3.wigner_3j(l1, l2, l_out, dtype=torch.float64)


def _block_positions(irreps: o3.Irreps, layout: str, block: int) -> Tensor:
    """Flat positions of block ``block`` of ``irreps``, shaped ``(ir.dim, mul)``."""
    start = irreps.slices()[block].start
    mul, ir = irreps[block]
    comp = torch.arange(ir.dim)[:, None]
    chan = torch.arange(mul)[None, :]
    if layout == "ir_mul":
        return start + comp * mul + chan
    return start + chan * ir.dim + comp


def _as_slice(index: Tensor) -> slice | None:
    """``index`` as a slice when it is a contiguous increasing range, else ``None``."""
    n = index.numel()
    if n == 0:
        return slice(0, 0)
    start = int(index[0])
    if torch.equal(index, torch.arange(start, start + n)):
        return slice(start, start + n)
    return None


def _device_index(index: Tensor | None, device: torch.device) -> Tensor | slice | None:
    """``index`` as a slice when contiguous (a view instead of a gather), else on ``device``."""
    if index is None:
        return None
    as_slice = _as_slice(index)
    return as_slice if as_slice is not None else index.to(device)


@dataclass(frozen=True)
class _Segment:
    """Consecutive rows of a merged group: ``paths`` paths of ``rows`` output components
    each, all weighted (``weight_index``: ``(paths * m,)`` flat weight positions) or all
    unweighted (``None``)."""

    row_start: int
    paths: int
    rows: int
    weight_index: Tensor | None

    @property
    def row_stop(self) -> int:
        return self.row_start + self.paths * self.rows


@dataclass(frozen=True)
class _Group:
    """The paths whose first input has multiplicity ``mul``, merged into one product."""

    mul: int
    rows: int  # R: output components of all paths
    cols: int  # D1: first-input components of the group
    x1_index: Tensor  # (cols * mul,) flat x1 positions, ordered (component, channel)
    out_index: Tensor  # (rows * mul,) flat output positions, ordered (row, channel)
    coefficients: Tensor  # G: (irreps_in2.dim, rows * cols), float64
    segments: tuple[_Segment, ...]


def _merged_groups(descriptor: TPDescriptor) -> tuple[_Group, ...] | None:
    """The merged plan, or ``None`` when the descriptor does not qualify."""
    d = descriptor
    if not d.paths:
        return None
    for path in d.paths:
        if path.mode is not PathMode.uvu or d.irreps_in2[path.in2].mul != 1:
            return None
    by_mul: dict[int, list[int]] = {}
    for index, path in enumerate(d.paths):
        by_mul.setdefault(d.irreps_in1[path.in1].mul, []).append(index)
    groups = []
    for mul, members in by_mul.items():
        # Paths in output-block order, so that rows land in output order when possible.
        members = sorted(members, key=lambda p: (d.paths[p].out, p))
        blocks1 = sorted({d.paths[p].in1 for p in members})
        col_start, cols = {}, 0
        for block in blocks1:
            col_start[block] = cols
            cols += d.irreps_in1[block].ir.dim
        rows = sum(d.irreps_out[d.paths[p].out].ir.dim for p in members)
        coefficients = torch.zeros(d.irreps_in2.dim, rows, cols, dtype=torch.float64)
        out_index, row = [], 0
        for p in members:
            path = d.paths[p]
            ir1 = d.irreps_in1[path.in1].ir
            ir2 = d.irreps_in2[path.in2].ir
            ir_out = d.irreps_out[path.out].ir
            cg = _wigner_3j(ir1.l, ir2.l, ir_out.l)  # (i, j, k)
            j0 = d.irreps_in2.slices()[path.in2].start
            c0 = col_start[path.in1]
            block = path.path_weight * cg.permute(1, 2, 0)  # (j, k, i)
            coefficients[j0 : j0 + ir2.dim, row : row + ir_out.dim, c0 : c0 + ir1.dim] += block
            out_index.append(_block_positions(d.irreps_out, d.layout, path.out))
            row += ir_out.dim
        x1_index = torch.cat([_block_positions(d.irreps_in1, d.layout, b) for b in blocks1])
        groups.append(
            _Group(
                mul=mul,
                rows=rows,
                cols=cols,
                x1_index=x1_index.reshape(-1),
                out_index=torch.cat(out_index).reshape(-1),
                coefficients=coefficients.reshape(d.irreps_in2.dim, rows * cols),
                segments=_segments(d, members, mul),
            )
        )
    return tuple(groups)


def _segments(d: TPDescriptor, members: list[int], mul: int) -> tuple[_Segment, ...]:
    """Runs of consecutive paths (rows in ``members`` order) with the same number of output
    components and the same ``weighted`` flag."""

    def key(p: int) -> tuple[int, bool]:
        return d.irreps_out[d.paths[p].out].ir.dim, d.paths[p].weighted

    segments, row = [], 0
    for (rows, weighted), run in itertools.groupby(members, key=key):
        run = list(run)
        weight_index = None
        if weighted:
            weight_index = torch.cat([torch.arange(mul) + d.weight_slices[p].start for p in run])
        segments.append(_Segment(row, len(run), rows, weight_index))
        row += len(run) * rows
    return tuple(segments)


@dataclass(frozen=True)
class _GroupTensors:
    """A group's tables on one device in one dtype; indices as slices when contiguous."""

    coefficients: Tensor  # G: (dim2, rows * cols)
    x1_index: Tensor | slice
    out_index: Tensor | slice
    weight_index: tuple[Tensor | slice | None, ...]  # one per segment


@dataclass
class TPPlan:
    """How the ``torch`` backend evaluates the slots of one descriptor.

    Built once per descriptor by :func:`plan_for` (cached). ``groups`` is the merged plan
    (``None``: the general per-path plan is used).
    """

    descriptor: TPDescriptor
    groups: tuple[_Group, ...] | None
    _tensors: dict[tuple[torch.dtype, torch.device], object] = field(default_factory=dict)

    # -- shapes -------------------------------------------------------------------------

    def slot_dim(self, slot: int) -> int:
        """Last dimension of a slot's tensor (the flat weight length for ``SLOT_W``)."""
        d = self.descriptor
        return (d.irreps_in1.dim, d.irreps_in2.dim, d.weight_numel, d.irreps_out.dim)[slot]

    def chunk_size(self, device: torch.device) -> int:
        """Samples per chunk so that the largest per-chunk intermediate is about
        :data:`CHUNK_ELEMENTS` on a CPU, :data:`DEVICE_CHUNK_ELEMENTS` elsewhere."""
        d = self.descriptor
        width = max(d.irreps_in1.dim, d.irreps_out.dim, d.weight_numel, 1)
        if self.groups is not None:
            for g in self.groups:
                width = max(width, g.rows * max(g.cols, g.mul))
        else:
            for path, shape in zip(d.paths, d.path_shapes, strict=True):
                k = d.irreps_out[path.out].ir.dim
                width = max(width, math.prod(shape) * k)
        target = CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
        return max(1, target // width)

    # -- cached tables ------------------------------------------------------------------

    def _group_tensors(self, dtype: torch.dtype, device: torch.device) -> list[_GroupTensors]:
        key = (dtype, device)
        cached = self._tensors.get(key)
        if cached is None:
            cached = [
                _GroupTensors(
                    coefficients=g.coefficients.to(dtype=dtype, device=device),
                    x1_index=_device_index(g.x1_index, device),
                    out_index=_device_index(g.out_index, device),
                    weight_index=tuple(_device_index(s.weight_index, device) for s in g.segments),
                )
                for g in self.groups or ()
            ]
            self._tensors[key] = cached
        return cached

    def _cg(self, path_index: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device, path_index)
        cached = self._tensors.get(key)
        if cached is None:
            d, path = self.descriptor, self.descriptor.paths[path_index]
            l1 = d.irreps_in1[path.in1].ir.l
            l2 = d.irreps_in2[path.in2].ir.l
            l_out = d.irreps_out[path.out].ir.l
            cached = (path.path_weight * _wigner_3j(l1, l2, l_out)).to(dtype=dtype, device=device)
            self._tensors[key] = cached
        return cached

    # -- evaluation ---------------------------------------------------------------------

    def slot(
        self,
        target: int,
        x1: Tensor | None,
        x2: Tensor | None,
        w: Tensor | None,
        g: Tensor | None,
        per_sample: bool,
        weighted_only: bool = False,
        out: Tensor | None = None,
        scratch: Scratch | None = None,
    ) -> Tensor:
        """The ``target`` slot on one chunk of flat samples.

        Args:
            target: ``SLOT_X1``, ``SLOT_X2``, ``SLOT_W`` or ``SLOT_OUT``.
            x1: ``(B, irreps_in1.dim)`` unless it is the target.
            x2: ``(B, irreps_in2.dim)`` unless it is the target.
            w: weights ``(B, numel)`` per sample or ``(numel,)`` shared; ``None`` when it
                is the target or the descriptor has no weights.
            g: ``(B, irreps_out.dim)`` (the output gradient) unless it is the target.
            per_sample: whether the weights are per sample.
            weighted_only: leave out unweighted paths. The form is affine, not linear, in
                the weights when some paths are unweighted, so a derivative taken through
                the weight slot (where ``w`` is a direction, not weights) must drop them.
            out: a contiguous ``(B, slot_dim)`` tensor to write the result into (the
                forward of a merged plan whose rows are the output writes it directly).
            scratch: buffers reused from chunk to chunk; the result may then live in one
                of them, valid until the next call with the same ``scratch``.

        Returns:
            ``(B, slot_dim)`` (``out`` when given); for ``SLOT_W`` with shared weights the
            sum over the chunk, ``(numel,)``.
        """
        anchor = next(t for t in (x1, x2, g) if t is not None)
        batch = anchor.shape[0]
        if target == SLOT_W and self.descriptor.weight_numel == 0:
            shape = (batch, 0) if per_sample else (0,)
            return anchor.new_zeros(shape)
        if out is not None and target == SLOT_OUT and self._writes_output_directly():
            group, tab = self.groups[0], self._group_tensors(anchor.dtype, anchor.device)[0]
            y = out.view(batch, group.rows, group.mul)
            x1g = _columns(x1, tab.x1_index, scratch, "x1_0").view(batch, group.cols, group.mul)
            torch.bmm(_merged_matrix(x2, tab, group, scratch, "m_0"), x1g, out=y)
            _scale_rows(y, y, w, group, tab, per_sample, weighted_only, batch)
            return out
        if self.groups is not None:
            result = self._merged_slots(
                (target,), x1, x2, w, g, per_sample, weighted_only, anchor, scratch
            )[0]
        else:
            result = self._general_slot(
                target, x1, x2, w, g, per_sample, weighted_only, batch, anchor
            )
        if out is None:
            return result
        return out.copy_(result)

    def _writes_output_directly(self) -> bool:
        """One merged group whose rows are the output in order (MACE/NequIP in ``ir_mul``)."""
        if self.groups is None or len(self.groups) != 1:
            return False
        where = _as_slice(self.groups[0].out_index)
        return where is not None and where == slice(0, self.descriptor.irreps_out.dim)

    def gradients(
        self,
        targets: tuple[int, ...],
        x1: Tensor,
        x2: Tensor,
        w: Tensor | None,
        g: Tensor,
        per_sample: bool,
        weighted_only: bool = False,
        scratch: Scratch | None = None,
    ) -> list[Tensor]:
        """Several input slots (``SLOT_X1``, ``SLOT_X2``, ``SLOT_W``) on one chunk at once:
        the first-order backward. The merged plan shares the gathered output gradient,
        the weighted rows and ``M`` between them. Arguments as in :meth:`slot`."""
        if self.groups is None or self.descriptor.weight_numel == 0:
            full = [x1, x2, w, g]
            results = []
            for target in targets:
                args = list(full)
                args[target] = None
                results.append(self.slot(target, *args, per_sample, weighted_only))
            return results
        return self._merged_slots(targets, x1, x2, w, g, per_sample, weighted_only, x1, scratch)

    def second_order(
        self,
        targets: tuple[int, ...],
        x1: Tensor,
        x2: Tensor,
        w: Tensor | None,
        g: Tensor,
        dx1: Tensor | None,
        dx2: Tensor | None,
        dw: Tensor | None,
        per_sample: bool,
        weighted_only: bool = False,
        scratch: Scratch | None = None,
    ) -> list[Tensor]:
        """The derivative of the first-order backward (:meth:`gradients`) on one chunk.

        The backward's outputs are the ``x1``, ``x2`` and ``w`` slots; given incoming
        gradients ``dx1``, ``dx2``, ``dw`` for them (``None``: no gradient), the derivative
        in slot ``t`` is the sum, over the incoming ``d_s`` with ``s != t``, of slot ``t``
        evaluated with ``d_s`` in place of input ``s`` (unweighted paths dropped when
        ``s`` is the weight slot). The merged plan evaluates all of them in one pass,
        sharing the per-sample matrices ``M(x2)``, ``M(dx2)``, the scaled output gradients
        and the products (``M(x2) dx1 + M(dx2) x1`` feeds both the weight and the output
        slot); every other plan adds the slot evaluations.

        Args:
            targets: the slots wanted, any of ``SLOT_X1``, ``SLOT_X2``, ``SLOT_W``,
                ``SLOT_OUT``.
            x1: ``(B, irreps_in1.dim)``, as in :meth:`slot`.
            x2: ``(B, irreps_in2.dim)``.
            w: weights ``(B, numel)`` or ``(numel,)``; ``None`` without weights.
            g: ``(B, irreps_out.dim)``, the backward's output gradient.
            dx1: incoming gradient shaped like ``x1``, or ``None``.
            dx2: incoming gradient shaped like ``x2``, or ``None``.
            dw: incoming gradient shaped like ``w``, or ``None``.
            per_sample: whether the weights are per sample.
            weighted_only: the backward's own ``weighted_only``.
            scratch: buffers reused from chunk to chunk, as in :meth:`slot`.

        Returns:
            One tensor per target, shaped as :meth:`slot` returns it.
        """
        if self.groups is not None:
            return self._merged_second_order(
                targets, x1, x2, w, g, dx1, dx2, dw, per_sample, weighted_only, scratch
            )
        incoming = {SLOT_X1: dx1, SLOT_X2: dx2, SLOT_W: dw}
        results = []
        for target in targets:
            total = None
            for source, d in incoming.items():
                if d is None or source == target:
                    continue
                args = [x1, x2, w, g]
                args[source] = d
                args[target] = None
                only = weighted_only or source == SLOT_W
                term = self.slot(target, *args, per_sample, only)
                total = term if total is None else total + term
            results.append(total if total is not None else self._zeros(target, x1, per_sample))
        return results

    def _zeros(self, target: int, anchor: Tensor, per_sample: bool) -> Tensor:
        batched = per_sample or target != SLOT_W
        dim = self.slot_dim(target)
        return anchor.new_zeros((anchor.shape[0], dim) if batched else (dim,))

    def _merged_second_order(
        self, targets, x1, x2, w, g, dx1, dx2, dw, per_sample, weighted_only, scratch
    ) -> list[Tensor]:
        batch = x1.shape[0]
        tables = self._group_tensors(x1.dtype, x1.device)
        pieces = {t: [] for t in targets}
        positions = {t: [] for t in targets}
        for index, (group, tab) in enumerate(zip(self.groups, tables, strict=True)):
            m, rows = group.mul, (batch, group.rows, group.mul)

            def buffer(name: str, shape: tuple[int, ...], index: int = index) -> Tensor:
                return _buffer(scratch, f"{name}_{index}", shape, x1)

            def scaled(name: str, source: Tensor, scale: Tensor | None, only: bool) -> Tensor:
                result = buffer(name, source.shape)
                _scale_rows(result, source, scale, group, tab, per_sample, only, batch)  # noqa: B023
                return result

            shape1 = (batch, group.cols, m)
            x1g = _columns(x1, tab.x1_index, scratch, f"x1_{index}").view(shape1)
            dx1g = None
            if dx1 is not None:
                dx1g = _columns(dx1, tab.x1_index, scratch, f"dx1_{index}").view(shape1)
            m_x2 = _merged_matrix(x2, tab, group, scratch, f"m_{index}")
            m_dx2 = None
            if dx2 is not None:
                m_dx2 = _merged_matrix(dx2, tab, group, scratch, f"dm_{index}")
            grad_rows = _columns(g, tab.out_index, scratch, f"g_{index}").view(rows)
            # the output gradient scaled by the weights and by their incoming gradient
            g_w = g_dw = None
            if SLOT_X1 in targets or SLOT_X2 in targets:
                g_w = scaled("g_w", grad_rows, w, weighted_only)
                g_dw = None if dw is None else scaled("g_dw", grad_rows, dw, True)
            # M(x2) dx1 + M(dx2) x1: the weight slot and (scaled by w) the output slot
            mixed = None
            if SLOT_W in targets or SLOT_OUT in targets:
                mixed = _bmm_sum(((m_x2, dx1g), (m_dx2, x1g)), buffer("mixed", rows))
            for target in targets:
                if target == SLOT_X1:
                    pairs = ((_transposed(m_dx2), g_w), (_transposed(m_x2), g_dw))
                    piece = _bmm_sum(pairs, buffer("out_x1", shape1))
                    pieces[target].append(_flat_or_zeros(piece, batch, group.cols * m, x1))
                    positions[target].append(tab.x1_index)
                elif target == SLOT_X2:
                    pairs = ((g_w, _transposed(dx1g)), (g_dw, _transposed(x1g)))
                    outer = _bmm_sum(pairs, buffer("outer", (batch, group.rows, group.cols)))
                    if outer is None:
                        pieces[target].append(x1.new_zeros((batch, self.slot_dim(SLOT_X2))))
                    else:
                        pieces[target].append(outer.view(batch, -1) @ tab.coefficients.T)
                elif target == SLOT_W:
                    if mixed is not None:
                        product = torch.mul(mixed, grad_rows, out=buffer("product", rows))
                        _weight_sums(product, group, tab, per_sample, pieces, positions, target)
                else:  # SLOT_OUT
                    total = None
                    if mixed is not None:
                        total = scaled("out", mixed, w, weighted_only)
                    if dw is not None:
                        forward = torch.bmm(m_x2, x1g, out=buffer("forward", rows))
                        _scale_rows(forward, forward, dw, group, tab, per_sample, True, batch)
                        total = forward if total is None else total.add_(forward)
                    pieces[target].append(_flat_or_zeros(total, batch, group.rows * m, x1))
                    positions[target].append(tab.out_index)
        return self._assemble(targets, pieces, positions, per_sample, x1)

    def _assemble(self, targets, pieces, positions, per_sample, anchor) -> list[Tensor]:
        """Each target's result from its per-group pieces (the ``x2`` slot: their sum)."""
        results = []
        for target in targets:
            if not pieces[target]:
                results.append(self._zeros(target, anchor, per_sample))
            elif target == SLOT_X2:
                total = pieces[target][0]
                for piece in pieces[target][1:]:
                    total = total + piece
                results.append(total)
            else:
                batched = per_sample or target != SLOT_W
                results.append(
                    _place(pieces[target], positions[target], self.slot_dim(target), batched)
                )
        return results

    def _merged_slots(
        self, targets, x1, x2, w, g, per_sample, weighted_only, anchor, scratch
    ) -> list[Tensor]:
        batch = anchor.shape[0]
        tables = self._group_tensors(anchor.dtype, anchor.device)
        pieces = {t: [] for t in targets}
        positions = {t: [] for t in targets}
        for index, (group, tab) in enumerate(zip(self.groups, tables, strict=True)):
            m, rows = group.mul, (batch, group.rows, group.mul)

            def buffer(name: str, shape: tuple[int, ...], index: int = index) -> Tensor:
                return _buffer(scratch, f"{name}_{index}", shape, anchor)

            # M[b] = (x2[b] @ G): every path's CG block contracted with x2, (B, R, D1).
            merged = None
            if x2 is not None:
                merged = _merged_matrix(x2, tab, group, scratch, f"m_{index}")
            x1g = None
            if x1 is not None:
                x1g = _columns(x1, tab.x1_index, scratch, f"x1_{index}").view(batch, group.cols, m)
            grad_rows = scaled = None
            if g is not None:
                grad_rows = _columns(g, tab.out_index, scratch, f"g_{index}").view(rows)
            if SLOT_X1 in targets or SLOT_X2 in targets:
                scaled = buffer("g_w", rows)
                _scale_rows(scaled, grad_rows, w, group, tab, per_sample, weighted_only, batch)
            for target in targets:
                if target == SLOT_OUT:
                    y = torch.bmm(merged, x1g, out=buffer("out", rows))
                    _scale_rows(y, y, w, group, tab, per_sample, weighted_only, batch)
                    pieces[target].append(y.view(batch, -1))
                    positions[target].append(tab.out_index)
                elif target == SLOT_X1:
                    shape1 = (batch, group.cols, m)
                    grad = torch.bmm(merged.transpose(1, 2), scaled, out=buffer("out_x1", shape1))
                    pieces[target].append(grad.view(batch, -1))
                    positions[target].append(tab.x1_index)
                elif target == SLOT_X2:
                    shape = (batch, group.rows, group.cols)
                    outer = torch.bmm(scaled, x1g.transpose(1, 2), out=buffer("outer", shape))
                    pieces[target].append(outer.view(batch, -1) @ tab.coefficients.T)
                else:  # SLOT_W
                    product = torch.bmm(merged, x1g, out=buffer("product", rows)).mul_(grad_rows)
                    _weight_sums(product, group, tab, per_sample, pieces, positions, target)
        return self._assemble(targets, pieces, positions, per_sample, anchor)

    def _general_slot(
        self, target, x1, x2, w, g, per_sample, weighted_only, batch, anchor
    ) -> Tensor:
        d = self.descriptor
        dtype, device = anchor.dtype, anchor.device
        blocks = [
            None if x1 is None else split_blocks(x1, d.irreps_in1, d.layout),
            None if x2 is None else split_blocks(x2, d.irreps_in2, d.layout),
            None,
            None if g is None else split_blocks(g, d.irreps_out, d.layout),
        ]
        irreps = (d.irreps_in1, d.irreps_in2, None, d.irreps_out)
        results: list[Tensor | None] = (
            [None] * len(d.paths) if target == SLOT_W else [None] * len(irreps[target])
        )
        for index, (path, shape, where) in enumerate(
            zip(d.paths, d.path_shapes, d.weight_slices, strict=True)
        ):
            if where is None and (target == SLOT_W or weighted_only):
                continue
            spec1, spec2, spec_w, spec_out = _EINSUM_SPECS[path.mode]
            operands = {
                SLOT_X1: ("z" + spec1, _block(blocks[0], path.in1)),
                SLOT_X2: ("z" + spec2, _block(blocks[1], path.in2)),
                SLOT_OUT: ("z" + spec_out, _block(blocks[3], path.out)),
            }
            if where is not None:
                operands[SLOT_W] = (
                    ("z" if per_sample else "") + spec_w,
                    None if w is None else w[..., where].reshape(*w.shape[:-1], *shape),
                )
            target_spec, _ = operands.pop(target)
            specs = ["ijk", *(s for s, _ in operands.values())]
            tensors = [self._cg(index, dtype, device), *(t for _, t in operands.values())]
            term = _einsum_broadcast(specs, tensors, target_spec, {"v": d.irreps_in2[path.in2].mul})
            slot_index = index if target == SLOT_W else (path.in1, path.in2, None, path.out)[target]
            previous = results[slot_index]
            results[slot_index] = term if previous is None else previous + term
        if target == SLOT_W:
            lead = (batch,) if per_sample else ()
            flat = [t.reshape(*lead, -1) for t in results if t is not None]
            return torch.cat(flat, dim=-1)
        out_blocks = [
            anchor.new_zeros((batch, mul, ir.dim)) if block is None else block
            for (mul, ir), block in zip(irreps[target], results, strict=True)
        ]
        return join_blocks(out_blocks, d.layout, like=anchor.new_zeros((batch, 0)))


#: Einsum index strings ``(x1, x2, weight, out)`` of one path per mode; ``i, j, k`` are the
#: irrep components (CG ``ijk``), ``u, v, w`` the channels, ``z`` the batch.
_EINSUM_SPECS = {
    PathMode.uvw: ("ui", "vj", "uvw", "wk"),
    PathMode.uvu: ("ui", "vj", "uv", "uk"),
    PathMode.uuu: ("ui", "uj", "u", "uk"),
}


def _einsum_broadcast(
    specs: list[str], tensors: list[Tensor], target_spec: str, sizes: dict[str, int]
) -> Tensor:
    """``einsum(specs -> target_spec)`` where target indices absent from every operand (the
    ``v`` of an unweighted ``uvu`` path, whose implicit weight is 1) are broadcast."""
    present = set("".join(specs))
    reduced = "".join(c for c in target_spec if c in present)
    term = torch.einsum(f"{','.join(specs)}->{reduced}", *tensors)
    for position, c in enumerate(target_spec):
        if c not in present:
            term = term.unsqueeze(position)
    shape = [sizes[c] if c not in present else -1 for c in target_spec]
    return term.expand(shape)


def _block(blocks: list[Tensor] | None, index: int) -> Tensor | None:
    return None if blocks is None else blocks[index]


def _scale_rows(
    dest: Tensor,
    source: Tensor,
    w: Tensor | None,
    group: _Group,
    tab: _GroupTensors,
    per_sample: bool,
    weighted_only: bool,
    batch: int,
) -> None:
    """``dest = source * w`` with each path's weights broadcast over its output rows.

    ``dest`` and ``source`` are ``(B, R, m)`` and may be the same tensor. Rows of
    unweighted paths are copied (weight 1), or zeroed with ``weighted_only``.
    """
    m = group.mul
    for segment, where in zip(group.segments, tab.weight_index, strict=True):
        rows = slice(segment.row_start, segment.row_stop)
        shape = (batch, segment.paths, segment.rows, m)
        out = dest[:, rows].view(shape)
        src = source[:, rows].reshape(shape)
        if where is None:
            if weighted_only:
                out.zero_()
            elif dest is not source:
                out.copy_(src)
            continue
        scale = w[..., where]
        scale = (
            scale.reshape(batch, segment.paths, 1, m)
            if per_sample
            else scale.view(segment.paths, 1, m)
        )
        torch.mul(src, scale, out=out)


def _bmm_sum(pairs: tuple[tuple[Tensor | None, Tensor | None], ...], out: Tensor) -> Tensor | None:
    """``sum(a @ b)`` over the pairs whose factors are both given, accumulated in ``out``
    (``bmm`` then in-place ``baddbmm_``); ``None`` when no pair is."""
    total = None
    for a, b in pairs:
        if a is None or b is None:
            continue
        total = torch.bmm(a, b, out=out) if total is None else total.baddbmm_(a, b)
    return total


def _transposed(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.transpose(1, 2)


def _flat_or_zeros(t: Tensor | None, batch: int, width: int, like: Tensor) -> Tensor:
    return like.new_zeros((batch, width)) if t is None else t.reshape(batch, width)


class Scratch:
    """Named buffers that the chunks of one pass reuse.

    A fresh multi-megabyte tensor per chunk costs more than the arithmetic done in it:
    the allocator hands such blocks back to the system when they are freed, so every
    chunk page-faults its intermediates anew (measured: the second-order pass of the
    MACE problem 2.5x slower). One ``Scratch`` per op call keeps them: the first chunk
    allocates, the others (and the smaller last one) write into the same memory. A
    buffer is valid until it is asked for again by name.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A ``like``-typed tensor of ``shape`` (uninitialised) kept under ``name``."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            buffer = like.new_empty((numel,))
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)


def _buffer(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return like.new_empty(shape) if scratch is None else scratch(name, shape, like)


def _columns(t: Tensor, index: Tensor | slice, scratch: Scratch | None, name: str) -> Tensor:
    """``t[:, index]``: a view for a slice, else gathered (into ``scratch`` when given)."""
    if isinstance(index, slice):
        return t[:, index]
    return torch.index_select(t, 1, index, out=_buffer(scratch, name, (t.shape[0], len(index)), t))


def _merged_matrix(
    x2: Tensor, tab: _GroupTensors, group: _Group, scratch: Scratch | None, name: str
) -> Tensor:
    """``M[b] = x2[b] @ G``: every path's CG block contracted with ``x2``, ``(B, R, D1)``."""
    shape = (x2.shape[0], group.rows * group.cols)
    merged = torch.mm(x2, tab.coefficients, out=_buffer(scratch, name, shape, x2))
    return merged.view(x2.shape[0], group.rows, group.cols)


def _weight_sums(
    product: Tensor,
    group: _Group,
    tab: _GroupTensors,
    per_sample: bool,
    pieces: dict[int, list[Tensor]],
    positions: dict[int, list],
    target: int,
) -> None:
    """The weight slot from ``product = (M x1) * g``, ``(B, R, m)``: each weighted path's
    rows summed, appended to ``pieces[target]`` with their flat weight positions."""
    batch, m = product.shape[0], group.mul
    for segment, where in zip(group.segments, tab.weight_index, strict=True):
        if where is None:
            continue
        rows = product[:, segment.row_start : segment.row_stop]
        summed = rows.reshape(batch, segment.paths, segment.rows, m).sum(2).reshape(batch, -1)
        pieces[target].append(summed if per_sample else summed.sum(0))
        positions[target].append(where)


def _place(pieces: list[Tensor], positions: list, dim: int, batched: bool) -> Tensor:
    """Scatter flat pieces to their positions in a ``(B, dim)`` (or ``(dim,)``) result.

    Positions never collide except for outputs that several paths share, which are summed.
    Contiguous pieces that tile the result in order are concatenated instead.
    """
    if all(isinstance(p, slice) for p in positions):
        starts = [p.start for p in positions]
        stops = [p.stop for p in positions]
        if starts[0] == 0 and stops[-1] == dim and starts[1:] == stops[:-1]:
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    anchor = pieces[0]
    lead = anchor.shape[:-1] if batched else ()
    result = anchor.new_zeros((*lead, dim))
    for piece, where in zip(pieces, positions, strict=True):
        if isinstance(where, slice):
            result[..., where] += piece
        else:
            result.index_add_(result.dim() - 1, where, piece)
    return result


@functools.lru_cache(maxsize=256)
def _plan_cached(descriptor: TPDescriptor) -> TPPlan:
    return TPPlan(descriptor, _merged_groups(descriptor))


def plan_for(descriptor: TPDescriptor) -> TPPlan:
    """The (cached) plan of ``descriptor``."""
    return _plan_cached(descriptor)
