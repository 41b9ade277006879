"""The equivariant linear layer: one weight matrix per pair of blocks of the same irrep."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import geoopt
import torch
from e3nn import o3
from torch import Tensor, nn

from torsion.equivariant._checks import as_irreps, check_features
from torsion.manifolds import Stiefel, check_weight_manifold

__all__ = ["Linear"]


@dataclass(frozen=True)
class _IrrepGroup:
    """All input and output blocks of one irrep: one matrix product maps them.

    Plain ints only, so that ``torch.compile`` guards on nothing but numbers.
    """

    ir_dim: int
    inputs: tuple[tuple[int, int], ...]  # (offset, mul) of each input block
    outputs: tuple[int, ...]  # output block indices
    out_muls: tuple[int, ...]  # their multiplicities
    weights: tuple[tuple[int, ...], ...]  # weights[a][b]: parameter of (input a, output b)
    scale: float  # e3nn's element normalization 1 / sqrt(sum of input multiplicities), or 1


class Linear(nn.Module):
    """Equivariant linear map between irreps: ``e3nn.o3.Linear``'s semantics, one matmul per irrep.

    Every input block ``mul_in x ir`` is connected to every output block ``mul_out x ir`` of
    the same irrep by a ``(mul_in, mul_out)`` weight matrix; output block ``o`` is

    ``y_o[w, k] = sum over input blocks b of ir of  W_bo[u, w] x_b[u, k] / sqrt(M_ir)``

    with ``M_ir`` the total input multiplicity of that irrep (e3nn's ``"element"`` path
    normalization), so outputs keep unit variance for unit-variance inputs and weights.
    Output blocks whose irrep is absent from the input are zero. With ``biases=True``, the
    parity-even scalar (``0e``) output blocks get a bias initialised to zero, as in e3nn.

    Each weight matrix is its own :class:`torch.nn.Parameter` (in :attr:`weights`, in e3nn's
    instruction order: input block outer, output block inner), initialised like e3nn's
    (one standard normal draw of ``weight_numel`` values, split; under the same seed the
    weights are e3nn's). :meth:`flat_weight` and :meth:`load_flat_weight` convert to and from
    e3nn's flat weight vector, so the layer and ``e3nn.o3.Linear`` compute the same thing
    given the same weights. The forward pass concatenates the blocks of each irrep and
    applies one matrix product per irrep, instead of e3nn's one einsum per block pair.

    With ``weight_manifold="stiefel"`` every block-pair matrix ``W_bo`` is constrained to have
    orthonormal columns along its longer side: it is a :class:`geoopt.ManifoldParameter` on
    :class:`torsion.manifolds.Stiefel`, to be trained by :mod:`torsion.optim`'s Riemannian
    optimizers (a Euclidean optimizer would leave the manifold). When ``mul_in >= mul_out``
    the parameter is the ``(mul_in, mul_out)`` matrix itself (``W^T W = I``); when
    ``mul_in < mul_out`` the parameter is its ``(mul_out, mul_in)`` transpose, and the layer
    uses it transposed (``W W^T = I``). Each is initialised as a Haar-random orthonormal
    frame drawn from torch's global RNG (:meth:`torsion.manifolds.Stiefel.random`). The
    channel mixing of each block pair is then an isometric embedding (``mul_in <= mul_out``)
    or a co-isometry (``mul_in > mul_out``) of multiplicity space; for ``mul_in == mul_out``
    it is orthogonal and preserves the norm of every irrep block. The ``1 / sqrt(M_ir)``
    normalization above is **not** applied in this mode: it keeps the variance of a sum of
    ``M_ir`` Gaussian-weighted inputs at one, whereas an orthonormal mixing already keeps
    norms, and the scale would shrink them by ``sqrt(M_ir)``. (When an irrep has several
    input blocks, their contributions to an output block are summed unscaled; norm
    preservation holds block pair by block pair.) Linear connects only equal irreps and
    the constraint acts on multiplicity space only, so the layer stays equivariant. The
    bias, if any, stays a plain parameter. :meth:`flat_weight` and :meth:`load_flat_weight`
    raise in this mode: e3nn's flat vector assumes e3nn's normalization and a free
    ``(mul_in, mul_out)`` layout, neither of which holds.

    Args:
        irreps_in: irreps of the input (anything ``e3nn.o3.Irreps`` accepts; used as given,
            not simplified: as in e3nn, ``"3x0e+7x0e"`` and ``"10x0e"`` normalize alike but
            have different weight layouts).
        irreps_out: irreps of the output.
        biases: add a bias to each ``0e`` output block. Default ``False``.
        weight_manifold: ``None`` (default: free weights, e3nn's semantics) or ``"stiefel"``
            (orthonormal block weights, see above).
        dtype: of the parameters (default: torch's default dtype).
        device: of the parameters.

    Raises:
        ValueError: for invalid irreps.
        TypeError: for a non-bool ``biases``.
        ValueError: for a ``weight_manifold`` other than ``None`` or ``"stiefel"``.

    Shapes:
        input ``(..., irreps_in.dim)``, output ``(..., irreps_out.dim)``, in e3nn's
        ``mul_ir`` layout.

    Example:
        >>> lin = Linear("4x0e + 16x1o", "8x0e + 8x1o")
        >>> lin.weight_numel, [tuple(w.shape) for w in lin.weights]
        (160, [(4, 8), (16, 8)])
        >>> lin(torch.randn(5, lin.irreps_in.dim)).shape
        torch.Size([5, 32])
    """

    def __init__(
        self,
        irreps_in: Any,
        irreps_out: Any,
        *,
        biases: bool = False,
        weight_manifold: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.irreps_in = as_irreps(irreps_in, "irreps_in")
        self.irreps_out = as_irreps(irreps_out, "irreps_out")
        if not isinstance(biases, bool):
            raise TypeError(f"Linear: biases must be a bool, got {type(biases).__name__}")
        #: ``None`` or ``"stiefel"``: the constraint on the block weights.
        self.weight_manifold = check_weight_manifold(weight_manifold, "Linear")
        factory = {"dtype": dtype, "device": device}
        #: e3nn's instructions ``(i_in, i_out)``, in weight order.
        self.instructions: tuple[tuple[int, int], ...] = tuple(
            (i_in, i_out)
            for i_in, (_, ir_in) in enumerate(self.irreps_in)
            for i_out, (_, ir_out) in enumerate(self.irreps_out)
            if ir_in == ir_out
        )
        shapes = [(self.irreps_in[i].mul, self.irreps_out[o].mul) for i, o in self.instructions]
        #: Per weight: whether the parameter stores the transpose of the ``(mul_in, mul_out)``
        #: matrix (only with ``weight_manifold="stiefel"`` and ``mul_in < mul_out``).
        self._transposed: tuple[bool, ...] = tuple(
            weight_manifold == "stiefel" and a < b for a, b in shapes
        )
        if weight_manifold == "stiefel":
            self.weights = nn.ParameterList(
                _stiefel_weight((max(a, b), min(a, b)), factory) for a, b in shapes
            )
        else:
            # One flat draw, split: the same random stream as e3nn's torch.randn(weight_numel).
            flat = torch.randn(sum(a * b for a, b in shapes), **factory)
            self.weights = nn.ParameterList(
                nn.Parameter(chunk.reshape(shape).clone())
                for chunk, shape in zip(flat.split([a * b for a, b in shapes]), shapes, strict=True)
            )
        self._groups = self._make_groups()
        self._bias_blocks = tuple(
            index
            for index, (_, ir) in enumerate(self.irreps_out)
            if biases and ir == o3.Irrep("0e")
        )
        bias_numel = sum(self.irreps_out[index].mul for index in self._bias_blocks)
        self.bias = nn.Parameter(torch.zeros(bias_numel, **factory)) if bias_numel else None
        self._bias_muls = tuple(self.irreps_out[o].mul for o in self._bias_blocks)
        self._out_dims = tuple(mul_ir.dim for mul_ir in self.irreps_out)
        self._dim_in, self._irreps_in_text = self.irreps_in.dim, str(self.irreps_in)

    def _make_groups(self) -> tuple[_IrrepGroup, ...]:
        index = {pair: k for k, pair in enumerate(self.instructions)}
        offsets = [0, *itertools.accumulate(mul_ir.dim for mul_ir in self.irreps_in)]
        groups = []
        for ir in dict.fromkeys(ir for _, ir in self.irreps_out):
            blocks_in = tuple(i for i, (_, ir_in) in enumerate(self.irreps_in) if ir_in == ir)
            blocks_out = tuple(o for o, (_, ir_out) in enumerate(self.irreps_out) if ir_out == ir)
            if not blocks_in:
                continue
            fan_in = sum(self.irreps_in[i].mul for i in blocks_in)
            groups.append(
                _IrrepGroup(
                    ir_dim=ir.dim,
                    inputs=tuple((offsets[i], self.irreps_in[i].mul) for i in blocks_in),
                    outputs=blocks_out,
                    out_muls=tuple(self.irreps_out[o].mul for o in blocks_out),
                    weights=tuple(tuple(index[i, o] for o in blocks_out) for i in blocks_in),
                    scale=(
                        1.0 / math.sqrt(fan_in) if fan_in and self.weight_manifold is None else 1.0
                    ),
                )
            )
        return tuple(groups)

    @property
    def weight_numel(self) -> int:
        """Number of weights (e3nn's ``weight_numel``; the bias is not counted)."""
        return sum(w.numel() for w in self.weights)

    def _check_flat_layout(self, method: str) -> None:
        if self.weight_manifold is not None:
            raise RuntimeError(
                f"Linear.{method}: e3nn's flat weight layout does not apply to a layer with "
                f"weight_manifold={self.weight_manifold!r} (transposed orthonormal blocks, "
                "no 1/sqrt(fan_in) normalization); use .weights"
            )

    def flat_weight(self) -> Tensor:
        """The weights as e3nn's flat vector ``(weight_numel,)`` (a differentiable view-copy).

        Raises:
            RuntimeError: for a layer with a ``weight_manifold``.
        """
        self._check_flat_layout("flat_weight")
        if not len(self.weights):
            return torch.zeros(0)
        return torch.cat([w.reshape(-1) for w in self.weights])

    @torch.no_grad()
    def load_flat_weight(self, flat: Tensor) -> None:
        """Copy e3nn's flat weight vector ``(weight_numel,)`` into :attr:`weights`.

        Raises:
            ValueError: if ``flat`` does not have shape ``(weight_numel,)``.
            RuntimeError: for a layer with a ``weight_manifold``.
        """
        self._check_flat_layout("load_flat_weight")
        if not isinstance(flat, Tensor) or tuple(flat.shape) != (self.weight_numel,):
            raise ValueError(
                f"Linear.load_flat_weight expects shape ({self.weight_numel},), "
                f"got {tuple(getattr(flat, 'shape', ()))}"
            )
        for w, chunk in zip(
            self.weights, flat.split([w.numel() for w in self.weights]), strict=True
        ):
            w.copy_(chunk.reshape(w.shape))

    def _group_matrix(self, group: _IrrepGroup) -> Tensor:
        rows = [torch.cat([self._block_weight(k) for k in row], dim=1) for row in group.weights]
        matrix = torch.cat(rows, dim=0)
        return matrix if group.scale == 1.0 else matrix * group.scale

    def _block_weight(self, k: int) -> Tensor:
        """Weight ``k`` as its ``(mul_in, mul_out)`` matrix."""
        weight = self.weights[k]
        return weight.mT if self._transposed[k] else weight

    def _group_input(self, x: Tensor, group: _IrrepGroup) -> Tensor:
        """The input blocks of one irrep stacked along the channels: ``(..., M_in, ir.dim)``."""
        parts = [
            x.narrow(-1, offset, mul * group.ir_dim).unflatten(-1, (mul, group.ir_dim))
            for offset, mul in group.inputs
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer.

        Args:
            x: features ``(..., irreps_in.dim)``.

        Returns:
            ``(..., irreps_out.dim)``.

        Raises:
            TypeError: for a non-floating tensor or one whose dtype differs from the weights'.
            ValueError: if the last dimension is not ``irreps_in.dim``.
        """
        check_features(x, self._dim_in, self._irreps_in_text, "Linear")
        reference = next(iter(self.parameters()), None)
        if reference is not None and x.dtype != reference.dtype:
            raise TypeError(
                f"Linear: x has dtype {x.dtype}, but the weights have {reference.dtype}"
            )
        batch = x.shape[:-1]
        blocks: list[Tensor | None] = [None] * len(self.irreps_out)
        for group in self._groups:
            # (..., M_in, k) -> (..., k, M_in) @ (M_in, M_out) -> (..., M_out, k)
            y = (
                self._group_input(x, group).transpose(-1, -2) @ self._group_matrix(group)
            ).transpose(-1, -2)
            for o, block in zip(group.outputs, y.split(group.out_muls, dim=-2), strict=True):
                blocks[o] = block.flatten(-2)
        if self.bias is not None:
            for o, bias in zip(
                self._bias_blocks,
                self.bias.split(self._bias_muls),
                strict=True,
            ):
                blocks[o] = bias if blocks[o] is None else blocks[o] + bias
        parts = [
            x.new_zeros(*batch, dim) if block is None else block.expand(*batch, dim)
            for block, dim in zip(blocks, self._out_dims, strict=True)
        ]
        if not parts:
            return x.new_zeros(*batch, 0)
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        manifold = "" if self.weight_manifold is None else f", on {self.weight_manifold}"
        return f"{self.irreps_in} -> {self.irreps_out}, {self.weight_numel} weights{manifold}"


def _stiefel_weight(shape: tuple[int, int], factory: dict) -> geoopt.ManifoldParameter:
    """A Haar-random ``(n, p)`` frame (``n >= p``) from the global RNG, on ``Stiefel``.

    An empty frame (``p == 0``) is trivially orthonormal and is not drawn.
    """
    stiefel = Stiefel()
    if shape[1] == 0:
        return geoopt.ManifoldParameter(torch.zeros(shape, **factory), manifold=stiefel)
    return geoopt.ManifoldParameter(stiefel.random(*shape, **factory), manifold=stiefel)
