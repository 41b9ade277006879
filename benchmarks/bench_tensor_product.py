"""Tensor product and equivariant message passing: torsion's ``torch`` backend vs e3nn.

The NequIP/MACE problem (TARGETS.md section 3): the channelwise ``uvu`` tensor product
``Cx0e+Cx1o+Cx2e (x) 0e+1o+2e -> 0e+1o+2e`` with per-edge weights (``C = 128``: 11 paths,
1408 weights, output dimension 4480; and ``C = 32``), on a random graph of ``N = E / 10``
nodes and ``E = 10,000`` edges, float32 and float64. Compared in one run:

* **TP forward**: the tensor product on already-gathered edge inputs
  (``torch_tensor_product`` vs ``e3nn.o3.TensorProduct``);
* **message passing** (gather -> TP -> scatter-sum): torsion's fused
  :func:`torsion.kernels.torch_conv` against e3nn's unfused pipeline
  ``zeros.index_add(0, dst, tp(x[src], edge_attr, w))``: forward, forward + backward
  (gradients for node features, edge attributes and weights of ``<out, G>``) and double
  backward as in force training (the gradient of ``sum_i |grad_i|^2`` over those first
  gradients).

torsion runs in its channels-contiguous ``ir_mul`` layout (a model keeps its features
there; the conversion is done once, outside the timing) and e3nn in its ``mul_ir``. Before
anything is timed, torsion's forward and first gradients are checked against e3nn's.

The fraction of the memory roofline the fused forward reaches is ``t_floor / t`` with
``t_floor`` the time to move the bytes a fused kernel cannot avoid (per-edge weights, edge
attributes and indices, node features read once, the output written once) at the
bandwidth of a large ``copy_`` measured in the same run.

Targets (TARGETS.md): forward + backward >= 3x e3nn's unfused pipeline, double backward >=
5x. This machine is shared; numbers are noisy, ratios less so (timings are interleaved).

    python benchmarks/bench_tensor_product.py [--quick] [--threads N] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from e3nn import o3

from _harness import (
    check_close,
    environment_line,
    fmt_ms,
    fmt_ratio,
    parse_args,
    ratio,
    render_table,
    setup,
    time_fn,
    time_fns,
    write_results,
)
from torsion.kernels import convert_layout, torch_conv, torch_tensor_product
from torsion.reps import TPDescriptor

SEED = 20260524
PASSES = ("forward", "forward_backward", "double_backward")


def descriptor(channels: int) -> TPDescriptor:
    irreps = f"{channels}x0e+{channels}x1o+{channels}x2e"
    return TPDescriptor.channelwise(irreps, "0e+1o+2e", "0e+1o+2e", layout="ir_mul")


def e3nn_module(d: TPDescriptor, dtype: torch.dtype) -> o3.TensorProduct:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # e3nn builds its CG buffers in the default dtype
    try:
        return d.to_e3nn(shared_weights=False, internal_weights=False)
    finally:
        torch.set_default_dtype(previous)


def pass_fns(
    run: Callable[..., torch.Tensor], inputs: list[torch.Tensor], probe: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """Forward, forward + backward of ``<out, probe>``, and the force-training double
    backward (gradient of the summed squared first gradients)."""

    def forward() -> None:
        run(*inputs)

    def forward_backward() -> None:
        torch.autograd.grad((run(*inputs) * probe).sum(), inputs)

    def double_backward() -> None:
        grads = torch.autograd.grad((run(*inputs) * probe).sum(), inputs, create_graph=True)
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)

    return {
        "forward": forward,
        "forward_backward": forward_backward,
        "double_backward": double_backward,
    }


def copy_bandwidth(dtype: torch.dtype, quick: bool) -> float:
    """Bytes per second of a large ``copy_`` (read + write), the memory roofline."""
    n = (1 << 22) if quick else (1 << 26)
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=5)
    return 2 * src.numel() * src.element_size() / (t.min_ms * 1e-3)


def fused_forward_bytes(d: TPDescriptor, num_edges: int, num_nodes: int, itemsize: int) -> int:
    """Bytes a fused forward must move: per-edge weights, attributes and two int64 indices,
    node features read once and the output written once."""
    per_edge = (d.weight_numel + d.irreps_in2.dim) * itemsize + 16
    per_node = (d.irreps_in1.dim + d.irreps_out.dim) * itemsize
    return num_edges * per_edge + num_nodes * per_node


def run_problem(channels: int, dtype: torch.dtype, num_edges: int, args) -> dict:
    gen = torch.Generator().manual_seed(SEED)
    d = descriptor(channels)
    tp = e3nn_module(d, dtype)
    num_nodes = max(num_edges // 10, 2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = randn(num_nodes, d.irreps_in1.dim)  # ir_mul
    attr = randn(num_edges, d.irreps_in2.dim)
    weight = randn(num_edges, d.weight_numel)
    probe = randn(num_nodes, d.irreps_out.dim)  # ir_mul
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    x_e3nn = convert_layout(x, d.irreps_in1, "ir_mul", "mul_ir")
    probe_e3nn = convert_layout(probe, d.irreps_out, "ir_mul", "mul_ir")

    def torsion_mp(x_, attr_, w_):
        return torch_conv(d, x_, attr_, w_, src, dst, num_nodes)

    def e3nn_mp(x_, attr_, w_):
        messages = tp(x_.index_select(0, src), attr_, w_)
        return messages.new_zeros((num_nodes, d.irreps_out.dim)).index_add(0, dst, messages)

    # correctness before timing: forward and first gradients against e3nn
    tol = {torch.float32: 2e-4, torch.float64: 1e-9}[dtype]
    ours_in = [t.clone().requires_grad_() for t in (x, attr, weight)]
    theirs_in = [t.clone().requires_grad_() for t in (x_e3nn, attr, weight)]
    ours, theirs = torsion_mp(*ours_in), e3nn_mp(*theirs_in)
    errors = {
        "forward": check_close(
            "message passing forward",
            convert_layout(ours, d.irreps_out, "ir_mul", "mul_ir"),
            theirs,
            rtol=tol,
            atol=tol,
        )
    }
    ours_grads = torch.autograd.grad((ours * probe).sum(), ours_in)
    theirs_grads = torch.autograd.grad((theirs * probe_e3nn).sum(), theirs_in)
    ours_grads = (
        convert_layout(ours_grads[0], d.irreps_in1, "ir_mul", "mul_ir"),
        *ours_grads[1:],
    )
    for name, a, b in zip(("grad x", "grad attr", "grad w"), ours_grads, theirs_grads, strict=True):
        errors[name] = check_close(name, a, b, rtol=tol, atol=tol * float(b.abs().max()))
    del ours, theirs, ours_grads, theirs_grads

    # TP forward alone, on gathered inputs
    x_edges, x_edges_e3nn = x.index_select(0, src), x_e3nn.index_select(0, src)
    with torch.no_grad():
        tp_timings = time_fns(
            {
                "torsion": lambda: torch_tensor_product(d, x_edges, attr, weight),
                "e3nn": lambda: tp(x_edges_e3nn, attr, weight),
            },
            warmup=args.warmup,
            repeats=args.repeats,
        )

    fns = {}
    for method, run, inputs, g in (
        ("torsion", torsion_mp, ours_in, probe),
        ("e3nn", e3nn_mp, theirs_in, probe_e3nn),
    ):
        for name, fn in pass_fns(run, inputs, g).items():
            fns[(method, name)] = fn
    # e3nn's double backward is slow: fewer repeats keep the full run in minutes.
    slow = {key: fns.pop(key) for key in list(fns) if key[1] == "double_backward"}
    mp_timings = time_fns(fns, warmup=args.warmup, repeats=args.repeats)
    mp_timings.update(
        time_fns(slow, warmup=min(args.warmup, 1), repeats=max(1, min(args.repeats, 5)))
    )

    itemsize = torch.finfo(dtype).bits // 8
    floor_bytes = fused_forward_bytes(d, num_edges, num_nodes, itemsize)
    return {
        "channels": channels,
        "dtype": str(dtype).removeprefix("torch."),
        "edges": num_edges,
        "nodes": num_nodes,
        "tp_forward": tp_timings,
        "message_passing": {f"{m} {p}": t for (m, p), t in mp_timings.items()},
        "fused_forward_bytes": floor_bytes,
        "correctness": errors,
    }


def main() -> int:
    args = parse_args(__doc__)
    env = setup(args)
    if args.device != "cpu":
        print("this benchmark compares CPU paths; run it with --device cpu", file=sys.stderr)
        return 2
    env["e3nn"] = __import__("e3nn").__version__
    print(environment_line(env) + f", e3nn {env['e3nn']}", flush=True)
    num_edges = 400 if args.quick else 10_000
    channels_list = (8,) if args.quick else (128, 32)
    bandwidth = copy_bandwidth(torch.float32, args.quick)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)
    records = []
    for channels in channels_list:
        for dtype in (torch.float32, torch.float64):
            record = run_problem(channels, dtype, num_edges, args)
            record["bandwidth_GBps"] = bandwidth / 1e9
            records.append(record)
            print(f"done: {channels} channels, {record['dtype']}", flush=True)
    table = main_table(records, env)
    print()
    print(table)
    json_path, md_path = write_results("tensor_product", args, env, records, table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def main_table(records: list[dict], env: dict) -> str:
    headers = [
        "C",
        "dtype",
        "measurement",
        "torsion ms",
        "e3nn ms",
        "e3nn / torsion",
        "roofline",
    ]
    rows = []
    for r in records:
        tp, mp = r["tp_forward"], r["message_passing"]
        rows.append(
            [
                r["channels"],
                r["dtype"],
                "TP forward",
                fmt_ms(tp["torsion"].median_ms),
                fmt_ms(tp["e3nn"].median_ms),
                fmt_ratio(ratio(tp["e3nn"].median_ms, tp["torsion"].median_ms)),
                "",
            ]
        )
        for name in PASSES:
            ours, theirs = mp[f"torsion {name}"], mp[f"e3nn {name}"]
            roof = ""
            if name == "forward":
                floor_ms = r["fused_forward_bytes"] / (r["bandwidth_GBps"] * 1e9) * 1e3
                roof = f"{100 * floor_ms / ours.median_ms:.0f} %"
            rows.append(
                [
                    r["channels"],
                    r["dtype"],
                    f"message passing {name.replace('_', ' ')}",
                    fmt_ms(ours.median_ms),
                    fmt_ms(theirs.median_ms),
                    fmt_ratio(ratio(theirs.median_ms, ours.median_ms)),
                    roof,
                ]
            )
    r0 = records[0]
    return (
        f"Channelwise uvu tensor product Cx0e+Cx1o+Cx2e (x) 0e+1o+2e with per-edge weights, "
        f"E = {r0['edges']} edges, N = {r0['nodes']} nodes, on {env['threads']} thread(s); "
        f"median ms, ratio = e3nn / torsion (> 1: torsion faster). Message passing is "
        f"torsion's fused conv vs e3nn's gather -> TensorProduct -> index_add; double "
        f"backward is the force-training pattern (gradient of summed squared gradients). "
        f"Roofline: fused-forward byte floor at the measured copy bandwidth "
        f"({r0['bandwidth_GBps']:.1f} GB/s) over the fused forward time.\n\n"
        + render_table(headers, rows)
    )


if __name__ == "__main__":
    sys.exit(main())
