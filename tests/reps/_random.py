"""Random irreps and e3nn-style instructions for descriptor and kernel tests."""

from __future__ import annotations

import random

from e3nn import o3

MODES = ("uvw", "uvu", "uuu")


def random_irreps(rng: random.Random, *, lmax: int = 4, blocks: int = 3, muls=(2, 3)) -> o3.Irreps:
    """1 to ``blocks`` entries with random ``l <= lmax``, both parities, and multiplicities."""
    return o3.Irreps(
        [
            (rng.choice(muls), (rng.randint(0, lmax), rng.choice((-1, 1))))
            for _ in range(rng.randint(1, blocks))
        ]
    )


def random_problem(
    rng: random.Random, modes=MODES, *, lmax: int = 4, muls=(2, 3), keep=0.7, min_paths=4
):
    """Irreps and a shuffled instruction list (at least ``min_paths``) using ``modes``.

    The output irreps are drawn from actual products of the inputs (so many paths are
    allowed), with the multiplicity of ``in1`` half of the time (so ``uvu``/``uuu`` fit).
    Draws again until there are ``min_paths`` instructions.
    """
    while True:
        problem = _draw_problem(rng, modes, lmax, muls, keep)
        if len(problem[3]) >= min_paths:
            return problem


def _draw_problem(rng, modes, lmax, muls, keep):
    irreps1 = random_irreps(rng, lmax=lmax, muls=muls)
    irreps2 = random_irreps(rng, lmax=lmax, muls=muls)
    out = []
    for _ in range(rng.randint(2, 5)):
        mul1, ir1 = rng.choice(list(irreps1))
        _, ir2 = rng.choice(list(irreps2))
        ir = rng.choice([ir for ir in ir1 * ir2 if ir.l <= lmax])
        out.append((mul1 if rng.random() < 0.5 else rng.choice(muls), ir))
    irreps_out = o3.Irreps(out)
    instructions = []
    for i1, (mul1, ir1) in enumerate(irreps1):
        for i2, (mul2, ir2) in enumerate(irreps2):
            for i_out, (mul_out, ir_out) in enumerate(irreps_out):
                if ir_out not in ir1 * ir2 or rng.random() > keep:
                    continue
                allowed = [
                    mode
                    for mode in modes
                    if mode == "uvw"
                    or (mode == "uvu" and mul1 == mul_out)
                    or (mode == "uuu" and mul1 == mul2 == mul_out)
                ]
                if allowed:
                    mode = rng.choice(allowed)
                    weighted = mode == "uvw" or rng.random() < 0.7
                    instructions.append((i1, i2, i_out, mode, weighted))
    rng.shuffle(instructions)
    return irreps1, irreps2, irreps_out, instructions
