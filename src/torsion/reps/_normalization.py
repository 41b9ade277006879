"""Path normalization of a tensor product, computed exactly as ``e3nn.o3.TensorProduct`` does.

e3nn folds two normalizations and an optional per-instruction multiplier into one
coefficient per path, ``sqrt(alpha)`` with

* ``irrep_normalization``: ``alpha = dim(out)`` (``"component"``: unit-variance
  components in, unit-variance components out), ``dim(in1) * dim(in2)`` (``"norm"``: unit
  norms in, unit norms out) or ``1`` (``"none"``);
* ``path_normalization``: ``alpha /= fan_in``, where ``fan_in`` counts the terms summed
  into one output component: over every path into the same output block
  (``"element"``), or the path's own terms times the number of paths into that block
  (``"path"``), or nothing (``"none"``);
* ``alpha *= multiplier`` (e3nn's optional sixth instruction field).

A path contributes ``num_elements`` terms per output component: ``mul1 * mul2`` for
``uvw``, ``mul2`` for ``uvu`` (the sum over ``v``) and ``1`` for ``uuu``. The operations
below happen in e3nn's order, so the coefficients are bitwise equal to e3nn's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from e3nn import o3

__all__ = [
    "IRREP_NORMALIZATIONS",
    "PATH_NORMALIZATIONS",
    "IrrepNormalization",
    "PathNormalization",
    "path_coefficients",
]

IrrepNormalization = Literal["component", "norm", "none"]
PathNormalization = Literal["element", "path", "none"]
IRREP_NORMALIZATIONS: tuple[str, ...] = ("component", "norm", "none")
PATH_NORMALIZATIONS: tuple[str, ...] = ("element", "path", "none")


def _num_elements(mode: str, mul1: int, mul2: int) -> int:
    """Terms one path sums into each output component (e3nn's ``num_elements``)."""
    return {"uvw": mul1 * mul2, "uvu": mul2, "uuu": 1}[mode]


def path_coefficients(
    irreps_in1: o3.Irreps,
    irreps_in2: o3.Irreps,
    irreps_out: o3.Irreps,
    instructions: Sequence[tuple[int, int, int, str, float]],
    irrep_normalization: str = "component",
    path_normalization: str = "element",
) -> list[float]:
    """Final coefficient of every path, as ``e3nn.o3.TensorProduct`` computes it.

    Args:
        irreps_in1: irreps of the first input.
        irreps_in2: irreps of the second input.
        irreps_out: irreps of the output.
        instructions: one ``(in1, in2, out, mode, multiplier)`` per path, with ``mode`` one
            of ``"uvw"``, ``"uvu"``, ``"uuu"`` and ``multiplier >= 0`` e3nn's optional
            instruction ``path_weight`` (``1.0`` by default there). Indices must be valid.
        irrep_normalization: ``"component"`` (e3nn's default), ``"norm"`` or ``"none"``.
        path_normalization: ``"element"`` (e3nn's default), ``"path"`` or ``"none"``.

    Returns:
        One coefficient per instruction, ``sqrt(alpha)`` as described in the module
        docstring.

    Raises:
        ValueError: for an unknown normalization or a negative multiplier (e3nn takes its
            square root).
    """
    if irrep_normalization not in IRREP_NORMALIZATIONS:
        raise ValueError(
            f"irrep_normalization must be one of {IRREP_NORMALIZATIONS}, "
            f"got {irrep_normalization!r}"
        )
    if path_normalization not in PATH_NORMALIZATIONS:
        raise ValueError(
            f"path_normalization must be one of {PATH_NORMALIZATIONS}, got {path_normalization!r}"
        )

    def fan(ins: tuple[int, int, int, str, float]) -> float:
        # e3nn multiplies by the input variances, which are 1.0 here.
        return 1.0 * 1.0 * _num_elements(ins[3], irreps_in1[ins[0]].mul, irreps_in2[ins[1]].mul)

    coefficients = []
    for index, ins in enumerate(instructions):
        in1, in2, out, _, multiplier = ins
        if multiplier < 0:
            raise ValueError(
                f"instruction {index}: the multiplier (e3nn's path_weight) must be >= 0, since "
                f"the coefficient is its square root; got {multiplier}"
            )
        if irrep_normalization == "component":
            alpha = irreps_out[out].ir.dim
        elif irrep_normalization == "norm":
            alpha = irreps_in1[in1].ir.dim * irreps_in2[in2].ir.dim
        else:
            alpha = 1
        if path_normalization == "element":
            x = sum(fan(other) for other in instructions if other[2] == out)
        elif path_normalization == "path":
            x = fan(ins) * len([other for other in instructions if other[2] == out])
        else:
            x = 1
        if x > 0.0:
            alpha /= x
        alpha *= 1.0  # e3nn's output variance
        alpha *= multiplier
        coefficients.append(math.sqrt(alpha))
    return coefficients
