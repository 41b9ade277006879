"""SPDNet: torsion.nn vs SPD Learn, in one run.

The network of issue 6: BiMap 32 -> 16, ReEig, BiMap 16 -> 8, ReEig, LogEig, upper-triangle
vectorisation, Linear(36, 4), on a batch of 64 SPD 32 x 32 matrices. For each library:

* forward + backward time per batch, eager (float32 and float64) and under
  ``torch.compile`` (float32; SPD Learn without ``fullgraph``, since it breaks the graph);
* the graph-break count of forward + loss from ``torch._dynamo.explain``.

SPD Learn is used as its users get it: ``BiMap`` with its default orthogonal
parametrization (the Cayley map recomputed on every forward) and its own Loewner-matrix
backward for ReEig/LogEig. Correctness first: with SPD Learn's (parametrized) BiMap
weights copied into torsion's, the log-domain feature matrices agree to 1e-9 in float64.

    python benchmarks/bench_spdnet.py [--quick] [--out DIR] [--repeats N] [--threads N]
"""

from __future__ import annotations

import sys

import torch
from spd_learn import modules as spdl
from torch import nn

from _harness import (
    check_close,
    environment_line,
    fmt_ms,
    fmt_ratio,
    parse_args,
    ratio,
    render_table,
    setup,
    time_fns,
    write_results,
)
from torsion.nn import BiMap, LogEig, ReEig, SPDVectorize

SEED = 20261124
SIZES = (32, 16, 8)
CLASSES = 4
EPS = 1e-4


def torsion_features() -> nn.Sequential:
    a, b, c = SIZES
    return nn.Sequential(BiMap(a, b), ReEig(EPS), BiMap(b, c), ReEig(EPS), LogEig())


def spd_learn_features() -> nn.Sequential:
    a, b, c = SIZES
    return nn.Sequential(
        spdl.BiMap(a, b),
        spdl.ReEig(threshold=EPS),
        spdl.BiMap(b, c),
        spdl.ReEig(threshold=EPS),
        spdl.LogEig(upper=False, flatten=False),
    )


def classifier(features: nn.Module, vectorize: nn.Module) -> nn.Sequential:
    c = SIZES[-1]
    return nn.Sequential(features, vectorize, nn.Linear(c * (c + 1) // 2, CLASSES))


class _UpperTriangle(nn.Module):
    """SPD Learn's vectorisation for the head (its LogEig(upper=True) does the same)."""

    def forward(self, x):
        rows, cols = torch.triu_indices(x.shape[-1], x.shape[-1], device=x.device)
        return x[..., rows, cols]


def spd_batch(batch: int, n: int, dtype, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(batch, n, 2 * n, dtype=torch.float64, generator=gen)
    return (a @ a.mT / (2 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)).to(dtype)


def copy_bimap_weights(theirs: nn.Sequential, ours: nn.Sequential) -> None:
    """SPD Learn's (parametrized, orthonormal) BiMap weights into torsion's."""
    with torch.no_grad():
        for i in (0, 2):
            ours[i].weight.copy_(theirs[i].weight[None])


def check_agreement(gen: torch.Generator) -> None:
    torch.manual_seed(SEED)
    ours = torsion_features().double()
    theirs = spd_learn_features().double()
    copy_bimap_weights(theirs, ours)
    x = spd_batch(8, SIZES[0], torch.float64, gen)
    check_close("SPDNet features vs SPD Learn", ours(x), theirs(x), rtol=1e-9, atol=1e-9)


def graph_breaks(model: nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(lambda a: model(a).square().sum())(x).graph_break_count


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    return step


def measure(batch: int, args, gen: torch.Generator) -> list[dict]:
    records = []
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    for dtype in (torch.float32, torch.float64):
        x = spd_batch(batch, SIZES[0], dtype, gen)
        torch.manual_seed(SEED)
        models = {
            "torsion": classifier(torsion_features(), SPDVectorize()).to(dtype),
            "SPD Learn": classifier(spd_learn_features(), _UpperTriangle()).to(dtype),
        }
        steps = {name: train_step(m, x, y) for name, m in models.items()}
        if dtype == torch.float32:
            breaks = {name: graph_breaks(m, x) for name, m in models.items()}
            compiled = {
                "torsion": torch.compile(models["torsion"], fullgraph=True),
                "SPD Learn": torch.compile(models["SPD Learn"]),
            }
            steps.update({f"{name} compiled": train_step(m, x, y) for name, m in compiled.items()})
        timed = time_fns(steps, warmup=args.warmup, repeats=args.repeats)
        ms = {name: t.median_ms for name, t in timed.items()}
        record = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "ms": ms}
        if dtype == torch.float32:
            record["graph_breaks"] = breaks
        records.append(record)
        print(f"{record['dtype']}: {ms}", flush=True)
    return records


def table(records: list[dict]) -> str:
    headers = ["dtype", "mode", "torsion ms", "SPD Learn ms", "SPD Learn/torsion"]
    rows = []
    for r in records:
        for mode, suffix in [("eager", ""), ("compiled", " compiled")]:
            if f"torsion{suffix}" not in r["ms"]:
                continue
            ours, theirs = r["ms"][f"torsion{suffix}"], r["ms"][f"SPD Learn{suffix}"]
            rows.append(
                [r["dtype"], mode, fmt_ms(ours), fmt_ms(theirs), fmt_ratio(ratio(theirs, ours))]
            )
    breaks = next(r["graph_breaks"] for r in records if "graph_breaks" in r)
    return (
        f"SPDNet {' -> '.join(map(str, SIZES))} + Linear, forward+backward per batch of "
        f"{records[0]['batch']} (median ms; ratio > 1: torsion faster)\n\n"
        + render_table(headers, rows)
        + "\n\nGraph breaks (torch._dynamo.explain, forward + loss): "
        + ", ".join(f"{name} {count}" for name, count in breaks.items())
    )


def main() -> int:
    args = parse_args(__doc__)
    env = setup(args)
    if args.device != "cpu":
        print("bench_spdnet runs on CPU only", file=sys.stderr)
        return 2
    print(environment_line(env), flush=True)
    gen = torch.Generator().manual_seed(SEED)
    check_agreement(gen)
    records = measure(8 if args.quick else 64, args, gen)
    text = table(records)
    print()
    print(text)
    print()
    print(environment_line(env))
    json_path, md_path = write_results("spdnet", args, env, records, text)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
