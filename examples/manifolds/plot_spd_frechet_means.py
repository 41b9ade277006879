"""
Frechet means of covariance matrices under four SPD metrics
============================================================

Averaging covariance matrices is the first step of most SPD pipelines (batch-norm
statistics, class prototypes, Riemannian classifiers). The arithmetic mean of covariances
"swells": its determinant exceeds that of every input when they point different ways.
Riemannian means fix this, and each metric does it differently.

The data: six 2-D sensors measure the same noisy planar motion, each with its own noise
level and orientation. Their sample covariances are genuine 2x2 SPD matrices with a spread
of scales and directions. We average them under the affine-invariant, log-Euclidean,
log-Cholesky and Bures-Wasserstein metrics, print what distinguishes the means, and draw
each matrix as its one-standard-deviation ellipse.
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
generator = torch.Generator().manual_seed(7)
dtype = torch.float64

# %%
# Simulated sensors: anisotropic Gaussian noise, rotated per sensor, plus a common motion.
sensors, samples = 6, 200 if quick else 2000
angles = torch.linspace(0, math.pi, sensors + 1, dtype=dtype)[:-1]
scales = torch.tensor([[3.0, 0.4], [2.0, 0.3], [1.2, 1.0], [4.0, 0.6], [0.8, 0.2], [2.5, 1.5]])
rotation = torch.stack(
    [torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)],
    dim=-2,
)
motion = 0.5 * torch.randn(samples, 2, dtype=dtype, generator=generator)
noise = torch.randn(sensors, samples, 2, dtype=dtype, generator=generator) * scales[:, None, :]
readings = motion + noise @ rotation.mT
centred = readings - readings.mean(dim=1, keepdim=True)
covariances = centred.mT @ centred / (samples - 1)
weights = torch.full((sensors,), 1.0 / sensors, dtype=dtype)

# %%
# The means. The log-Euclidean and log-Cholesky ones are closed forms; the
# affine-invariant one is a Karcher flow, the Bures-Wasserstein one a fixed-point
# iteration. Each reports whether the Riemannian gradient of its cost vanished.
metrics = {
    "affine-invariant": SPDAffineInvariant(),
    "log-Euclidean": SPDLogEuclidean(),
    "log-Cholesky": SPDLogCholesky(),
    "Bures-Wasserstein": SPDBuresWasserstein(),
}
means = {"arithmetic": covariances.mean(dim=0)}
geometric_det = torch.linalg.det(covariances).log().mean().exp()
print(f"geometric mean of the determinants: {geometric_det:.4f}")
print(
    f"{'metric':18s} {'det':>8s} {'trace':>8s} {'iterations':>10s} {'gradient':>9s} {'spread':>8s}"
)
for name, manifold in metrics.items():
    result = manifold.frechet_mean(covariances, weights)
    assert bool(result.converged), f"{name} mean did not converge"
    spread = manifold.dist(result.mean, covariances).pow(2).mean().sqrt()
    means[name] = result.mean
    print(
        f"{name:18s} {torch.linalg.det(result.mean):8.4f} {result.mean.trace():8.4f} "
        f"{result.iterations:10d} {float(result.gradient_norm):9.1e} {spread:8.4f}"
    )
arithmetic = means["arithmetic"]
print(f"{'arithmetic':18s} {torch.linalg.det(arithmetic):8.4f} {arithmetic.trace():8.4f}")

# %%
# What distinguishes them: the affine-invariant and log-Euclidean means have exactly the
# geometric mean of the determinants (both average log det), while the arithmetic mean
# swells and the Bures-Wasserstein mean, an average of square roots, sits in between.
for name in ("affine-invariant", "log-Euclidean"):
    relative = abs(torch.linalg.det(means[name]) / geometric_det - 1)
    print(f"{name}: det(mean) / geometric mean of dets - 1 = {relative:.1e}")
    assert relative < 1e-8
assert torch.linalg.det(arithmetic) > torch.linalg.det(means["Bures-Wasserstein"]) > geometric_det


# %%
def ellipse(covariance: torch.Tensor, points: int = 100) -> torch.Tensor:
    """The one-standard-deviation ellipse of a 2x2 covariance, as (points, 2)."""
    t = torch.linspace(0, 2 * math.pi, points, dtype=covariance.dtype)
    circle = torch.stack([t.cos(), t.sin()], dim=-1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return circle * eigenvalues.sqrt() @ eigenvectors.mT


fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
for covariance in covariances:
    curve = ellipse(covariance)
    left.plot(curve[:, 0], curve[:, 1], color="0.75", lw=1)
styles = {"arithmetic": ("k", "--")} | {name: (f"C{i}", "-") for i, name in enumerate(metrics)}
for name, mean in means.items():
    curve = ellipse(mean)
    color, line = styles[name]
    left.plot(curve[:, 0], curve[:, 1], color=color, ls=line, lw=2, label=name)
left.set(aspect="equal", title="Sensor covariances (grey) and their means")
left.legend(fontsize=8, loc="lower left")

# Geodesics between the two most different sensors, drawn at t = 0, 1/4, ..., 1.
a, b = covariances[0], covariances[3]
for i, manifold in enumerate(metrics.values()):
    for t in torch.linspace(0, 1, 5):
        curve = ellipse(manifold.geodesic(a, b, float(t))) + torch.tensor([6.0 * i, 0.0])
        right.plot(curve[:, 0], curve[:, 1], color=f"C{i}", lw=1 + 1.5 * float(t))
right.set(aspect="equal", title="Geodesics from sensor 1 (thin) to sensor 4 (thick)")
right.set_xticks([6.0 * i for i in range(len(metrics))], list(metrics), fontsize=8)
right.set_yticks([])
fig.tight_layout()
fig.savefig(out / "spd_frechet_means.png", dpi=120)
print(f"wrote {out / 'spd_frechet_means.png'}")
