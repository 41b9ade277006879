"""Tensor layouts of irreps features: ``mul_ir`` (e3nn's) and ``ir_mul`` (channels contiguous).

A feature vector over ``irreps = mul_1 x ir_1 + mul_2 x ir_2 + ...`` is a concatenation of
blocks, one per entry. Inside a block of ``mul`` copies of an irrep of dimension ``d``,
``mul_ir`` stores component ``i`` of copy ``u`` at ``u * d + i`` and ``ir_mul`` at
``i * mul + u``. The block order is the same in both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from e3nn import o3
from torch import Tensor

from torsion.reps import LAYOUTS

__all__ = ["convert_layout", "join_blocks", "split_blocks"]


def _check_layout(layout: str, name: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")


def split_blocks(x: Tensor, irreps: o3.Irreps, layout: str) -> list[Tensor]:
    """Views of the blocks of ``x``, each shaped ``(..., mul, ir.dim)`` whatever the layout.

    Args:
        x: features whose last dimension is ``irreps.dim``.
        irreps: their irreps.
        layout: ``"mul_ir"`` or ``"ir_mul"``.

    Returns:
        One tensor per entry of ``irreps`` (a view for ``"mul_ir"``, a transposed view for
        ``"ir_mul"``).

    Shapes:
        ``x``: ``(..., irreps.dim)`` -> ``[(..., mul_b, dim_b) for each block b]``.
    """
    _check_layout(layout, "layout")
    batch = x.shape[:-1]
    blocks = []
    for piece, (mul, ir) in zip(irreps.slices(), irreps, strict=True):
        chunk = x[..., piece]
        if layout == "mul_ir":
            blocks.append(chunk.reshape(*batch, mul, ir.dim))
        else:
            blocks.append(chunk.reshape(*batch, ir.dim, mul).transpose(-1, -2))
    return blocks


def join_blocks(blocks: Sequence[Tensor], layout: str, like: Tensor) -> Tensor:
    """Concatenate blocks shaped ``(..., mul, ir.dim)`` into features in ``layout``.

    Args:
        blocks: one tensor per irreps entry, all with the same leading shape.
        layout: ``"mul_ir"`` or ``"ir_mul"``.
        like: gives the leading shape, dtype and device when ``blocks`` is empty.

    Returns:
        The features, the inverse of :func:`split_blocks`.

    Shapes:
        ``[(..., mul_b, dim_b)]`` -> ``(..., sum_b mul_b * dim_b)``.
    """
    _check_layout(layout, "layout")
    if not blocks:
        return like.new_zeros((*like.shape[:-1], 0))
    flat = []
    for block in blocks:
        batch = block.shape[:-2]
        if layout == "ir_mul":
            block = block.transpose(-1, -2)
        flat.append(block.reshape(*batch, block.shape[-2] * block.shape[-1]))
    return torch.cat(flat, dim=-1)


def convert_layout(x: Tensor, irreps: o3.Irreps | str, source: str, target: str) -> Tensor:
    """Re-lay irreps features from layout ``source`` to layout ``target``.

    Args:
        x: features in layout ``source``.
        irreps: their irreps (anything ``e3nn.o3.Irreps`` accepts).
        source: ``"mul_ir"`` or ``"ir_mul"``.
        target: ``"mul_ir"`` or ``"ir_mul"``.

    Returns:
        ``x`` itself when the layouts agree, otherwise a new tensor in ``target``.

    Raises:
        ValueError: for an unknown layout or when the last dimension of ``x`` is not
            ``irreps.dim``.

    Shapes:
        ``(..., irreps.dim) -> (..., irreps.dim)``.
    """
    irreps = o3.Irreps(irreps)
    _check_layout(source, "source")
    _check_layout(target, "target")
    if x.ndim < 1 or x.shape[-1] != irreps.dim:
        raise ValueError(
            f"x has shape {tuple(x.shape)}, but irreps '{irreps}' need a last dimension of "
            f"{irreps.dim}"
        )
    if source == target:
        return x
    return join_blocks(split_blocks(x, irreps, source), target, like=x)
