"""Sharpness along training: warm-started top Hessian eigenvalues next to 2 / lr."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from torsion.curvature._operators import HessianOperator
from torsion.curvature._probes import EigshResult, eigsh

__all__ = ["SharpnessMonitor"]


def _stability_threshold(lr: Any) -> float:
    """``2 / lr``: infinite at ``lr = 0`` (a warm-up's first steps), where no sharpness
    destabilises gradient descent."""
    lr = float(lr)
    return math.inf if lr == 0 else 2.0 / lr


class SharpnessMonitor:
    """A training-loop hook that tracks the top-``k`` Hessian eigenvalues (sharpness).

    Every ``every`` calls it builds a :class:`HessianOperator` on ``data`` at the current
    weights and runs :func:`eigsh` warm-started from the previous check's eigenvectors, so
    a smoothly evolving model costs a few products per check. Next to the eigenvalues it
    records ``2 / lr`` of every parameter group of ``optimizer``: gradient descent is
    stable on a quadratic only while the sharpness stays below that threshold, and full-
    batch training drifts up to it and hovers there (the edge of stability, Cohen et al.
    2021).

    Args:
        model: the network; never modified (the operator evaluates it functionally).
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean loss.
        data: one ``(inputs, targets)`` batch or an iterable of batches (see
            :class:`HessianOperator`); a one-pass iterator (a generator) is read into a
            list here, since every check uses the data again.
        every: check every this many calls.
        k: number of top eigenvalues.
        optimizer: optional; its groups' learning rates give the ``2 / lr`` thresholds.
        tol: relative eigenvalue accuracy of each check's :func:`eigsh` (its default
            ``criterion="eigenvalue"``; default ``1e-3``).
        params: parameter selection, as in :class:`HessianOperator`.
        riemannian: track the Riemannian Hessian of manifold parameters (``geoopt``
            ``ManifoldParameter`` s, e.g. Stiefel-constrained layers trained by a Riemannian
            optimizer), as :class:`HessianOperator` ``(..., riemannian=True)`` defines it:
            the curvature along the manifold, which is what a Riemannian step feels. Default
            ``False`` (the Euclidean Hessian, manifolds ignored).
        generator: randomness of the first (cold) check.
        distributed: as in :class:`HessianOperator`. ``None`` (default): under an
            initialised :mod:`torch.distributed` group of more than one rank, each rank
            passes its shard of the data and the checks are all-reduced, so every rank must
            call the monitor (at the same steps); ``False``: check this rank's ``data``
            alone, e.g. a monitor on rank 0 only, given the full data.

    Attributes:
        history: a dict of lists, one entry per check: ``"step"``, ``"eigenvalues"``
            (``k`` floats), ``"matvecs"``, ``"converged"`` and ``"threshold"`` (``2 / lr``
            per optimizer group, ``inf`` where ``lr = 0``; empty without an optimizer).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        data: Any,
        *,
        every: int = 1,
        k: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        tol: float = 1e-3,
        params: Any = None,
        riemannian: bool = False,
        generator: torch.Generator | None = None,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if isinstance(data, Iterator):  # a generator or iterator is read once, here
            data = list(data)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.k, self.optimizer, self.tol = every, k, optimizer, tol
        self.params, self.riemannian, self.generator = params, riemannian, generator
        self.distributed = distributed
        self.history: dict[str, list] = {
            "step": [],
            "eigenvalues": [],
            "matvecs": [],
            "converged": [],
            "threshold": [],
        }
        self._calls = 0
        self._last: EigshResult | None = None

    def __call__(self) -> EigshResult | None:
        """Count one training step; on every ``every``-th, check and return the result."""
        step = self._calls
        self._calls += 1
        if step % self.every:
            return None
        return self.check(step)

    def check(self, step: int | None = None) -> EigshResult:
        """Compute the top-``k`` eigenvalues now and append them to :attr:`history`."""
        op = HessianOperator(
            self.model,
            self.loss_fn,
            self.data,
            self.params,
            riemannian=self.riemannian,
            distributed=self.distributed,
        )
        result = eigsh(
            op, k=self.k, which="LA", tol=self.tol, v0=self._last, generator=self.generator
        )
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        thresholds = [_stability_threshold(g["lr"]) for g in groups]
        self._last = result
        self.history["step"].append(self._calls - 1 if step is None else step)
        self.history["eigenvalues"].append(result.eigenvalues.tolist())
        self.history["matvecs"].append(result.matvecs)
        self.history["converged"].append(bool(result.converged))
        self.history["threshold"].append(thresholds)
        return result

    def plot(self, ax=None):
        """Sharpness and ``2 / lr`` against the step (needs matplotlib); returns the axes."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        steps = self.history["step"]
        top = [values[0] for values in self.history["eigenvalues"]]
        ax.plot(steps, top, label="sharpness (top Hessian eigenvalue)")
        for group, _ in enumerate(self.history["threshold"][0] if steps else []):
            thresholds = [row[group] for row in self.history["threshold"]]
            ax.plot(steps, thresholds, "--", label=f"2 / lr (group {group})")
        ax.set(xlabel="step", ylabel="eigenvalue")
        ax.legend()
        return ax
