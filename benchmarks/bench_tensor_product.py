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

**The kernel table** (``--device cuda``): torsion's Triton backend (``backend="triton"``)
against its ``torch`` backend, e3nn's pipeline and cuEquivariance's channelwise product
plus ``index_add`` (when ``cuequivariance_torch`` is installed; its weight order differs
from e3nn's, so it is checked for shape and finiteness only), float32, on the MACE/NequIP
problem at C = 32 and 128 and an L = 3 variant (C = 32), E = 1e5 and 1e6 (``--quick``:
1e4), with N = E / 10: forward, forward + backward and double backward; for the forward
the achieved GB/s (the fused byte floor above over the time) and the fraction of the
measured device copy bandwidth. Target (TARGETS.md): >= 60 % of the roofline and >= 10x
e3nn on an H100. An anchor that runs out of GPU memory is reported as ``OOM``. Without a
GPU, ``--quick`` also runs this table on tiny problems through Triton's CPU interpreter,
so its code path is exercised in CI (those times mean nothing).

    python benchmarks/bench_tensor_product.py [--quick] [--threads N] [--repeats N] [--out DIR]
    python benchmarks/bench_tensor_product.py --device cuda [--quick] [--repeats N]
        [--edges 100000 ...] [--channels 32 ...]
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

import torch
from e3nn import o3

from _harness import (
    CorrectnessError,
    Timing,
    check_close,
    environment_line,
    fmt_ms,
    fmt_ratio,
    parse_args,
    ratio,
    render_table,
    setup,
    synchronize,
    time_fn,
    time_fns,
    write_results,
)
from torsion.kernels import convert_layout, torch_conv, torch_tensor_product
from torsion.reps import TPDescriptor

SEED = 20260524
PASSES = ("forward", "forward_backward", "double_backward")


def descriptor(channels: int, lmax: int = 2) -> TPDescriptor:
    """``Cx0e+Cx1o+...+Cx(lmax)`` (x) ``0e+1o+...`` -> ``0e+1o+...``, uvu, in ``ir_mul``."""
    irreps = [f"{l}{'eo'[l % 2]}" for l in range(lmax + 1)]
    features = "+".join(f"{channels}x{ir}" for ir in irreps)
    return TPDescriptor.channelwise(features, "+".join(irreps), "+".join(irreps), layout="ir_mul")


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


def copy_bandwidth(dtype: torch.dtype, quick: bool, device: str = "cpu") -> float:
    """Bytes per second of a large ``copy_`` (read + write), the memory roofline."""
    n = (1 << 22) if quick else (1 << 26)
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=5, device=device)
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


# -- the kernel table: torsion's Triton backend on a GPU -----------------------------------

#: Problems of the kernel table: (name, channels, lmax). ``--quick`` shrinks the channels.
KERNEL_PROBLEMS = (("MACE/NequIP", 32, 2), ("MACE/NequIP", 128, 2), ("L = 3", 32, 3))
KERNEL_EDGES = (100_000, 1_000_000)
#: The CPU smoke run of the kernel table (``--quick`` without a GPU, Triton's interpreter).
SMOKE_CHANNELS, SMOKE_EDGES = 4, (24,)


def cuequivariance_pipeline(d: TPDescriptor, dtype: torch.dtype, device: str):
    """cuEquivariance's channelwise product as message passing (its fused gather / scatter
    through ``indices_1`` / ``indices_out`` when its version has them, else
    ``index_select`` and ``index_add``), or a string saying why not (not installed, or its
    API refused the problem).

    Its weights are not in e3nn's order, so only the shape and finiteness of its output
    are checked; it is an anchor for time only.
    """
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet
    except ImportError:
        return "not installed"
    try:
        tp = cuet.ChannelWiseTensorProduct(
            cue.Irreps("O3", str(d.irreps_in1)),
            cue.Irreps("O3", str(d.irreps_in2)),
            cue.Irreps("O3", str(d.irreps_out.simplify())),
            layout=cue.ir_mul,
            shared_weights=False,
            internal_weights=False,
            device=device,
            dtype=dtype,
            math_dtype=dtype,
        )
    except Exception as error:  # an anchor's API drift must not hide our own numbers
        return f"{type(error).__name__}: {error}"
    fused = "indices_out" in inspect.signature(tp.forward).parameters

    def run(x, attr, weight, src, dst, num_nodes):
        if fused:
            return tp(x, attr, weight, indices_1=src, indices_out=dst, size_out=num_nodes)
        messages = tp(x.index_select(0, src), attr, weight)
        return messages.new_zeros((num_nodes, messages.shape[1])).index_add(0, dst, messages)

    run.weight_numel = tp.weight_numel
    return run


