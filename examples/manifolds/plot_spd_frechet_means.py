"""
Frechet means of SPD covariance matrices under four metrics
===========================================================

Averaging covariance matrices is the first step of most SPD pipelines (batch-norm
statistics, class prototypes, sensor fusion). The arithmetic mean of covariances "swells":
when the inputs point different ways, its determinant exceeds the geometric mean of
theirs (here even the largest of them), so the average looks more uncertain than the
sensors it averages. Riemannian Frechet means
``argmin_M sum_i w_i d(M, C_i)^2`` avoid this, and each metric does it differently.

The task: six radars track the same stationary calibration target. Each one measures
range precisely and bearing coarsely, so its position error is an ellipse that is thin
along its line of sight and wide across it, wider the farther away it stands. From each
radar's readings we estimate a 2x2 error covariance (a genuine SPD matrix with its own
scale and orientation), average the six under the affine-invariant, log-Euclidean,
log-Cholesky and Bures-Wasserstein metrics with weights proportional to how many readings
each radar took, and compare the means: their shape, their optimality, and how they
behave when the map frame is rotated or rescaled.
"""

# %%
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from torsion.manifolds import (
    SPDAffineInvariant,
    SPDBuresWasserstein,
    SPDLogCholesky,
    SPDLogEuclidean,
)

