"""The tensor-product descriptor: frozen plain data that every kernel backend executes.

A tensor product of ``x1`` (irreps ``irreps_in1``) and ``x2`` (irreps ``irreps_in2``) is a
sum of *paths*. Path ``p`` couples block ``in1`` of ``x1`` (``mul1 x ir1``) with block
``in2`` of ``x2`` (``mul2 x ir2``) through the Clebsch-Gordan (Wigner 3j) coefficients
``C[i, j, k]`` of ``ir1 x ir2 -> ir_out`` and adds into block ``out`` of the output:

* ``uvw`` (fully connected): ``z[w, k] += c * sum_{u,v,i,j} W[u, v, w] C[i, j, k]
  x1[u, i] x2[v, j]``;
* ``uvu`` (channelwise, NequIP/MACE): ``z[u, k] += c * sum_{v,i,j} W[u, v] C[i, j, k]
  x1[u, i] x2[v, j]`` (without weights, ``W = 1``);
* ``uuu`` (elementwise): ``z[u, k] += c * sum_{i,j} W[u] C[i, j, k] x1[u, i] x2[u, j]``
  (without weights, ``W = 1``);

with ``c = path.path_weight``, the final coefficient (normalizations included). The
weights ``W`` of all weighted paths live in one flat vector in path order, each path's
block reshaped to its :attr:`TPDescriptor.path_shapes` entry: the order and shapes of
``e3nn.o3.TensorProduct``, so the same weights give the same result.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

from e3nn import o3

from torsion.reps._normalization import path_coefficients

__all__ = ["LAYOUTS", "Layout", "Path", "PathMode", "TPDescriptor"]

Layout = Literal["mul_ir", "ir_mul"]
LAYOUTS: tuple[str, ...] = ("mul_ir", "ir_mul")


class PathMode(enum.Enum):
    """How a path treats the channels: ``u`` of x1, ``v`` of x2, ``w`` of the output.

    Attributes:
        uvw: fully connected; weights ``(mul1, mul2, mul_out)``, any multiplicities.
        uvu: channelwise; weights ``(mul1, mul2)``, needs ``mul_out == mul1``.
        uuu: elementwise; weights ``(mul1,)``, needs ``mul1 == mul2 == mul_out``.
    """

    uvw = "uvw"
    uvu = "uvu"
    uuu = "uuu"


def _check_index(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"Path.{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"Path.{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"Path.{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Path:
    """One path of a tensor product: ``x1[in1] (x) x2[in2] -> out``.

    Args:
        in1: index of the block of ``irreps_in1`` (an entry of the ``Irreps``, not an irrep
            count).
        in2: index of the block of ``irreps_in2``.
        out: index of the block of ``irreps_out``.
        mode: a :class:`PathMode` or its name (``"uvw"``, ``"uvu"``, ``"uuu"``).
        weighted: whether the path has learnable weights (``uvw`` paths must).
        path_weight: the final constant coefficient of the path, normalizations included
            (e3nn's ``Instruction.path_weight`` after construction). Default ``1.0``.

    Raises:
        TypeError: for non-integer indices or a non-bool ``weighted``.
        ValueError: for negative indices, an unknown mode or a non-finite ``path_weight``.
    """

    in1: int
    in2: int
    out: int
    mode: PathMode
    weighted: bool = True
    path_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("in1", "in2", "out"):
            object.__setattr__(self, name, _check_index(getattr(self, name), name))
        if not isinstance(self.mode, PathMode):
            try:
                object.__setattr__(self, "mode", PathMode(self.mode))
            except ValueError:
                modes = [m.value for m in PathMode]
                raise ValueError(f"Path.mode must be one of {modes}, got {self.mode!r}") from None
        if not isinstance(self.weighted, bool):
            raise TypeError(f"Path.weighted must be a bool, got {type(self.weighted).__name__}")
        weight = float(self.path_weight)
        if not math.isfinite(weight):
            raise ValueError(f"Path.path_weight must be finite, got {self.path_weight}")
        object.__setattr__(self, "path_weight", weight)


def _as_irreps(value: Any, name: str) -> o3.Irreps:
    try:
        return o3.Irreps(value)
    except (ValueError, TypeError, AssertionError) as error:
        raise ValueError(f"{name} is not a valid e3nn Irreps: {value!r} ({error})") from None


def _path_problem(
    path: Path, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps
) -> str | None:
    """Why ``path`` is invalid for these irreps, or ``None`` when it is valid."""
    for name, index, irreps_name, irreps in (
        ("in1", path.in1, "irreps_in1", irreps_in1),
        ("in2", path.in2, "irreps_in2", irreps_in2),
        ("out", path.out, "irreps_out", irreps_out),
    ):
        if index >= len(irreps):
            return (
                f"{name}={index} is out of range for {irreps_name} '{irreps}' "
                f"({len(irreps)} blocks)"
            )
    (mul1, ir1), (mul2, ir2), (mul_out, ir_out) = (
        irreps_in1[path.in1],
        irreps_in2[path.in2],
        irreps_out[path.out],
    )
    if ir1.p * ir2.p != ir_out.p:
        return (
            f"parity: {ir1} x {ir2} has parity {ir1.p * ir2.p:+d}, "
            f"but the output {ir_out} has {ir_out.p:+d}"
        )
    if not abs(ir1.l - ir2.l) <= ir_out.l <= ir1.l + ir2.l:
        return (
            f"selection rule: {ir1} x {ir2} gives l in [{abs(ir1.l - ir2.l)}, {ir1.l + ir2.l}], "
            f"not the output's l={ir_out.l}"
        )
    if path.mode is PathMode.uvw and not path.weighted:
        return "mode uvw needs weighted=True (an unweighted fully connected path is undefined)"
    if path.mode is PathMode.uvu and mul1 != mul_out:
        return f"mode uvu needs mul(in1) == mul(out), got {mul1} and {mul_out}"
    if path.mode is PathMode.uuu and not mul1 == mul2 == mul_out:
        return f"mode uuu needs mul(in1) == mul(in2) == mul(out), got {mul1}, {mul2}, {mul_out}"
    return None


def _instruction_tuple(
    instruction: Sequence[Any], index: int
) -> tuple[int, int, int, str, bool, float]:
    if len(instruction) not in (5, 6):
        raise ValueError(
            f"instruction {index} must be (in1, in2, out, mode, weighted[, multiplier]), "
            f"got {instruction!r}"
        )
    in1, in2, out, mode, weighted, *rest = instruction
    mode = mode.value if isinstance(mode, PathMode) else mode
    return in1, in2, out, mode, weighted, float(rest[0]) if rest else 1.0


@dataclass(frozen=True)
class TPDescriptor:
    """A tensor product as frozen plain data: irreps, paths and the tensor layout.

    Kernel backends (:mod:`torsion.kernels`) execute it; layers hold it. It is hashable, so
    backends may key caches (Clebsch-Gordan tables, compiled kernels) on it. The module
    docstring gives the math of each :class:`PathMode`.

    Args:
        irreps_in1: irreps of the first input (anything ``e3nn.o3.Irreps`` accepts).
        irreps_in2: irreps of the second input.
        irreps_out: irreps of the output. Blocks reached by no path are zero.
        paths: the paths, in weight order (a sequence of :class:`Path`; stored as a tuple).
        layout: how each block ``mul x ir`` of the inputs and the output is laid out in the
            last dimension: ``"mul_ir"`` (e3nn's; multiplicity-major, ``x[..., u * d + i]``)
            or ``"ir_mul"`` (channels contiguous, ``x[..., i * mul + u]``). The weights do not
            depend on the layout. Default ``"mul_ir"``.

    Raises:
        ValueError: for invalid irreps, an unknown layout, or a path whose indices are out of
            range, that breaks the parity or ``|l1 - l2| <= l <= l1 + l2`` selection rule, or
            whose mode does not fit the multiplicities (the message names the path).
        TypeError: when ``paths`` holds something that is not a :class:`Path`.

    Shapes:
        ``x1``: ``(..., irreps_in1.dim)``; ``x2``: ``(..., irreps_in2.dim)``; weights:
        ``(weight_numel,)`` shared or ``(..., weight_numel)`` per sample; output:
        ``(..., irreps_out.dim)``.

    Example:
        >>> d = TPDescriptor.channelwise("8x0e + 8x1o", "0e + 1o", filter_irreps_out="0e + 1o")
        >>> len(d.paths), d.weight_numel, d.irreps_out
        (4, 32, 8x0e+8x0e+8x1o+8x1o)
    """

    irreps_in1: o3.Irreps
    irreps_in2: o3.Irreps
    irreps_out: o3.Irreps
    paths: tuple[Path, ...] = ()
    layout: Layout = "mul_ir"

    def __post_init__(self) -> None:
        for name in ("irreps_in1", "irreps_in2", "irreps_out"):
            object.__setattr__(self, name, _as_irreps(getattr(self, name), name))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if isinstance(self.paths, Path) or not isinstance(self.paths, Iterable):
            raise TypeError(f"paths must be a sequence of Path, got {type(self.paths).__name__}")
        paths = tuple(self.paths)
        for index, path in enumerate(paths):
            if not isinstance(path, Path):
                raise TypeError(f"paths[{index}] must be a Path, got {type(path).__name__}")
            problem = _path_problem(path, self.irreps_in1, self.irreps_in2, self.irreps_out)
            if problem is not None:
                raise ValueError(f"invalid path {index} ({self._path_label(path)}): {problem}")
        object.__setattr__(self, "paths", paths)

    @staticmethod
    def _path_label(path: Path) -> str:
        return f"{path.in1}, {path.in2} -> {path.out}, {path.mode.value}"

    # -- builders -------------------------------------------------------------------------

    @classmethod
    def from_instructions(
        cls,
        irreps_in1: Any,
        irreps_in2: Any,
        irreps_out: Any,
        instructions: Sequence[Sequence[Any]],
        *,
        irrep_normalization: str = "component",
        path_normalization: str = "element",
        layout: Layout = "mul_ir",
    ) -> TPDescriptor:
        """Build from e3nn-style instructions, normalized as ``e3nn.o3.TensorProduct`` does.

        Args:
            irreps_in1: irreps of the first input.
            irreps_in2: irreps of the second input.
            irreps_out: irreps of the output.
            instructions: ``(in1, in2, out, mode, weighted)`` or ``(in1, in2, out, mode,
                weighted, multiplier)`` tuples, exactly as e3nn takes them: ``multiplier``
                (e3nn's instruction ``path_weight``, default ``1.0``) scales ``alpha`` before
                the square root.
            irrep_normalization: ``"component"`` (default), ``"norm"`` or ``"none"``.
            path_normalization: ``"element"`` (default), ``"path"`` or ``"none"``.
            layout: ``"mul_ir"`` (default) or ``"ir_mul"``.

        Returns:
            The descriptor whose paths carry e3nn's final coefficients.

        Raises:
            ValueError: for malformed instructions, unknown normalizations or modes, negative
                multipliers, and the path errors listed in :class:`TPDescriptor`.
        """
        irreps_in1 = _as_irreps(irreps_in1, "irreps_in1")
        irreps_in2 = _as_irreps(irreps_in2, "irreps_in2")
        irreps_out = _as_irreps(irreps_out, "irreps_out")
        parsed = [_instruction_tuple(ins, index) for index, ins in enumerate(instructions)]
        # Build unnormalized paths first: they validate indices, modes and selection rules
        # before the normalization indexes into the irreps.
        raw = cls(
            irreps_in1,
            irreps_in2,
            irreps_out,
            tuple(Path(a, b, c, mode, weighted) for a, b, c, mode, weighted, _ in parsed),
            layout,
        )
        coefficients = path_coefficients(
            irreps_in1,
            irreps_in2,
            irreps_out,
            [
                (p.in1, p.in2, p.out, p.mode.value, ins[5])
                for p, ins in zip(raw.paths, parsed, strict=True)
            ],
            irrep_normalization,
            path_normalization,
        )
        paths = tuple(
            replace(path, path_weight=c) for path, c in zip(raw.paths, coefficients, strict=True)
        )
        return replace(raw, paths=paths)

    @classmethod
    def channelwise(
        cls,
        irreps_in1: Any,
        irreps_in2: Any,
        filter_irreps_out: Any = None,
        *,
        weighted: bool = True,
        irrep_normalization: str = "component",
        path_normalization: str = "element",
        layout: Layout = "mul_ir",
    ) -> TPDescriptor:
        """The channelwise (``uvu``) tensor product of NequIP and MACE.

        Every pair of blocks ``(i1, i2)`` and every irrep ``ir`` in ``ir1 x ir2`` (kept only
        if it is in ``filter_irreps_out``) gets its own output block ``mul1 x ir`` and a
        ``uvu`` path. The output blocks are then sorted by irrep (``Irreps.sort``, stable,
        not simplified) and the paths ordered by output block: this is MACE's
        ``tp_out_irreps_with_instructions``, so the irreps and the weight layout are MACE's
        ``irreps_mid`` and instructions.

        Args:
            irreps_in1: irreps of the node features.
            irreps_in2: irreps of the edge attributes (spherical harmonics); their
                multiplicities enter through the ``uvu`` weights ``(mul1, mul2)``.
            filter_irreps_out: keep only output irreps that appear here (multiplicities are
                ignored); ``None`` keeps all.
            weighted: whether the paths have weights (``True``, the usual per-edge weights).
            irrep_normalization: see :meth:`from_instructions`.
            path_normalization: see :meth:`from_instructions`.
            layout: ``"mul_ir"`` (default) or ``"ir_mul"``.

        Returns:
            The channelwise descriptor.

        Example:
            >>> d = TPDescriptor.channelwise("128x0e+128x1o+128x2e", "0e+1o+2e", "0e+1o+2e")
            >>> len(d.paths), d.weight_numel, d.irreps_out.dim
            (11, 1408, 4480)
        """
        irreps_in1 = _as_irreps(irreps_in1, "irreps_in1")
        irreps_in2 = _as_irreps(irreps_in2, "irreps_in2")
        keep = None if filter_irreps_out is None else _as_irreps(filter_irreps_out, "filter")
        blocks: list[tuple[int, o3.Irrep]] = []
        instructions = []
        for i1, (mul1, ir1) in enumerate(irreps_in1):
            for i2, (_, ir2) in enumerate(irreps_in2):
                for ir_out in ir1 * ir2:
                    if keep is None or ir_out in keep:
                        instructions.append((i1, i2, len(blocks), "uvu", weighted))
                        blocks.append((mul1, ir_out))
        irreps_out, permutation, _ = o3.Irreps(blocks).sort()
        instructions = sorted(
            ((a, b, permutation[c], mode, w) for a, b, c, mode, w in instructions),
            key=lambda ins: ins[2],
        )
        return cls.from_instructions(
            irreps_in1,
            irreps_in2,
            irreps_out,
            instructions,
            irrep_normalization=irrep_normalization,
            path_normalization=path_normalization,
            layout=layout,
        )

    @classmethod
    def fully_connected(
        cls,
        irreps_in1: Any,
        irreps_in2: Any,
        irreps_out: Any,
        *,
        irrep_normalization: str = "component",
        path_normalization: str = "element",
        layout: Layout = "mul_ir",
    ) -> TPDescriptor:
        """The fully connected (``uvw``) tensor product of ``e3nn.o3.FullyConnectedTensorProduct``.

        One weighted ``uvw`` path for every ``(i1, i2, i_out)`` with ``ir_out`` in
        ``ir1 x ir2``, in e3nn's loop order, so weights are interchangeable with e3nn's.

        Args:
            irreps_in1: irreps of the first input.
            irreps_in2: irreps of the second input.
            irreps_out: irreps of the output (used as given, not simplified).
            irrep_normalization: see :meth:`from_instructions`.
            path_normalization: see :meth:`from_instructions`.
            layout: ``"mul_ir"`` (default) or ``"ir_mul"``.

        Returns:
            The fully connected descriptor.
        """
        irreps_in1 = _as_irreps(irreps_in1, "irreps_in1")
        irreps_in2 = _as_irreps(irreps_in2, "irreps_in2")
        irreps_out = _as_irreps(irreps_out, "irreps_out")
        instructions = [
            (i1, i2, i_out, "uvw", True)
            for i1, (_, ir1) in enumerate(irreps_in1)
            for i2, (_, ir2) in enumerate(irreps_in2)
            for i_out, (_, ir_out) in enumerate(irreps_out)
            if ir_out in ir1 * ir2
        ]
        return cls.from_instructions(
            irreps_in1,
            irreps_in2,
            irreps_out,
            instructions,
            irrep_normalization=irrep_normalization,
            path_normalization=path_normalization,
            layout=layout,
        )

    # -- e3nn interop ---------------------------------------------------------------------

    @classmethod
    def from_e3nn(cls, tp: o3.TensorProduct, *, layout: Layout = "mul_ir") -> TPDescriptor:
        """The descriptor of an ``e3nn.o3.TensorProduct`` (or any subclass).

        e3nn stores each instruction's final coefficient (normalizations, input/output
        variances and multipliers folded in), so the descriptor reproduces the module for any
        normalization it was built with. Weight order and shapes are e3nn's.

        Args:
            tp: the e3nn module.
            layout: layout of the descriptor's tensors (e3nn itself uses ``"mul_ir"``).

        Returns:
            The equivalent descriptor.

        Raises:
            TypeError: if ``tp`` is not an ``e3nn.o3.TensorProduct``.
            ValueError: for connection modes torsion does not execute (``uvv``, ``uuw``,
                ``uvuv``, ``uvu<v``, ``u<vw``).
        """
        if not isinstance(tp, o3.TensorProduct):
            raise TypeError(f"from_e3nn expects an e3nn.o3.TensorProduct, got {type(tp).__name__}")
        modes = {m.value for m in PathMode}
        paths = []
        for index, ins in enumerate(tp.instructions):
            if ins.connection_mode not in modes:
                raise ValueError(
                    f"instruction {index} of the e3nn module uses connection mode "
                    f"{ins.connection_mode!r}; torsion supports {sorted(modes)}"
                )
            paths.append(
                Path(
                    ins.i_in1,
                    ins.i_in2,
                    ins.i_out,
                    ins.connection_mode,
                    bool(ins.has_weight),
                    float(ins.path_weight),
                )
            )
        return cls(tp.irreps_in1, tp.irreps_in2, tp.irreps_out, tuple(paths), layout)

    def to_e3nn(self, **kwargs: Any) -> o3.TensorProduct:
        """Build the equivalent ``e3nn.o3.TensorProduct``.

        The module is built with ``irrep_normalization="none"``, ``path_normalization="none"``
        and each instruction's multiplier set to ``path_weight ** 2``, so that e3nn's
        coefficient ``sqrt(path_weight ** 2)`` is this descriptor's (exactly, in IEEE
        arithmetic). The e3nn module reads and writes ``"mul_ir"`` tensors whatever
        :attr:`layout` says. e3nn stores its Wigner 3j buffers in the default dtype at
        construction: build under ``torch.set_default_dtype(torch.float64)`` to compare in
        float64 (a float32-built module cast to float64 keeps float32-rounded coefficients).

        Args:
            **kwargs: passed on to ``e3nn.o3.TensorProduct`` (e.g. ``shared_weights``,
                ``internal_weights``).

        Returns:
            The e3nn module; given the same weights it computes what this descriptor does.

        Raises:
            ValueError: if a path weight is negative (e3nn cannot express it).
        """
        for index, path in enumerate(self.paths):
            if path.path_weight < 0:
                raise ValueError(
                    f"path {index} has a negative path_weight ({path.path_weight}); e3nn takes "
                    "the square root of its instruction weights and cannot express it"
                )
        return o3.TensorProduct(
            self.irreps_in1,
            self.irreps_in2,
            self.irreps_out,
            [(p.in1, p.in2, p.out, p.mode.value, p.weighted, p.path_weight**2) for p in self.paths],
            irrep_normalization="none",
            path_normalization="none",
            **kwargs,
        )

    # -- weights and layout ---------------------------------------------------------------

    @cached_property
    def path_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shape of each path's weight block (e3nn's ``path_shape``), weighted or not.

        ``(mul1, mul2, mul_out)`` for ``uvw``, ``(mul1, mul2)`` for ``uvu``, ``(mul1,)`` for
        ``uuu``.
        """
        shapes = []
        for path in self.paths:
            mul1, mul2 = self.irreps_in1[path.in1].mul, self.irreps_in2[path.in2].mul
            if path.mode is PathMode.uvw:
                shapes.append((mul1, mul2, self.irreps_out[path.out].mul))
            elif path.mode is PathMode.uvu:
                shapes.append((mul1, mul2))
            else:
                shapes.append((mul1,))
        return tuple(shapes)

    @cached_property
    def weight_slices(self) -> tuple[slice | None, ...]:
        """Where each path's weights sit in the flat weight vector (``None`` if unweighted)."""
        slices: list[slice | None] = []
        offset = 0
        for path, shape in zip(self.paths, self.path_shapes, strict=True):
            if path.weighted:
                size = math.prod(shape)
                slices.append(slice(offset, offset + size))
                offset += size
            else:
                slices.append(None)
        return tuple(slices)

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Weight shapes of the weighted paths only, in flat order (e3nn's ``weight_views``)."""
        return tuple(s for p, s in zip(self.paths, self.path_shapes, strict=True) if p.weighted)

    @property
    def weight_numel(self) -> int:
        """Length of the flat weight vector (e3nn's ``weight_numel``)."""
        return sum(math.prod(shape) for shape in self.weight_shapes)

    def with_layout(self, layout: Layout) -> TPDescriptor:
        """The same tensor product with its tensors in ``layout``; the weights are unchanged."""
        return replace(self, layout=layout)