def run_kernel_problem(
    name: str, channels: int, lmax: int, num_edges: int, device: str, args
) -> dict:
    """One row group of the kernel table: torsion's ``triton`` backend against its
    ``torch`` backend, e3nn's pipeline and cuEquivariance's (when installed), float32,
    forward / forward + backward / double backward, interleaved."""
    from torsion.kernels import conv

    dtype = torch.float32
    gen = torch.Generator().manual_seed(SEED)
    d = descriptor(channels, lmax)
    num_nodes = max(num_edges // 10, 2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    x = randn(num_nodes, d.irreps_in1.dim)
    attr = randn(num_edges, d.irreps_in2.dim)
    weight = randn(num_edges, d.weight_numel)
    probe = randn(num_nodes, d.irreps_out.dim)
    src, dst = (torch.randint(0, num_nodes, (num_edges,), generator=gen).to(device) for _ in "ab")
    # leaves shared by every candidate (gradients are taken with autograd.grad): five copies
    # of the per-edge weights would not fit next to e3nn at E = 1e6, C = 128
    leaves = [t.requires_grad_() for t in (x, attr, weight)]
    inputs = {"triton": leaves, "torch": leaves}

    def torsion_run(backend: str):
        return lambda x_, a_, w_: conv(d, x_, a_, w_, src, dst, num_nodes, backend=backend)

    runs = {"triton": torsion_run("triton"), "torch": torsion_run("torch")}
    # correctness before timing: the Triton kernels against the torch backend
    ours, ref = (runs[m](*inputs[m]) for m in ("triton", "torch"))
    errors = {"forward": check_close("triton forward", ours, ref, rtol=2e-4, atol=2e-4)}
    for label, a, b in zip(
        ("grad x", "grad attr", "grad w"),
        torch.autograd.grad((ours * probe).sum(), inputs["triton"]),
        torch.autograd.grad((ref * probe).sum(), inputs["torch"]),
        strict=True,
    ):
        errors[label] = check_close(label, a, b, rtol=2e-4, atol=2e-4 * float(b.abs().max()))
    del ours, ref

    anchors: dict[str, str] = {}
    tp = e3nn_module(d, dtype).to(device)
    x_e3nn = convert_layout(x, d.irreps_in1, "ir_mul", "mul_ir")
    probe_e3nn = convert_layout(probe, d.irreps_out, "ir_mul", "mul_ir")

    def e3nn_run(x_, a_, w_):
        messages = tp(x_.index_select(0, src), a_, w_)
        return messages.new_zeros((num_nodes, d.irreps_out.dim)).index_add(0, dst, messages)

    runs["e3nn"] = e3nn_run
    inputs["e3nn"] = [x_e3nn.detach().requires_grad_(), *leaves[1:]]
    probes = {"triton": probe, "torch": probe, "e3nn": probe_e3nn}
    cue_run = cuequivariance_pipeline(d, dtype, device) if device.startswith("cuda") else None
    if callable(cue_run):
        cue_in = [leaves[0], leaves[1], randn(num_edges, cue_run.weight_numel).requires_grad_()]
        cue_out = cue_run(*cue_in, src, dst, num_nodes)
        if cue_out.shape != (num_nodes, d.irreps_out.dim) or not cue_out.isfinite().all():
            anchors["cuEquivariance"] = f"unexpected output {tuple(cue_out.shape)}"
        else:
            runs["cuEquivariance"] = lambda x_, a_, w_: cue_run(x_, a_, w_, src, dst, num_nodes)
            inputs["cuEquivariance"], probes["cuEquivariance"] = cue_in, probe
    elif cue_run is not None:
        anchors["cuEquivariance"] = cue_run

    timings: dict[str, dict[str, object]] = {m: {} for m in runs}
    for pass_name in PASSES:
        fns = {m: pass_fns(runs[m], inputs[m], probes[m])[pass_name] for m in runs}
        for m in list(fns):  # an anchor that runs out of memory is reported, not fatal
            try:
                fns[m]()
            except torch.OutOfMemoryError:
                timings[m][pass_name] = "OOM"
                del fns[m]
            synchronize(device)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        try:
            measured = time_fns(fns, warmup=args.warmup, repeats=args.repeats, device=device)
        except torch.OutOfMemoryError:  # together they do not fit: one candidate at a time
            measured = {}
            for m, fn in fns.items():
                torch.cuda.empty_cache()
                try:
                    measured |= time_fns(
                        {m: fn}, warmup=args.warmup, repeats=args.repeats, device=device
                    )
                except torch.OutOfMemoryError:
                    timings[m][pass_name] = "OOM"
        for m, t in measured.items():
            timings[m][pass_name] = t
    return {
        "problem": name,
        "channels": channels,
        "lmax": lmax,
        "edges": num_edges,
        "nodes": num_nodes,
        "timings": timings,
        "anchors": anchors,
        "fused_forward_bytes": fused_forward_bytes(d, num_edges, num_nodes, 4),
        "correctness": errors,
    }


def kernel_table(records: list[dict], env: dict, bandwidth: float, smoke: bool) -> str:
    """The kernel table: time, achieved GB/s and roofline fraction of the fused forward,
    and every anchor as a ratio over the Triton time."""
    anchors = ["torch", "e3nn", "cuEquivariance"]
    headers = ["problem", "C", "E", "pass", "triton ms", "GB/s", "roofline"]
    headers += [f"{a} ms" for a in anchors] + [f"{a} / triton" for a in anchors]
    rows = []
    for r in records:
        for pass_name in PASSES:
            ours = r["timings"]["triton"][pass_name]
            cells, ratios = [], []
            for a in anchors:
                t = r["timings"].get(a, {}).get(pass_name, r["anchors"].get(a, "-"))
                if isinstance(t, Timing):
                    cells.append(fmt_ms(t.median_ms))
                    ratios.append(fmt_ratio(ratio(t.median_ms, ours.median_ms)))
                else:
                    cells.append(str(t)[:40])
                    ratios.append("-")
            gbps = roof = ""
            if pass_name == "forward":
                achieved = r["fused_forward_bytes"] / (ours.median_ms * 1e-3)
                gbps, roof = f"{achieved / 1e9:.0f}", f"{100 * achieved / bandwidth:.0f} %"
            head = [r["problem"], r["channels"], r["edges"], pass_name.replace("_", " ")]
            rows.append([*head, fmt_ms(ours.median_ms), gbps, roof, *cells, *ratios])
    return (
        f"torsion's Triton kernels (backend='triton', sorted reduction) on {env['device_name']}"
        + (" through Triton's CPU interpreter (a smoke run: times mean nothing)" if smoke else "")
        + ", "
        f"float32, uvu with per-edge weights, N = E / 10 nodes; median ms; ratio = anchor / "
        f"triton (> 1: Triton faster). torch = torsion's torch backend; e3nn = gather -> "
        f"TensorProduct -> index_add. GB/s: the fused-forward byte floor over the forward "
        f"time; roofline: that over the measured copy bandwidth "
        f"({bandwidth / 1e9:.0f} GB/s).\n\n" + render_table(headers, rows)
    )


def selected_problems(args) -> list[tuple[str, int, int]]:
    """The kernel problems that ``--channels`` and ``--lmax`` select (all by default)."""
    return [
        p
        for p in KERNEL_PROBLEMS
        if (args.channels is None or p[1] in args.channels)
        and (args.lmax is None or p[2] in args.lmax)
    ]


def kernel_main(args, env: dict, device: str, smoke: bool) -> None:
    """Run the kernel table on ``device``; ``smoke``: Triton's interpreter on tiny problems."""
    problems = selected_problems(args)
    edges = args.edges or ((10_000,) if args.quick else KERNEL_EDGES)
    if smoke:
        problems = [(name, SMOKE_CHANNELS, lmax) for name, _, lmax in KERNEL_PROBLEMS[1:]]
        edges = SMOKE_EDGES
    bandwidth = copy_bandwidth(torch.float32, args.quick or smoke, device)
    records = []
    for name, channels, lmax in problems:
        for num_edges in edges:
            records.append(run_kernel_problem(name, channels, lmax, num_edges, device, args))
            print(f"done: {name}, {channels} channels, E = {num_edges}", flush=True)
    table = kernel_table(records, env, bandwidth, smoke)
    print()
    print(table)
    json_path, md_path = write_results("tensor_product_triton", args, env, records, table)
    print(f"\nwrote {json_path} and {md_path}")


# -- the launch-settings sweep (--sweep) ----------------------------------------------------

#: CSR settings (the forward and the ``x_node`` gradient): edges per step x warps, one row
#: per program; then the settings of the per-edge gradient and atomic kernels.
SWEEP_CSR = tuple(
    {"block_e_csr": e, "few_warps": w, "warps": w} for e in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)
)
SWEEP_EDGE = tuple({"block_e": e, "warps": w} for e in (8, 16, 32) for w in (2, 4, 8))