quick = os.environ.get("TORSION_QUICK") == "1"
out = Path(os.environ.get("TORSION_OUT", "."))
out.mkdir(parents=True, exist_ok=True)
generator = torch.Generator().manual_seed(0)
dtype = torch.float64


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 2, 2)`` for angles ``(...)`` in radians."""
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


# %%
# Each radar stands at a bearing and a distance (metres) from the target. Its error is
# ``range_std`` along the line of sight and ``distance * bearing_std`` across it; it reports
# at its own rate for a 60 s calibration run (a 6 s run with TORSION_QUICK=1).
bearing = torch.tensor([5.0, 25.0, 50.0, 80.0, 100.0, 140.0], dtype=dtype) * math.pi / 180
distance = torch.tensor([120.0, 300.0, 80.0, 220.0, 150.0, 60.0], dtype=dtype)
range_std = torch.tensor([0.15, 0.25, 0.10, 0.20, 0.15, 0.10], dtype=dtype)
bearing_std = torch.tensor([6.0, 4.0, 8.0, 5.0, 7.0, 10.0], dtype=dtype) * 1e-3  # radians
rate = torch.tensor([20, 10, 25, 10, 15, 40])  # readings per second
seconds = 6 if quick else 60
readings_per_radar = (rate * seconds).tolist()

true_covariances, covariances = [], []
for k, count in enumerate(readings_per_radar):
    axes = rotation(bearing[k])  # columns: line of sight, across it
    stds = torch.stack([range_std[k], distance[k] * bearing_std[k]])
    true_covariances.append(axes @ torch.diag(stds**2) @ axes.mT)
    errors = torch.randn(count, 2, dtype=dtype, generator=generator) * stds @ axes.mT
    centred = errors - errors.mean(dim=0)
    covariances.append(centred.mT @ centred / (count - 1))
true_covariances, covariances = torch.stack(true_covariances), torch.stack(covariances)
weights = torch.tensor(readings_per_radar, dtype=dtype)
weights = weights / weights.sum()

eigenvalues = torch.linalg.eigvalsh(covariances)
print(
    f"{len(covariances)} radars, {sum(readings_per_radar)} readings; weights "
    + " ".join(f"{w:.3f}" for w in weights.tolist())
)
print(
    f"standard deviations from {eigenvalues.sqrt().min():.2f} m to "
    f"{eigenvalues.sqrt().max():.2f} m, anisotropy up to "
    f"{(eigenvalues[:, 1] / eigenvalues[:, 0]).sqrt().max():.1f}:1"
)
estimation = (covariances - true_covariances).norm(dim=(-2, -1)) / true_covariances.norm(
    dim=(-2, -1)
)
print(f"largest relative error of a sample covariance: {estimation.max():.1%}")

# %%
# The weighted means. Log-Euclidean and log-Cholesky are flat metrics with closed-form
# means (zero iterations); the affine-invariant mean is a Karcher flow started from the
# log-Euclidean one, the Bures-Wasserstein mean a fixed-point iteration started from the
# arithmetic one. Each reports the norm of the Riemannian gradient of its cost at the end.
metrics = {
    "affine-invariant": SPDAffineInvariant(),
    "log-Euclidean": SPDLogEuclidean(),
    "log-Cholesky": SPDLogCholesky(),
    "Bures-Wasserstein": SPDBuresWasserstein(),
}
arithmetic = (weights[:, None, None] * covariances).sum(dim=0)
means = {"arithmetic": arithmetic}
geometric_det = (weights * torch.linalg.det(covariances).log()).sum().exp()


def describe(matrix: torch.Tensor) -> str:
    (a, b), (_, c) = matrix.tolist()
    det, trace = torch.linalg.det(matrix), matrix.trace()
    return f"[[{a:6.3f}, {b:6.3f}], [{b:6.3f}, {c:6.3f}]]  det {det:6.4f}  trace {trace:6.3f}"


print(f"{'arithmetic':17s} {describe(arithmetic)}")
for name, manifold in metrics.items():
    result = manifold.frechet_mean(covariances, weights)
    assert bool(result.converged), f"the {name} mean did not converge"
    means[name] = result.mean
    distances = manifold.dist(result.mean, covariances)
    print(f"{name:17s} {describe(result.mean)}")
    print(
        f"{'':17s} {result.iterations} iterations, converged {bool(result.converged)}, "
        f"gradient norm {float(result.gradient_norm):.1e}; distance to each radar "
        f"{' '.join(f'{d:.2f}' for d in distances.tolist())}"
    )

# %%
# Each mean minimises its own metric's cost, and only its own. The table gives the
# weighted root-mean-square distance ``sqrt(sum_i w_i d(M, C_i)^2)`` from every candidate
# mean (columns) to the six radars, measured under every metric (rows); the diagonal is
# each row's minimum. Rows are not comparable with each other: each metric has its own
# units.
print(f"{'RMS distance':17s}" + "".join(f"{name:>18s}" for name in means))
for name, manifold in metrics.items():
    row = [
        float((weights * manifold.dist2(mean, covariances)).sum().sqrt()) for mean in means.values()
    ]
    print(f"{name:17s}" + "".join(f"{value:18.4f}" for value in row))
    best = row[list(means).index(name)]
    assert best <= min(row) + 1e-9, f"the {name} mean is not the {name} minimiser"

# %%
# Determinants. The affine-invariant, log-Euclidean and log-Cholesky means all average
# log-determinants: ``det(M)`` is exactly the weighted geometric mean of the ``det(C_i)``
# (for log-Cholesky because ``det = prod diag(L)^2`` and the diagonal of the mean's factor
# is the geometric mean of the factors' diagonals). The arithmetic mean swells above it
# (concavity of log det). The Bures-Wasserstein mean averages square roots (for commuting
# inputs it is ``(sum_i w_i C_i^(1/2))^2``). It swells less than the arithmetic mean and
# never exceeds it in the Loewner order (its fixed point ``S = sum_i w_i (S^(1/2) C_i
# S^(1/2))^(1/2)`` and operator convexity of ``t^2`` give ``S^2 <= S^(1/2) A S^(1/2)``
# for the arithmetic mean ``A``), but its determinant is above the geometric mean.
largest_det = torch.linalg.det(covariances).max()
print(
    f"weighted geometric mean of the determinants: {geometric_det:.4f} "
    f"(largest determinant of a radar: {largest_det:.4f})"
)
for name in ("affine-invariant", "log-Euclidean", "log-Cholesky"):
    ratio = torch.linalg.det(means[name]) / geometric_det
    print(f"{name:17s} det(mean) / geometric mean of dets - 1 = {ratio - 1:8.1e}")
    assert abs(ratio - 1) < 1e-10
for name in ("Bures-Wasserstein", "arithmetic"):
    ratio = torch.linalg.det(means[name]) / geometric_det
    print(f"{name:17s} det(mean) / geometric mean of dets     = {ratio:8.3f}")
gap = torch.linalg.eigvalsh(arithmetic - means["Bures-Wasserstein"])
print(f"eigenvalues of arithmetic - Bures-Wasserstein mean: {gap.numpy()} (>= 0)")
assert gap.min() > -1e-12
assert torch.linalg.det(arithmetic) > largest_det
assert torch.linalg.det(arithmetic) > torch.linalg.det(means["Bures-Wasserstein"]) > geometric_det

# %%
# Invariances. If the map frame is rotated (``C -> R C R^T``), should the mean rotate with
# it? Affine-invariant, log-Euclidean and Bures-Wasserstein means do; the log-Cholesky mean
# does not, because a Cholesky factor depends on the directions of the axes. If one axis
# is rescaled (northing in feet, easting in metres: ``C -> A C A^T`` with ``A`` diagonal),
# the log-Euclidean and Bures-Wasserstein means do not follow; the log-Cholesky mean does
# (a positive diagonal ``A`` just scales the Cholesky factor: ``chol(A C A) = A chol(C)``).
# Only the affine-invariant mean is equivariant under every invertible change of
# coordinates.
frames = {
    "rotate by 40 degrees": rotation(torch.tensor(40 * math.pi / 180, dtype=dtype)),
    "northing in feet": torch.diag(torch.tensor([1.0, 1 / 0.3048], dtype=dtype)),
}
print(f"{'relative error of':17s}" + "".join(f"{frame:>22s}" for frame in frames))
equivariance_error = {}
for name, manifold in metrics.items():
    errors = []
    for change in frames.values():
        moved = manifold.frechet_mean(change @ covariances @ change.mT, weights).mean
        expected = change @ means[name] @ change.mT
        errors.append(float((moved - expected).norm() / expected.norm()))
    equivariance_error[name] = errors
    print(f"{name:17s}" + "".join(f"{error:22.1e}" for error in errors))
# Which changes of frame each mean follows (rotation, rescaling), as claimed above.
follows = {
    "affine-invariant": [True, True],
    "log-Euclidean": [True, False],
    "log-Cholesky": [False, True],
    "Bures-Wasserstein": [True, False],
}
for name, errors in equivariance_error.items():
    assert [error < 1e-7 for error in errors] == follows[name], name
    assert all(error < 1e-7 or error > 1e-2 for error in errors), name

# %%
# Geodesics between two very different covariances: radar 2, far away and coarse, and
# radar 6, close and sharp, looking 115 degrees apart. Along the affine-invariant,
# log-Euclidean and log-Cholesky geodesics ``det`` interpolates geometrically,
# ``det(X_t) = det(X_0)^(1 - t) det(X_1)^t``; the straight (Euclidean) segment swells in
# the middle, the Bures-Wasserstein geodesic less so. The log-Cholesky geodesic, tied to
# the coordinate axes, turns the ellipse differently from the other three.
first, second = 1, 5
start, end = covariances[first], covariances[second]
times = [0.0, 0.25, 0.5, 0.75, 1.0]
paths = {
    name: [manifold.geodesic(start, end, t) for t in times] for name, manifold in metrics.items()
}
paths["Euclidean"] = [(1 - t) * start + t * end for t in times]
middle = {name: float(torch.linalg.det(path[2])) for name, path in paths.items()}
geometric_middle = float((torch.linalg.det(start) * torch.linalg.det(end)).sqrt())
print(f"geodesic from radar {first + 1} to radar {second + 1}, det at t = 1/2:")
for name, value in middle.items():
    print(f"  {name:25s} {value:.4f}")
print(f"  {'sqrt(det(start) det(end))':25s} {geometric_middle:.4f}")


# %%
# Each covariance is drawn as its one-standard-deviation ellipse, ``{C^(1/2) u : |u| = 1}``
# (axes along the eigenvectors, half-lengths the square roots of the eigenvalues).
def ellipse(covariance: torch.Tensor, points: int = 120) -> torch.Tensor:
    t = torch.linspace(0, 2 * math.pi, points, dtype=covariance.dtype)
    circle = torch.stack([t.cos(), t.sin()], dim=-1)
    values, vectors = torch.linalg.eigh(covariance)
    return (circle * values.sqrt()) @ vectors.mT


colors = {"arithmetic": "k", "Euclidean": "k"} | {name: f"C{i}" for i, name in enumerate(metrics)}
fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6), gridspec_kw={"width_ratios": [1, 1.3]})
for k, covariance in enumerate(covariances):
    curve = ellipse(covariance)
    left.plot(curve[:, 0], curve[:, 1], color="0.7", lw=1, label="radars" if k == 0 else None)
    values, vectors = torch.linalg.eigh(covariance)
    tip = 1.08 * values[-1].sqrt() * vectors[:, -1] * (1 if vectors[1, -1] >= 0 else -1)
    left.annotate(str(k + 1), tip.tolist(), color="0.45", fontsize=8, ha="center", va="center")
# The affine-invariant and log-Euclidean means nearly coincide: the first is drawn wider.
widths = {"affine-invariant": 4.5}
for name, mean in means.items():
    curve = ellipse(mean)
    style = "--" if name == "arithmetic" else "-"
    width = widths.get(name, 1.8)
    left.plot(curve[:, 0], curve[:, 1], color=colors[name], ls=style, lw=width, label=name)
left.set(aspect="equal", xlabel="easting error (m)", ylabel="northing error (m)")
left.set_title("Radar error covariances and their weighted means")
left.margins(0.08)
left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)

# One row per metric, one column per time: the ellipses sit on a grid.
spacing = 2.2 * float(torch.linalg.eigvalsh(torch.stack([start, end])).max().sqrt())
for row, (name, path) in enumerate(paths.items()):
    for column, point in enumerate(path):
        curve = ellipse(point) + torch.tensor([column * spacing, -row * spacing], dtype=dtype)
        style = "--" if name == "Euclidean" else "-"
        right.plot(curve[:, 0], curve[:, 1], color=colors[name], ls=style, lw=1.5)
right.set_aspect("equal")
right.set_xticks([column * spacing for column in range(len(times))], [f"t = {t}" for t in times])
right.set_yticks([-row * spacing for row in range(len(paths))], list(paths))
right.set_title(f"Geodesics from radar {first + 1} to radar {second + 1}")
right.tick_params(length=0)
fig.tight_layout()
fig.savefig(out / "spd_frechet_means.png", dpi=120, bbox_inches="tight")
print(f"wrote {out / 'spd_frechet_means.png'}")
