"""
Log-Euclidean class means of signal covariances, fitted from the identity
=========================================================================

Covariance matrices of multichannel signals are symmetric positive definite (SPD), and SPD
models compare them through matrix logarithms. Gradient-based fitting usually starts at
the identity (SPD batch-norm biases and SPDNet weights are initialised there), where every
eigenvalue is repeated: autograd through ``torch.linalg.eigh`` divides by eigenvalue gaps
and returns NaN. :func:`torsion.linalg.sym_logm` uses the Daleckii-Krein backward, which is
exact at repeated eigenvalues.

The task: simulate three classes of a coupled four-channel autoregressive process, fit
each class's log-Euclidean Frechet mean ``argmin_X sum_i ||logm(X) - logm(C_i)||^2`` by
gradient-based optimisation of ``X = A A^T`` starting from ``A = I``, check it against the
closed form ``expm(mean_i logm(C_i))``, and classify held-out trials by the nearest mean.
"""

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from torsion.linalg import sym_expm, sym_logm

quick = os.environ.get("TORSION_QUICK") == "1"
out = Path(os.environ.get("TORSION_OUT", "."))
out.mkdir(parents=True, exist_ok=True)
generator = torch.Generator().manual_seed(0)
dtype = torch.float64

# %%
# Signals x_t = M x_{t-1} + noise; the classes differ only in how the channels couple.
channels, samples, trials = 4, 200 if quick else 1000, 8 if quick else 20
eye = torch.eye(channels, dtype=dtype)
neighbours = torch.diag(torch.ones(channels - 1, dtype=dtype), 1)
couplings = {
    "independent": 0.5 * eye,
    "ring": 0.5 * eye + 0.3 * torch.roll(eye, 1, dims=1),
    "chain": 0.5 * eye + 0.25 * (neighbours + neighbours.T),
}


def covariances(coupling):
    x, signal = torch.zeros(2 * trials, channels, dtype=dtype), []
    for _ in range(samples):
        x = x @ coupling.T + torch.randn(2 * trials, channels, dtype=dtype, generator=generator)
        signal.append(x)
    centred = torch.stack(signal, dim=1)  # (trial, time, channel)
    centred = centred - centred.mean(dim=1, keepdim=True)
    return centred.mT @ centred / (samples - 1)


data = torch.stack([covariances(m) for m in couplings.values()])  # (class, trial, n, n)
train, test = data[:, :trials], data[:, trials:]
train_logs = sym_logm(train)
print(f"{len(couplings)} classes x {trials} training covariances of {channels} channels")


# %%
# The cost, evaluated with two implementations of the matrix logarithm.
def eigh_logm(x):
    lam, q = torch.linalg.eigh(x)
    return (q * lam.log().unsqueeze(-2)) @ q.mT


def cost(a, logm):
    residual = logm(a @ a.mT).unsqueeze(1) - train_logs
    return residual.pow(2).sum(dim=(-2, -1)).mean(dim=1).sum() / 2


start = eye.repeat(len(couplings), 1, 1).requires_grad_()
for name, logm in [("autograd through eigh", eigh_logm), ("torsion.linalg.sym_logm", sym_logm)]:
    (grad,) = torch.autograd.grad(cost(start, logm), start)
    bad = f"{int((~grad.isfinite()).sum())} of {grad.numel()}"
    print(f"gradient at the identity, {name:23s}: {bad} entries non-finite")

# %%
# Minimise from A = I with L-BFGS and compare with the closed form.
a = start.detach().clone().requires_grad_()
optimizer = torch.optim.LBFGS(
    [a], max_iter=50 if quick else 100, tolerance_change=1e-15, line_search_fn="strong_wolfe"
)
losses = []


def closure():
    optimizer.zero_grad()
    loss = cost(a, sym_logm)
    loss.backward()
    losses.append(loss.item())
    return loss


optimizer.step(closure)
fitted = (a @ a.mT).detach()
# The closed form, and the cost there (A = expm(L / 2) gives A A^T = expm(L)).
closed_form = sym_expm(train_logs.mean(dim=1))
optimum = cost(sym_expm(train_logs.mean(dim=1) / 2), sym_logm).item()
error = ((fitted - closed_form).norm(dim=(-2, -1)) / closed_form.norm(dim=(-2, -1))).max()
print(f"{len(losses)} cost evaluations; largest relative error to the closed form {error:.1e}")
assert error < 1e-6, "the fitted means do not match the closed form"

# %%
# Nearest log-Euclidean mean on the held-out trials.
distances = (sym_logm(test).unsqueeze(2) - sym_logm(fitted)).norm(dim=(-2, -1))
accuracy = (distances.argmin(dim=-1) == torch.arange(len(couplings)).unsqueeze(1)).double().mean()
print(f"nearest-mean accuracy on {test.shape[0] * test.shape[1]} held-out trials: {accuracy:.1%}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.semilogy([max(loss - optimum, 1e-16) for loss in losses])
left.set(xlabel="cost evaluation", ylabel="cost - optimum", title="Fit from the identity")
for k, name in enumerate(couplings):
    right.plot(torch.linalg.eigvalsh(test[k]).log().T.numpy(), color=f"C{k}", alpha=0.25, lw=0.8)
    right.plot(torch.linalg.eigvalsh(fitted[k]).log().numpy(), "o-", color=f"C{k}", label=name)
right.set(xlabel="eigenvalue index", ylabel="log eigenvalue", title="Held-out trials and means")
right.legend()
fig.tight_layout()
fig.savefig(out / "spd_log_gradients.png", dpi=120)
print(f"wrote {out / 'spd_log_gradients.png'}")
