"""
Data-parallel training of an SPDNet with DistributedDataParallel and RiemannianAdam
===================================================================================

Trains an SPDNet (``BiMap -> ReEig -> BiMap -> SPDBatchNorm -> LogEig -> Linear``; Stiefel
weights, an SPD batch-norm bias) on synthetic covariance matrices with
:class:`torch.nn.parallel.DistributedDataParallel` (DDP) on the CPU, and checkpoints it so
that a resumed run continues with exactly the same losses. Launch it with ``torchrun``::

    torchrun --nproc_per_node=2 examples/distributed_train.py --steps 200
    torchrun --nproc_per_node=2 examples/distributed_train.py --tiny --steps 10 \\
        --checkpoint ckpt.pt --loss-log first.json
    torchrun --nproc_per_node=2 examples/distributed_train.py --tiny --steps 20 \\
        --resume ckpt.pt --loss-log second.json

Without ``torchrun`` it runs as a single process (a process group of one).

**Data.** Every class ``c`` has a covariance ``Sigma_c``: the same spectrum for all
classes, eigenvectors turned away from a shared frame by a small random rotation (angle
scale ``--separation``). A sample is the sample covariance of ``2 n`` Gaussian vectors
drawn from ``N(0, Sigma_c)`` (a Wishart matrix), so only the orientation of a noisy
ellipsoid tells the classes apart. The training and held-out sets are generated from
``--seed``, identically on every rank: nothing is downloaded or sent.

**Sharding.** At each step a global batch of ``--batch-size`` samples is drawn from a
``torch.Generator`` that every rank seeds alike; rank ``r`` takes the ``r``-th of
``world_size`` equal slices. DDP averages the gradients, so with a mean loss every rank
holds the gradient of the mean of the shard losses, takes the same Riemannian step (the
update is deterministic given identical gradients) and the parameters stay bit-identical
across ranks. :class:`~torsion.nn.SPDBatchNorm` normalises each shard with its own batch
statistics (as :class:`torch.nn.BatchNorm2d` does without ``SyncBatchNorm``); its running
statistics are rank-local until DDP broadcasts rank 0's at the next forward.

**Checkpoints.** ``--checkpoint PATH`` saves, on rank 0 after the last step (and every
``--checkpoint-every`` steps; ``{step}`` in ``PATH`` is replaced by the step), the model's
``state_dict`` (batch-norm running statistics included), the optimizer's, the step count
and the sampler's generator state. ``--resume PATH`` loads it on every rank before DDP
wraps the model; training then continues where it stopped. ``--steps`` is the total step
count, so ``--steps 10 --checkpoint c.pt`` then ``--steps 20 --resume c.pt`` makes the
same 20 steps, with the same losses bit for bit, as one ``--steps 20`` run. The global
RNG only initialises the model, so its state need not be saved.

**Outputs.** Rank 0 prints the loss every ``--log-every`` steps and the accuracy on a
held-out set drawn from the same classes. ``--loss-log PATH`` (rank 0) writes the per-step
losses as JSON, ``{"steps": [...], "losses": [...]}``, the loss of a step being the mean
of the shard losses (what the averaged gradient differentiates); it is not called
``--log``, which torchrun's own parser would take for an abbreviation of its
``--log-dir``. ``--digest-dir DIR`` makes every rank write ``DIR/rank<r>.json`` with the
SHA-256 of its parameters, to check that they agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torsion.nn import BiMap, LogEig, ReEig, SPDBatchNorm, SPDVectorize
from torsion.optim import RiemannianAdam

DTYPE = torch.float64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="total number of steps")
    parser.add_argument("--tiny", action="store_true", help="small matrices and data (CI)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--separation", type=float, default=0.03, help="of the classes")
    parser.add_argument(
        "--checkpoint", type=str, help="save a checkpoint here at the end ('{step}' is filled)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save every this many steps"
    )
    parser.add_argument("--resume", type=Path, help="resume from this checkpoint")
    parser.add_argument("--loss-log", type=Path, help="per-step losses as JSON (rank 0)")
    parser.add_argument("--digest-dir", type=Path, help="per-rank parameter digests")
    parser.add_argument("--log-every", type=int, default=20, help="print every this many")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data


def class_factors(
    num_classes: int, size: int, separation: float, generator: torch.Generator
) -> Tensor:
    """Square roots ``F_c`` of the class covariances ``Sigma_c = F_c F_c^T``.

    ``Sigma_c = Q_c diag(lambda) Q_c^T``: eigenvalues ``lambda`` log-spaced in
    ``[0.1, 10]``, shared by all classes; eigenvectors ``Q_c = expm(separation * A_c) Q``,
    a shared random rotation ``Q`` turned by a random skew-symmetric ``A_c`` (standard
    normal entries) per class. The smaller ``separation``, the harder the task.

    Shapes:
        output ``(num_classes, size, size)``.
    """
    shared = torch.linalg.qr(torch.randn(size, size, dtype=DTYPE, generator=generator))[0]
    a = torch.randn(num_classes, size, size, dtype=DTYPE, generator=generator)
    rotations = torch.linalg.matrix_exp(separation * (a - a.mT) / 2) @ shared
    return rotations * torch.logspace(-1, 1, size, dtype=DTYPE).sqrt()


def wishart_samples(
    factors: Tensor, per_class: int, samples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``per_class`` sample covariances of ``samples`` Gaussian vectors for each class.

    Returns:
        ``(matrices, labels)``: SPD matrices and their ``int64`` class labels.

    Shapes:
        ``factors``: ``(C, n, n)``; ``matrices``: ``(C * per_class, n, n)``; ``labels``:
        ``(C * per_class,)``.
    """
    num_classes, size = factors.shape[0], factors.shape[-1]
    noise = torch.randn(num_classes, per_class, size, samples, dtype=DTYPE, generator=generator)
    x = factors.unsqueeze(1) @ noise
    matrices = (x @ x.mT / samples).flatten(0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return matrices, labels


def spdnet(size: int, hidden: int, out: int, num_classes: int) -> nn.Module:
    """``BiMap -> ReEig -> BiMap -> SPDBatchNorm -> LogEig -> vectorize -> Linear``."""
    return nn.Sequential(
        BiMap(size, hidden, dtype=DTYPE),
        ReEig(),
        BiMap(hidden, out, dtype=DTYPE),
        SPDBatchNorm(out, dtype=DTYPE),
        LogEig(),
        SPDVectorize(),
        nn.Linear(out * (out + 1) // 2, num_classes, dtype=DTYPE),
    )


# ----------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int]:
    """Join torchrun's gloo group, or make a group of one without torchrun."""
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        rendezvous = Path(tempfile.mkdtemp()) / "rendezvous"
        dist.init_process_group("gloo", init_method=rendezvous.as_uri(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of the parameters' bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    template: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, sampler
) -> None:
    """Rank 0 writes to ``template.format(step=step)``; the others wait for it."""
    path = Path(template.format(step=step))
    if dist.get_rank() == 0:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "sampler": sampler.get_state(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    dist.barrier()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    rank, world_size = init_distributed()
    if args.tiny:
        size, hidden, out, num_classes, per_class, batch_size = 6, 5, 4, 3, 24, 12
    else:
        size, hidden, out, num_classes, per_class, batch_size = 16, 10, 6, 4, 250, 64
    batch_size = args.batch_size or batch_size
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world_size} ranks")
    shard = batch_size // world_size

    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    generator = torch.Generator().manual_seed(args.seed)
    factors = class_factors(num_classes, size, args.separation, generator)
    matrices, labels = wishart_samples(factors, per_class, 2 * size, generator)
    test_matrices, test_labels = wishart_samples(factors, per_class, 2 * size, generator)
    torch.manual_seed(args.seed)  # the same initialisation on every rank (DDP broadcasts)
    model = spdnet(size, hidden, out, num_classes)
    optimizer = RiemannianAdam(model.parameters(), lr=args.lr)
    sampler = torch.Generator().manual_seed(args.seed + 1)
    start = 0
    if args.resume is not None:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        start = state["step"]
        if args.steps < start:
            raise ValueError(f"--steps {args.steps} is below the checkpoint's step {start}")
    ddp = DistributedDataParallel(model)

    steps, losses = [], []
    for step in range(start, args.steps):
        batch = torch.randperm(len(labels), generator=sampler)[:batch_size]
        mine = batch[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(matrices[mine]), labels[mine])
        loss.backward()
        optimizer.step()
        done, every = step + 1, args.checkpoint_every
        if args.checkpoint and (done == args.steps or (every > 0 and done % every == 0)):
            save_checkpoint(args.checkpoint, model, optimizer, done, sampler)
        mean_loss = loss.detach() / world_size
        dist.all_reduce(mean_loss)  # the mean of the shard losses, for the log
        steps.append(done)
        losses.append(mean_loss)
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            print(f"step {done:5d}  loss {float(mean_loss):.6f}", flush=True)
    loss_values = [float(loss) for loss in losses]

    if rank == 0 and args.loss_log is not None:
        args.loss_log.parent.mkdir(parents=True, exist_ok=True)
        args.loss_log.write_text(json.dumps({"steps": steps, "losses": loss_values}))
    if args.digest_dir is not None:
        args.digest_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "world_size": world_size, "sha256": parameter_digest(model)}
        (args.digest_dir / f"rank{rank}.json").write_text(json.dumps(record))

    # held-out accuracy in eval mode: every rank classifies its share of the test set with
    # rank 0's running statistics (DDP broadcasts them at this forward)
    ddp.eval()
    with torch.no_grad():
        mine = torch.arange(rank, len(test_labels), world_size)
        correct = (ddp(test_matrices[mine]).argmax(-1) == test_labels[mine]).sum()
    dist.all_reduce(correct)
    if rank == 0:
        accuracy = int(correct) / len(test_labels)
        print(f"{world_size} ranks, {args.steps} steps: test accuracy {accuracy:.3f}")
    # Teardown. Gloo's worker threads drop a finished collective's tensors on their own;
    # for a tensor whose Python object is already gone that takes the GIL, while the
    # process group's destructor joins those threads holding the GIL: a deadlock (seen in
    # about one run in ten when DDP's reducer held the last reference to the group, so
    # that it died with this function's locals). So every tensor a collective touched (the
    # loss tensors, `correct`, the model's) is still alive here, and the group dies inside
    # destroy_process_group, after DDP has let go of it.
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    return loss_values


if __name__ == "__main__":
    main()