def sweep_problem(
    name: str, channels: int, lmax: int, num_edges: int, device: str, args, sweeps: dict
):
    """Kernel-only times of every setting of the sweep, each checked against the default
    settings' result: the CSR forward and ``x_node`` gradient, the per-edge gradients and
    the atomic forward."""
    from torsion.kernels.triton._ops import (
        conv_edge_grads,
        conv_node,
        descriptor_handle,
        launch_settings,
    )

    gen = torch.Generator().manual_seed(SEED)
    d = descriptor(channels, lmax)
    num_nodes = max(num_edges // 10, 2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    x, attr = randn(num_nodes, d.irreps_in1.dim), randn(num_edges, d.irreps_in2.dim)
    weight, g = randn(num_edges, d.weight_numel), randn(num_nodes, d.irreps_out.dim)
    src, dst = (torch.randint(0, num_nodes, (num_edges,), generator=gen).to(device) for _ in "ab")
    h = descriptor_handle(d)
    kernels = {
        "csr": {
            "forward": lambda: conv_node(h, False, False, x, attr, weight, src, dst, num_nodes),
            "x gradient": lambda: conv_node(h, True, False, g, attr, weight, src, dst, num_nodes),
        },
        "edge": {
            "edge gradients": lambda: conv_edge_grads(h, x, attr, weight, g, src, dst),
            "atomic forward": lambda: conv_node(
                h, False, True, x, attr, weight, src, dst, num_nodes
            ),
        },
    }
    rows = []
    for group, settings in sweeps.items():
        expected = {}
        for changes in (None, *settings):
            with launch_settings(**(changes or {})):
                fns = kernels[group]
                outputs = {k: fn() for k, fn in fns.items()}
                timings = time_fns(fns, warmup=args.warmup, repeats=args.repeats, device=device)
            for kernel, out in outputs.items():
                out = torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out
                if changes is None:
                    expected[kernel] = out
                scale = float(expected[kernel].abs().max()) or 1.0
                rows.append(
                    {
                        "problem": name,
                        "channels": channels,
                        "edges": num_edges,
                        "kernel": kernel,
                        "settings": changes or "default",
                        "ms": timings[kernel].median_ms,
                        "error": float((out - expected[kernel]).abs().max()) / scale,
                    }
                )
    return rows


def sweep_table(rows: list[dict], env: dict, smoke: bool) -> str:
    headers = ["problem", "C", "E", "kernel", "settings", "ms", "default / this", "max rel error"]
    default = {
        (r["problem"], r["channels"], r["kernel"]): r["ms"]
        for r in rows
        if r["settings"] == "default"
    }
    table_rows = [
        [
            r["problem"],
            r["channels"],
            r["edges"],
            r["kernel"],
            r["settings"]
            if isinstance(r["settings"], str)
            else " ".join(f"{k}={v}" for k, v in r["settings"].items()),
            fmt_ms(r["ms"]),
            fmt_ratio(ratio(default[(r["problem"], r["channels"], r["kernel"])], r["ms"])),
            f"{r['error']:.1e}",
        ]
        for r in rows
    ]
    return (
        f"Launch settings of torsion's Triton kernels on {env['device_name']}"
        + (" through Triton's CPU interpreter (a smoke run: times mean nothing)" if smoke else "")
        + ", float32, kernels alone (no sort, no checks), median ms; default / this > 1: the "
        "setting is faster than the default (torsion.kernels.triton._ops.LaunchSettings); "
        "error: against the default's result, relative to its largest entry.\n\n"
        + render_table(headers, table_rows)
    )


def sweep_main(args, env: dict, device: str, smoke: bool) -> None:
    """Run the launch-settings sweep on ``device`` (``smoke``: two settings of each group
    on a tiny problem through the interpreter)."""
    problems = selected_problems(args)
    edges = args.edges or ((10_000,) if args.quick else (1_000_000,))
    sweeps = {"csr": SWEEP_CSR, "edge": SWEEP_EDGE}
    if smoke:
        problems, edges = [("MACE/NequIP", SMOKE_CHANNELS, 2)], SMOKE_EDGES
        sweeps = {"csr": SWEEP_CSR[:1] + SWEEP_CSR[-1:], "edge": SWEEP_EDGE[:1]}
    rows = []
    for name, channels, lmax in problems:
        for num_edges in edges:
            rows += sweep_problem(name, channels, lmax, num_edges, device, args, sweeps)
            print(f"swept: {name}, {channels} channels, E = {num_edges}", flush=True)
    table = sweep_table(rows, env, smoke)
    print()
    print(table)
    worst = max(r["error"] for r in rows)
    if worst > 1e-4:
        raise CorrectnessError(f"a launch setting changed a kernel's result by {worst:.1e}")
    json_path, md_path = write_results("tensor_product_sweep", args, env, rows, table)
    print(f"\nwrote {json_path} and {md_path}")


def _kernel_options(parser) -> None:
    """Subsets of the kernel table, to split a GPU run into shorter ones."""
    parser.add_argument(
        "--edges", type=int, nargs="+", default=None, help="kernel table: edge counts"
    )
    parser.add_argument(
        "--channels", type=int, nargs="+", default=None, help="kernel table: channel counts"
    )
    parser.add_argument(
        "--lmax", type=int, nargs="+", default=None, help="kernel table: largest l (2 or 3)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="with --device cuda: the launch-settings sweep"
    )


def main() -> int:
    args = parse_args(__doc__, extra=_kernel_options)
    env = setup(args)
    env["e3nn"] = __import__("e3nn").__version__
    print(environment_line(env) + f", e3nn {env['e3nn']}", flush=True)
    if args.device.startswith("cuda"):
        if args.sweep:
            sweep_main(args, env, args.device, smoke=False)
        else:
            kernel_main(args, env, args.device, smoke=False)
        return 0
    if args.device != "cpu":
        print("run this benchmark with --device cpu or --device cuda", file=sys.stderr)
        return 2
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
    if args.quick and importlib.util.find_spec("triton") is not None:
        # the kernel table's code path, so that it cannot rot before a GPU runs it
        os.environ["TRITON_INTERPRET"] = "1"
        kernel_main(args, env, "cpu", smoke=True)
        sweep_main(args, env, "cpu", smoke=True)
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
