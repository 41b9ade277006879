"""Riemannian batch normalization of SPD matrices under three metrics.

Every metric follows one recipe (Brooks et al. 2019 for the affine-invariant metric,
Chen et al. 2024's Lie-group formulation for all three): compute the batch Fréchet mean
``G`` and dispersion ``v = mean_i d(G, X_i)^2``, *centre* each matrix at the identity,
*scale* its logarithm by ``scale / sqrt(v + eps)``, and *bias* it to a learned SPD
``B``. For the log-Euclidean (``"lem"``) and log-Cholesky (``"lcm"``) metrics the group
is abelian in a global chart ``phi`` (the matrix logarithm; the Cholesky factor with a
logarithmic diagonal), so centring, scaling and biasing are ``phi^-1(s (phi(X) - phi(G))
+ phi(B))`` and the mean is exact. For the affine-invariant metric (``"airm"``) centring
is the congruence ``G^-1/2 X G^-1/2`` (parallel transport to the identity) and biasing
``B^1/2 Y B^1/2``; ``G`` comes from a fixed number of Karcher steps started at the
log-Euclidean mean, so there is no host synchronisation.

References:
- D. Brooks, O. Schwander, F. Barbaresco, J.-Y. Schneider, M. Cord, Riemannian batch
  normalization for SPD neural networks, NeurIPS 2019.
- R. Kobler, J. Hirayama, Q. Zhao, M. Kawanabe, SPD domain-specific batch normalization
  to crack interpretable unsupervised domain adaptation in EEG, NeurIPS 2022.
- Z. Chen, Y. Song, Y. Liu, N. Sebe, A Lie group approach to Riemannian batch
  normalization, ICLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import geoopt
import torch
import torch.distributed as dist
from torch import Tensor, nn

from torsion.linalg import sym_expm, sym_invsqrtm, sym_logm, sym_powm, sym_sqrtm
from torsion.manifolds import SPDAffineInvariant, SPDLogCholesky, SPDLogEuclidean

__all__ = ["SPDBatchNorm"]

Metric = Literal["airm", "lem", "lcm"]
_MANIFOLDS = {"airm": SPDAffineInvariant, "lem": SPDLogEuclidean, "lcm": SPDLogCholesky}


# ----------------------------------------------------------------------------- charts


def _log_cholesky(x: Tensor) -> Tensor:
    """``phi(X)``: strictly lower part of ``chol(X)`` plus the log of its diagonal.

    Like :mod:`torsion.linalg`, it reads the symmetric part ``(X + X^T) / 2``, not one
    triangle, so the gradient is the symmetric one."""
    factor = torch.linalg.cholesky((x + x.mT) / 2)
    return factor.tril(-1) + torch.diag_embed(factor.diagonal(dim1=-2, dim2=-1).log())


def _from_log_cholesky(phi: Tensor) -> Tensor:
    factor = phi.tril(-1) + torch.diag_embed(phi.diagonal(dim1=-2, dim2=-1).exp())
    return factor @ factor.mT


_CHARTS = {"lem": (sym_logm, sym_expm), "lcm": (_log_cholesky, _from_log_cholesky)}


Mean = Callable[[Tensor, int], Tensor]


def _local_mean(values: Tensor, item_dims: int) -> Tensor:
    """The mean over every leading dimension, items having ``item_dims`` trailing dims."""
    return values.flatten(0, values.ndim - item_dims - 1).mean(dim=0)


def _synced_mean(group: dist.ProcessGroup | None) -> Mean:
    """The mean over the items of every rank of ``group``, differentiable.

    Sums and counts are all-reduced together; the backward all-reduces the gradients
    (``torch.distributed.nn``), so every rank's input gets the gradient of the sum of all
    ranks' losses, as in ``torch.nn.SyncBatchNorm``.
    """
    from torch.distributed.nn.functional import all_reduce

    def mean(values: Tensor, item_dims: int) -> Tensor:
        items = values.flatten(0, values.ndim - item_dims - 1)
        total = torch.cat([items.sum(dim=0).reshape(-1), items.new_full((1,), items.shape[0])])
        total = all_reduce(total, group=group)
        # A rank with an empty shard still joins every collective; it reads the pooled
        # count (its only host sync), so that if all shards are empty every rank raises
        # the same error instead of some hanging in the next all-reduce.
        if items.shape[0] == 0 and int(total[-1]) == 0:
            raise ValueError(
                "SPDBatchNorm(sync=True) needs at least one matrix in training mode on some "
                "rank to estimate the batch statistics; every rank's batch is empty"
            )
        return (total[:-1] / total[-1]).reshape(items.shape[1:])

    return mean


def _airm_mean(x: Tensor, steps: int, mean: Mean) -> Tensor:
    """Karcher mean by ``steps`` fixed-point steps from the log-Euclidean mean."""
    center = sym_expm(mean(sym_logm(x), 2))
    for _ in range(steps):
        root, inv_root = sym_sqrtm(center), sym_invsqrtm(center)
        center = root @ sym_expm(mean(sym_logm(inv_root @ x @ inv_root), 2)) @ root
    return center


def _airm_geodesic(x: Tensor, y: Tensor, t: float) -> Tensor:
    root, inv_root = sym_sqrtm(x), sym_invsqrtm(x)
    return root @ sym_powm(inv_root @ y @ inv_root, t) @ root


# ----------------------------------------------------------------------------- layer


def _update_running_var(running_var: Tensor, var: Tensor, momentum: float) -> None:
    """``running_var.lerp_(var, momentum)`` through a one-element view.

    Under ``torch.compile`` (torch 2.13) an in-place update of a 0-dim float64 buffer is
    silently dropped (``lerp_``, ``add_``, ``copy_`` alike; float32 and shaped buffers are
    fine), so a compiled float64 model never updated its running variance and evaluated
    with the initial 1. The update through ``view(1)`` is kept.
    """
    running_var.view(1).lerp_(var.view(1), momentum)


class SPDBatchNorm(nn.Module):
    """Riemannian batch normalization of ``n x n`` SPD matrices.

    Statistics pool every matrix of the input (all leading dimensions are the batch). In
    training mode the batch mean and dispersion normalise the input and update the
    running statistics (``running = (1 - momentum) running + momentum batch`` in the
    metric's chart; the running mean moves along the geodesic for ``"airm"``); in eval
    mode the running statistics are used.

    Args:
        n: matrix size.
        metric: ``"airm"`` (affine-invariant), ``"lem"`` (log-Euclidean) or ``"lcm"``
            (log-Cholesky).
        momentum: of the running statistics.
        eps: added to the dispersion before the square root; a finite number ``>= 0``.
        karcher_steps: Karcher steps for the ``"airm"`` batch mean, from the
            log-Euclidean mean (exact for commuting batches). The output's Fréchet mean
            equals ``bias`` as far as these steps converge; each costs one batched
            logarithm.
        sync: under ``torch.distributed``, pool the batch statistics over the matrices of
            every rank of ``process_group`` (as ``torch.nn.SyncBatchNorm`` does): the
            means are all-reduced sums, one all-reduce per mean (three for ``"airm"``
            with two Karcher steps, plus one for the dispersion), and the backward
            all-reduces their gradients. The layer then computes, on each rank, the rows
            of what it computes on the concatenated batch, and the running statistics
            agree on every rank. A rank whose batch is empty still takes part (and returns
            an empty batch); if every rank's batch is empty, every rank raises. Without an
            initialised process group it is the local layer.
        process_group: the group to pool over (default: the whole world).
        dtype, device: of the parameters and buffers.

    Attributes:
        bias: the learned SPD mean of the output, a :class:`geoopt.ManifoldParameter` on
            the metric's SPD manifold (initialised to the identity).
        scale: the learned standard deviation of the output (initialised to one).
        running_mean, running_var: buffers (SPD matrix; scalar dispersion).

    Shapes:
        ``(..., n, n) -> (..., n, n)``.
    """

    def __init__(
        self,
        n: int,
        metric: Metric = "airm",
        momentum: float = 0.1,
        *,
        eps: float = 1e-5,
        karcher_steps: int = 2,
        sync: bool = False,
        process_group: dist.ProcessGroup | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if metric not in _MANIFOLDS:
            raise ValueError(
                f"SPDBatchNorm: metric must be one of {tuple(_MANIFOLDS)}, got {metric!r}"
            )
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"SPDBatchNorm: n must be a positive int, got {n!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"SPDBatchNorm: momentum must be in [0, 1], got {momentum!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"SPDBatchNorm: eps must be a finite number >= 0, got {eps!r}")
        if not (isinstance(karcher_steps, int) and karcher_steps >= 0):
            raise ValueError(
                f"SPDBatchNorm: karcher_steps must be an int >= 0, got {karcher_steps!r}"
            )
        if not isinstance(sync, bool):
            raise TypeError(f"SPDBatchNorm: sync must be a bool, got {sync!r}")
        self.n, self.metric, self.momentum = n, metric, float(momentum)
        self.eps, self.karcher_steps = float(eps), karcher_steps
        self.sync, self.process_group = sync, process_group
        eye = torch.eye(n, dtype=dtype, device=device)
        self.bias = geoopt.ManifoldParameter(eye.clone(), manifold=_MANIFOLDS[metric]())
        self.scale = nn.Parameter(torch.ones((), dtype=eye.dtype, device=device))
        self.register_buffer("running_mean", eye.clone())
        self.register_buffer("running_var", torch.ones((), dtype=eye.dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 3 or x.shape[-2:] != (self.n, self.n):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"SPDBatchNorm({self.n}) expects a batch (..., {self.n}, {self.n}), got {got}"
            )
        if x.dtype != self.running_mean.dtype:  # before any statistic is touched
            raise TypeError(
                f"SPDBatchNorm({self.n}) has {self.running_mean.dtype} statistics but got "
                f"{x.dtype} input (convert the layer with .to({x.dtype}) or the input)"
            )
        if self.training and x.numel() == 0 and not self._synced():
            raise ValueError(
                f"SPDBatchNorm({self.n}) needs at least one matrix in training mode to "
                f"estimate the batch statistics, got an empty batch of shape {tuple(x.shape)}"
            )
        if self.metric == "airm":
            return self._affine_invariant(x)
        return self._lie_chart(x)

    def _synced(self) -> bool:
        """Whether the batch statistics pool every rank's batch."""
        return self.sync and dist.is_available() and dist.is_initialized()

    def _mean(self) -> Mean:
        """How the batch statistics average: over this batch, or over every rank's."""
        return _synced_mean(self.process_group) if self._synced() else _local_mean

    @staticmethod
    def _dispersion(centred: Tensor, mean: Mean) -> Tensor:
        """Mean squared distance to the mean, from the centred chart coordinates."""
        return mean(centred.square().sum(dim=(-2, -1)), 0)

    def _lie_chart(self, x: Tensor) -> Tensor:
        chart, inverse = _CHARTS[self.metric]
        phi = chart(x)
        if self.training:
            average = self._mean()
            mean = average(phi, 2)
            var = self._dispersion(phi - mean, average)
            with torch.no_grad():
                running = chart(self.running_mean)
                m = self.momentum
                self.running_mean.copy_(inverse((1 - m) * running + m * mean.detach()))
                _update_running_var(self.running_var, var.detach(), m)
        else:
            mean, var = chart(self.running_mean), self.running_var
        factor = self.scale / torch.sqrt(var + self.eps)
        return inverse(factor * (phi - mean) + chart(self.bias))

    def _affine_invariant(self, x: Tensor) -> Tensor:
        average = self._mean()
        if self.training:
            mean = _airm_mean(x, self.karcher_steps, average)
        else:
            mean = self.running_mean
        inv_root = sym_invsqrtm(mean)
        logs = sym_logm(inv_root @ x @ inv_root)
        if self.training:
            var = self._dispersion(logs, average)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.copy_(_airm_geodesic(self.running_mean, mean.detach(), m))
                _update_running_var(self.running_var, var.detach(), m)
        else:
            var = self.running_var
        factor = self.scale / torch.sqrt(var + self.eps)
        bias_root = sym_sqrtm(self.bias)
        return bias_root @ sym_expm(factor * logs) @ bias_root

    def extra_repr(self) -> str:
        sync = ", sync=True" if self.sync else ""
        return f"{self.n}, metric={self.metric!r}, momentum={self.momentum}{sync}"
