"""
Gradients through matrix logarithms, starting at the identity
=============================================================

Covariance matrices of multichannel signals are symmetric positive definite (SPD), and
SPD models measure them with matrix logarithms. Gradient-based fitting usually starts at
the identity, where every eigenvalue is repeated: autograd through
``torch.linalg.eigh`` divides by the eigenvalue gaps there and returns NaN.
:func:`torsion.linalg.sym_logm` and friends use the Daleckii-Krein backward, which is
exact at repeated eigenvalues.

The task: simulate trials of a coupled four-channel autoregressive process, take their
covariance matrices, and fit their affine-invariant (Karcher) mean
``argmin_X sum_i ||logm(X^-1/2 C_i X^-1/2)||^2`` by gradient descent on ``X = expm(S)``
from ``S = 0``, that is from the identity. The result is checked against the classic
fixed-point iteration for the Karcher mean.
"""

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from torsion.linalg import sym_expm, sym_invsqrtm, sym_logm, sym_sqrtm

quick = os.environ.get("TORSION_QUICK") == "1"
out = Path(os.environ.get("TORSION_OUT", "."))
generator = torch.Generator().manual_seed(0)
dtype = torch.float64

# %%
# Simulated signals: x_t = A x_{t-1} + noise, with a ring coupling between channels.
channels, samples, trials = 4, 200 if quick else 1000, 10 if quick else 40
coupling = 0.5 * torch.eye(channels, dtype=dtype) + 0.3 * torch.roll(
    torch.eye(channels, dtype=dtype), 1, dims=1
)
x = torch.zeros(trials, channels, dtype=dtype)
signal = []
for _ in range(samples):
    x = x @ coupling.T + torch.randn(trials, channels, dtype=dtype, generator=generator)
    signal.append(x)
signal = torch.stack(signal, dim=1)  # (trials, samples, channels)
centred = signal - signal.mean(dim=1, keepdim=True)
covariances = centred.mT @ centred / (samples - 1)
spectra = torch.linalg.eigvalsh(covariances)
print(f"{trials} covariance matrices, eigenvalues from {spectra.min():.3f} to {spectra.max():.3f}")


# %%
# The cost, written once and evaluated with two matrix-function implementations.
def karcher_cost(s, logm, expm, invsqrtm):
    w = invsqrtm(expm(s))
    return logm(w @ covariances @ w).pow(2).sum() / (2 * trials)


def eigh_function(f):
    def apply(a):
        lam, q = torch.linalg.eigh(a)
        return (q * f(lam).unsqueeze(-2)) @ q.mT

    return apply


autograd_eigh = (eigh_function(torch.log), eigh_function(torch.exp), eigh_function(torch.rsqrt))
ours = (sym_logm, sym_expm, sym_invsqrtm)

s0 = torch.zeros(channels, channels, dtype=dtype, requires_grad=True)
for name, functions in [("autograd through eigh", autograd_eigh), ("torsion.linalg", ours)]:
    (grad,) = torch.autograd.grad(karcher_cost(s0, *functions), s0)
    print(
        f"gradient at the identity, {name:22s}: {int((~grad.isfinite()).sum())} non-finite entries"
    )

# %%
# Gradient descent from the identity with torsion's functions.
s = torch.zeros(channels, channels, dtype=dtype, requires_grad=True)
optimizer = torch.optim.SGD([s], lr=0.5)
losses = []
for _ in range(30 if quick else 100):
    optimizer.zero_grad()
    loss = karcher_cost(s, *ours)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
fitted = sym_expm(s.detach())

# %%
# Reference: the fixed-point iteration X <- X^1/2 expm(mean_i logm(X^-1/2 C_i X^-1/2)) X^1/2.
mean = covariances.mean(dim=0)
for _ in range(100):
    root, inverse_root = sym_sqrtm(mean), sym_invsqrtm(mean)
    mean = root @ sym_expm(sym_logm(inverse_root @ covariances @ inverse_root).mean(0)) @ root
error = (fitted - mean).norm() / mean.norm()
print(f"final cost {losses[-1]:.6f}; relative distance to the fixed-point Karcher mean {error:.2e}")
assert error < 1e-6, "gradient descent did not reach the Karcher mean"

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.semilogy([loss - losses[-1] + 1e-16 for loss in losses])
left.set(xlabel="step", ylabel="cost - final cost", title="Gradient descent from the identity")
right.plot(spectra.T.numpy(), color="0.7", lw=0.8)
right.plot(torch.linalg.eigvalsh(fitted).numpy(), "o-", color="C1", label="Karcher mean")
right.set(xlabel="eigenvalue index", ylabel="eigenvalue", title="Spectra of the trials")
right.legend()
fig.tight_layout()
fig.savefig(out / "spd_log_gradients.png", dpi=120)
print(f"wrote {out / 'spd_log_gradients.png'}")
