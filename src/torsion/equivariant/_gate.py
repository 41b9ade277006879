"""The gate nonlinearity: activated scalars, and non-scalars scaled by activated gates."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

from torsion.equivariant._checks import NormalizedActivation, as_irreps, check_features

__all__ = ["Gate"]

Activation = Callable[[Tensor], Tensor]


def _activation_parity(act: nn.Module) -> int:
    """``1`` for an even function, ``-1`` for an odd one, ``0`` for neither (e3nn's test)."""
    x = torch.linspace(0.0, 10.0, 256, dtype=torch.float64)
    a1, a2 = act(x), act(-x)
    if (a1 - a2).abs().max() < 1e-5:
        return 1
    if (a1 + a2).abs().max() < 1e-5:
        return -1
    return 0


def _scalar_activations(
    irreps: o3.Irreps, acts: Sequence[Activation | None], name: str
) -> tuple[nn.ModuleList, o3.Irreps]:
    """Second-moment-normalized activations (e3nn's ``normalize2mom``) and the output irreps."""
    if isinstance(acts, str) or not isinstance(acts, Sequence):
        raise TypeError(f"Gate: act_{name} must be a list of callables or None")
    if len(acts) != len(irreps):
        raise ValueError(
            f"Gate: irreps_{name} '{irreps}' has {len(irreps)} blocks but act_{name} has "
            f"{len(acts)} activations (one per block)"
        )
    modules: list[nn.Module] = []
    irreps_out = []
    for (mul, ir), act in zip(irreps, acts, strict=True):
        if ir.l != 0:
            raise ValueError(f"Gate: irreps_{name} must be scalars, got '{irreps}'")
        if act is None:
            modules.append(nn.Identity())
            irreps_out.append((mul, ir))
            continue
        if not callable(act):
            raise TypeError(f"Gate: act_{name} entries must be callables or None, got {act!r}")
        normalized = NormalizedActivation(act)
        parity = ir.p if ir.p == 1 else _activation_parity(normalized)
        if parity == 0:
            raise ValueError(
                f"Gate: the odd scalars {mul}x{ir} of irreps_{name} need an even or odd "
                "activation; this one is neither (parity would be violated)"
            )
        modules.append(normalized)
        irreps_out.append((mul, (0, parity)))
    return nn.ModuleList(modules), o3.Irreps(irreps_out)


def _slices(
    offsets: Sequence[int], irreps: o3.Irreps, blocks: Sequence[int]
) -> list[tuple[int, int]]:
    """Merged ``(start, length)`` runs of the flat components of ``blocks``."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        start, length = offsets[b], irreps[b].dim
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((start, length))
    return runs


class Gate(nn.Module):
    """Gate activation (e3nn's ``nn.Gate``): ``(⊕ φ_i(x_i)) ⊕ (⊕ σ_j(g_j) y_j)``.

    Scalars ``x_i`` go through their activations ``φ_i``; each non-scalar irrep copy ``y_j``
    is multiplied by its own activated gate scalar ``σ_j(g_j)``. Activations are rescaled to
    unit second moment under a standard normal input (e3nn's ``normalize2mom``), and an odd
    scalar input needs an even or odd activation (the output parity follows). The input
    layout is e3nn's: the blocks of ``irreps_scalars + irreps_gates + irreps_gated`` sorted
    by irrep (stably; :attr:`irreps_in`), so given the same input the output equals
    ``e3nn.nn.Gate``'s. The output is ``activated scalars + gated``.

    Args:
        irreps_scalars: scalar irreps passed through ``act_scalars``.
        act_scalars: one activation (or ``None`` for identity) per block of
            ``irreps_scalars``.
        irreps_gates: scalar irreps, one scalar per irrep copy of ``irreps_gated``.
        act_gates: one activation (or ``None``) per block of ``irreps_gates``.
        irreps_gated: the irreps that are gated.

    Raises:
        ValueError: for non-scalar scalars or gates, a count of gates different from the
            number of gated irreps, activation lists of the wrong length, or an odd scalar
            with an activation that is neither even nor odd.
        TypeError: for activations that are not callables.

    Shapes:
        input ``(..., irreps_in.dim)``, output ``(..., irreps_out.dim)``.

    Example:
        >>> gate = Gate("16x0e", [torch.nn.functional.silu], "8x0e", [torch.sigmoid], "8x1o")
        >>> gate.irreps_in, gate.irreps_out
        (24x0e+8x1o, 16x0e+8x1o)
    """

    def __init__(
        self,
        irreps_scalars: Any,
        act_scalars: Sequence[Activation | None],
        irreps_gates: Any,
        act_gates: Sequence[Activation | None],
        irreps_gated: Any,
    ) -> None:
        super().__init__()
        scalars = as_irreps(irreps_scalars, "irreps_scalars")
        gates = as_irreps(irreps_gates, "irreps_gates")
        gated = as_irreps(irreps_gated, "irreps_gated")
        if gates.num_irreps != gated.num_irreps:
            raise ValueError(
                f"Gate: irreps_gated '{gated}' has {gated.num_irreps} irreps but irreps_gates "
                f"'{gates}' has {gates.num_irreps} gate scalars; they must match"
            )
        self.act_scalars, scalars_out = _scalar_activations(scalars, act_scalars, "scalars")
        self.act_gates, gates_out = _scalar_activations(gates, act_gates, "gates")
        self._scalar_sizes = [mul_ir.dim for mul_ir in scalars]
        self._gate_sizes = [mul_ir.dim for mul_ir in gates]

        # e3nn's layout: the three groups (each simplified) concatenated, then sorted.
        groups = [scalars.simplify(), gates.simplify(), gated.simplify()]
        concatenated = sum(groups, o3.Irreps())
        sorted_irreps, permutation, _ = concatenated.sort()
        offsets = [0, *itertools.accumulate(mul_ir.dim for mul_ir in sorted_irreps)]
        first = [0, *itertools.accumulate(len(g) for g in groups)]
        self._runs = [
            _slices(offsets, sorted_irreps, [permutation[i] for i in range(first[k], first[k + 1])])
            for k in range(3)
        ]
        self.irreps_in = sorted_irreps.simplify()
        self._dim_in, self._irreps_in_text = self.irreps_in.dim, str(self.irreps_in)
        self.irreps_scalars, self.irreps_gates, self.irreps_gated = groups

        gate_parity = [ir.p for mul, ir in gates_out for _ in range(mul)]
        gated_out = o3.Irreps(
            [
                (1, (ir.l, ir.p * gate_parity[copy]))
                for copy, ir in enumerate(ir for mul, ir in gated for _ in range(mul))
            ]
        ).simplify()
        self.irreps_out = scalars_out + gated_out
        copy_dims = [ir.dim for mul, ir in gated for _ in range(mul)]
        self.register_buffer(
            "_gate_of_component",
            torch.repeat_interleave(
                torch.arange(len(copy_dims), dtype=torch.long),
                torch.tensor(copy_dims, dtype=torch.long),
            ),
            persistent=False,
        )

    @staticmethod
    def _gather(x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
        parts = [x.narrow(-1, start, length) for start, length in runs]
        if not parts:
            return x.narrow(-1, 0, 0)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def _activate(x: Tensor, acts: nn.ModuleList, sizes: list[int]) -> Tensor:
        if not sizes:
            return x
        parts = [act(part) for act, part in zip(acts, x.split(sizes, dim=-1), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gate.

        Args:
            x: features ``(..., irreps_in.dim)``.

        Returns:
            ``(..., irreps_out.dim)``: activated scalars, then gated irreps.

        Raises:
            TypeError: for a non-floating tensor.
            ValueError: if the last dimension is not ``irreps_in.dim``.
        """
        check_features(x, self._dim_in, self._irreps_in_text, "Gate")
        scalars, gates, gated = (self._gather(x, runs) for runs in self._runs)
        scalars = self._activate(scalars, self.act_scalars, self._scalar_sizes)
        if gated.shape[-1] == 0:
            return scalars
        gates = self._activate(gates, self.act_gates, self._gate_sizes)
        gated = gated * gates.index_select(-1, self._gate_of_component)
        return torch.cat([scalars, gated], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"
