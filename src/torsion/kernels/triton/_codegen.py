"""Generate, cache and import the Triton source of one descriptor's kernels.

Each supported descriptor (channelwise ``uvu`` paths whose second input has multiplicity
1: the message-passing case) gets its own Python module of ``@triton.jit`` kernels, written
out as text:

* the Clebsch-Gordan nonzeros, already multiplied by each path's coefficient, are unrolled
  as compile-time constants (``tl.full((), value, dtype)``, exact in float64);
* every irrep component is one register tile of ``BLOCK_E`` edges x ``BLOCK_C`` channels,
  so the paths into one output irrep add into the same tiles and each output component is
  written once;
* tensor offsets are int64 (large graphs overflow int32 offsets).

Three kernels are generated per descriptor and dtype:

* ``node_csr``: a program owns ``BLOCK_N`` receiving rows of a CSR (edges sorted by
  receiver through a permutation) and a block of channels, loops over each row's edges
  and accumulates the messages in registers: deterministic;
* ``node_atomic``: a program owns a block of edges and channels and adds its messages
  into the receivers with ``tl.atomic_add``: for unsorted edges;
* ``edge_grads``: the per-edge gradients (edge attributes and edge weights), which need
  no reduction over edges; a program owns a block of edges and loops over the channels.

The two node kernels exist for two *programs*: the forward (gather ``x_node`` by sender,
scatter to receivers) and its transpose (gather the output gradient by receiver, scatter
to senders: the gradient of ``x_node``), whose Clebsch-Gordan terms are the forward's with
the first input and output indices swapped.

Generated files live in :func:`cache_dir`, named by a hash of the descriptor, dtype and
codegen version, and are reused across processes. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated, so the imported module is cached per
process *and* per interpreter mode.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path as FilePath
from types import ModuleType

import torch
from e3nn import o3

from torsion.reps import PathMode, TPDescriptor

__all__ = [
    "CODEGEN_VERSION",
    "cache_dir",
    "generate_source",
    "interpreter_enabled",
    "kernel_module",
    "kernel_source_path",
    "live_tiles",
    "max_multiplicity",
    "unsupported_descriptor_reason",
]

#: Bumped whenever the generated source changes, so stale cache files are never imported.
CODEGEN_VERSION = 1

_DTYPES = {torch.float32: "tl.float32", torch.float64: "tl.float64"}

# A Wigner 3j entry below this (relative to the largest) is float noise of e3nn's change
# of basis, not a coupling.
_CG_ZERO = 1e-10


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (Triton's own parsing)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cache_dir() -> FilePath:
    """Where generated kernel sources are written.

    ``$TORSION_CACHE_DIR/triton`` when ``TORSION_CACHE_DIR`` is set, otherwise
    ``$XDG_CACHE_HOME/torsion/triton`` (``~/.cache/torsion/triton`` by default).
    """
    root = os.environ.get("TORSION_CACHE_DIR")
    if root:
        return FilePath(root) / "triton"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return FilePath(xdg) / "torsion" / "triton"


def unsupported_descriptor_reason(descriptor: TPDescriptor) -> str | None:
    """What of ``descriptor`` the Triton kernels do not run, in words, or ``None``."""
    for index, path in enumerate(descriptor.paths):
        if path.mode is not PathMode.uvu:
            return f"path {index} has mode {path.mode.value!r} (the kernels run 'uvu' paths only)"
        mul2 = descriptor.irreps_in2[path.in2].mul
        if mul2 != 1:
            return (
                f"path {index} reads block {path.in2} of irreps_in2 with multiplicity {mul2} "
                "(the kernels need multiplicity 1 there, as in message passing)"
            )
    return None


def max_multiplicity(descriptor: TPDescriptor) -> int:
    """The largest channel count of ``irreps_in1`` and ``irreps_out`` (at least 1)."""
    return max([1, *(m for m, _ in descriptor.irreps_in1), *(m for m, _ in descriptor.irreps_out)])


# -- the programs the kernels evaluate ----------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One ``mul x ir`` block of a feature row: where it starts, its channels, its size."""

    offset: int
    mul: int
    dim: int


@dataclass(frozen=True)
class _Contraction:
    """One path as the kernels see it: ``out[k] += w * sum c * gathered[i] * attr[j]``.

    ``terms`` are ``(i, j, k, c)`` with ``c`` the Clebsch-Gordan entry times the path
    coefficient; ``weight_offset`` is where the path's ``mul`` weights start in a weight
    row, or ``None`` for an unweighted path.
    """

    gathered: int
    attr: int
    out: int
    weight_offset: int | None
    terms: tuple[tuple[int, int, int, float], ...]


@dataclass(frozen=True)
class _Program:
    gathered: tuple[_Block, ...]
    attr: tuple[_Block, ...]
    out: tuple[_Block, ...]
    contractions: tuple[_Contraction, ...]


def _blocks(irreps: o3.Irreps) -> tuple[_Block, ...]:
    return tuple(
        _Block(piece.start, mul, ir.dim)
        for piece, (mul, ir) in zip(irreps.slices(), irreps, strict=True)
    )


def _forward_program(descriptor: TPDescriptor) -> _Program:
    contractions = []
    for path, where in zip(descriptor.paths, descriptor.weight_slices, strict=True):
        l1 = descriptor.irreps_in1[path.in1].ir.l
        l2 = descriptor.irreps_in2[path.in2].ir.l
        l_out = descriptor.irreps_out[path.out].ir.l
        cg = o3.wigner_3j(l1, l2, l_out, dtype=torch.float64)
        cutoff = _CG_ZERO * float(cg.abs().max())
        terms = tuple(
            (i, j, k, path.path_weight * float(cg[i, j, k]))
            for i, j, k in torch.nonzero(cg.abs() > cutoff).tolist()
        )
        offset = None if where is None else where.start
        contractions.append(_Contraction(path.in1, path.in2, path.out, offset, terms))
    return _Program(
        _blocks(descriptor.irreps_in1),
        _blocks(descriptor.irreps_in2),
        _blocks(descriptor.irreps_out),
        tuple(contractions),
    )


def _transposed_program(forward: _Program) -> _Program:
    """The program of the ``x_node`` gradient: gather the output gradient, emit ``in1``."""
    return _Program(
        forward.out,
        forward.attr,
        forward.gathered,
        tuple(
            _Contraction(
                c.out,
                c.attr,
                c.gathered,
                c.weight_offset,
                tuple((k, j, i, v) for i, j, k, v in c.terms),
            )
            for c in forward.contractions
        ),
    )


# -- source generation --------------------------------------------------------------------


class _Emitter:
    """Lines of a kernel body with its deduplicated compile-time constants."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.constants: dict[float, str] = {}
        self.lines: list[str] = []

    def constant(self, value: float) -> str:
        name = self.constants.get(value)
        if name is None:
            name = self.constants[value] = f"K{len(self.constants)}"
        return name

    def emit(self, line: str, indent: int) -> None:
        self.lines.append("    " * indent + line)

    def constant_lines(self, indent: int) -> list[str]:
        # tl.full keeps the literal in the kernel's dtype: a bare Python float would be
        # rounded to float32 first.
        return [
            "    " * indent + f"{name} = tl.full((), {value!r}, {self.dtype})"
            for value, name in self.constants.items()
        ]


# The kernels use only builtins of ``triton.language``, never its ``@jit`` helpers
# (``tl.sum``, ``tl.zeros``): those are decorated when triton is imported, so if triton was
# imported before ``TRITON_INTERPRET=1`` was set, the interpreter could not call them.
# Sums reduce with triton's own combine function when it exists (the interpreter maps it to
# a numpy sum, and the compiler sees exactly ``tl.sum``), else with an equivalent one.
_PRELUDE = (
    "try:",
    "    from triton.language.standard import _sum_combine",
    "except ImportError:",
    "",
    "    @triton.jit",
    "    def _sum_combine(a, b):",
    "        return a + b",
)


def _element(block: _Block, component: int, layout: str) -> str:
    """Offset expression of component ``component`` of channels ``c`` of ``block``."""
    if layout == "ir_mul":
        return f"({block.offset + component * block.mul} + c)"
    return f"({block.offset + component} + c * {block.dim})"


def _channel_masks(program: _Program, em: _Emitter, indent: int) -> None:
    for mul in sorted({b.mul for b in (*program.gathered, *program.out)}):
        em.emit(f"cm{mul} = (c < {mul})[None, :]", indent)


def _load_attr(program: _Program, em: _Emitter, indent: int, edges: str = "e") -> None:
    used = sorted({(c.attr, j) for c in program.contractions for _, j, _, _ in c.terms})
    for b, j in used:
        offset = program.attr[b].offset + j
        em.emit(
            f"a{b}_{j} = tl.load(attr_ptr + {edges} * stride_attr + {offset}, mask=emask, "
            "other=0.0)[:, None]",
            indent,
        )


def _load_tiles(
    name: str,
    pointer: str,
    rows: str,
    stride: str,
    blocks: tuple[_Block, ...],
    used: set[tuple[int, int]],
    layout: str,
    em: _Emitter,
    indent: int,
) -> None:
    for b, i in sorted(used):
        block = blocks[b]
        em.emit(
            f"{name}{b}_{i} = tl.load({pointer} + {rows}[:, None] * {stride} + "
            f"{_element(block, i, layout)}[None, :], mask=emask[:, None] & cm{block.mul}, "
            "other=0.0)",
            indent,
        )


def _load_weights(program: _Program, em: _Emitter, indent: int) -> None:
    for p, c in enumerate(program.contractions):
        if c.weight_offset is None:
            continue
        mul = program.out[c.out].mul
        em.emit(
            f"w{p} = tl.load(w_ptr + e[:, None] * stride_w + ({c.weight_offset} + c)[None, :], "
            f"mask=emask[:, None] & cm{mul}, other=0.0)",
            indent,
        )


def _path_outputs(contraction: _Contraction, em: _Emitter) -> dict[int, str]:
    """``{k: expression}``: the unweighted path output per output component, as
    ``sum_i (sum_j c * attr[j]) * gathered[i]`` (the attr factor is per edge, cheap)."""
    by_k: dict[int, dict[int, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for i, j, k, value in contraction.terms:
        by_k[k][i].append((j, value))
    g, b = contraction.gathered, contraction.attr
    outputs = {}
    for k, by_i in sorted(by_k.items()):
        parts = []
        for i, js in sorted(by_i.items()):
            coefficient = " + ".join(f"{em.constant(v)} * a{b}_{j}" for j, v in js)
            parts.append(f"({coefficient}) * x{g}_{i}")
        outputs[k] = " + ".join(parts)
    return outputs


def _messages(program: _Program, em: _Emitter, indent: int) -> list[tuple[int, int]]:
    """Emit ``m{o}_{k}`` message tiles; return the output components reached."""
    reached: list[tuple[int, int]] = []
    for p, c in enumerate(program.contractions):
        for k, expression in _path_outputs(c, em).items():
            term = f"({expression})" if c.weight_offset is None else f"w{p} * ({expression})"
            name = f"m{c.out}_{k}"
            if (c.out, k) in reached:
                em.emit(f"{name} = {name} + {term}", indent)
            else:
                reached.append((c.out, k))
                em.emit(f"{name} = {term}", indent)
    return sorted(reached)


def _used_gathered(program: _Program) -> set[tuple[int, int]]:
    return {(c.gathered, i) for c in program.contractions for i, _, _, _ in c.terms}


@functools.lru_cache(maxsize=256)
def live_tiles(descriptor: TPDescriptor) -> int:
    """The ``BLOCK_E x BLOCK_C`` tiles a node kernel of ``descriptor`` holds at once:
    gathered irrep components, weight tiles and message components (the same count for
    the transposed program)."""
    program = _forward_program(descriptor)
    weights = sum(c.weight_offset is not None for c in program.contractions)
    messages = {(c.out, k) for c in program.contractions for _, _, k, _ in c.terms}
    return len(_used_gathered(program)) + weights + len(messages)


def _node_csr_kernel(program: _Program, layout: str, dtype: str) -> list[str]:
    em = _Emitter(dtype)
    body = 2
    _channel_masks(program, em, 1)
    em.emit("for r in range(BLOCK_N):", 1)
    em.emit("n = pid_n * BLOCK_N + r", body)
    em.emit("valid = (n + tl.full((BLOCK_C,), 0, tl.int64)) < num_rows", body)
    em.emit("start = tl.load(rowptr_ptr + tl.minimum(n, num_rows))", body)
    em.emit("end = tl.load(rowptr_ptr + tl.minimum(n + 1, num_rows))", body)
    # The accumulators are inserted here once the messages (and so the reached output
    # components) are known.
    accumulators_at = len(em.lines)
    em.emit("for p0 in range(start, end, BLOCK_E):", body)
    inner = body + 1
    em.emit("pos = p0 + tl.arange(0, BLOCK_E).to(tl.int64)", inner)
    em.emit("emask = pos < end", inner)
    em.emit("e = tl.load(order_ptr + pos, mask=emask, other=0).to(tl.int64)", inner)
    em.emit("rows = tl.load(gather_ptr + e, mask=emask, other=0).to(tl.int64)", inner)
    _load_attr(program, em, inner)
    _load_tiles("x", "node_ptr", "rows", "stride_node", program.gathered,
                _used_gathered(program), layout, em, inner)  # fmt: skip
    _load_weights(program, em, inner)
    reached = _messages(program, em, inner)
    for o, k in reached:
        em.emit(f"acc{o}_{k} += tl.reduce(m{o}_{k}, 0, _sum_combine)", inner)
    em.lines[accumulators_at:accumulators_at] = [
        "    " * body + f"acc{o}_{k} = tl.full((BLOCK_C,), 0.0, {dtype})" for o, k in reached
    ]
    for o, k in reached:
        block = program.out[o]
        em.emit(
            f"tl.store(out_ptr + n * stride_out + {_element(block, k, layout)}, acc{o}_{k}, "
            f"mask=valid & (c < {block.mul}))",
            body,
        )
    header = [
        "@triton.jit",
        "def node_csr(node_ptr, attr_ptr, w_ptr, out_ptr, gather_ptr, order_ptr, rowptr_ptr,",
        "             num_rows, stride_node, stride_attr, stride_w, stride_out,",
        "             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):",
        "    pid_n = tl.program_id(0).to(tl.int64)",
        "    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)",
    ]
    return header + em.constant_lines(1) + em.lines


def _node_atomic_kernel(program: _Program, layout: str, dtype: str) -> list[str]:
    em = _Emitter(dtype)
    _channel_masks(program, em, 1)
    em.emit("rows = tl.load(gather_ptr + e, mask=emask, other=0).to(tl.int64)", 1)
    em.emit("targets = tl.load(scatter_ptr + e, mask=emask, other=0).to(tl.int64)", 1)
    _load_attr(program, em, 1)
    _load_tiles("x", "node_ptr", "rows", "stride_node", program.gathered,
                _used_gathered(program), layout, em, 1)  # fmt: skip
    _load_weights(program, em, 1)
    for o, k in _messages(program, em, 1):
        block = program.out[o]
        em.emit(
            f"tl.atomic_add(out_ptr + targets[:, None] * stride_out + "
            f"{_element(block, k, layout)}[None, :], m{o}_{k}, "
            f"mask=emask[:, None] & cm{block.mul}, sem='relaxed')",
            1,
        )
    header = [
        "@triton.jit",
        "def node_atomic(node_ptr, attr_ptr, w_ptr, out_ptr, gather_ptr, scatter_ptr,",
        "                num_edges, stride_node, stride_attr, stride_w, stride_out,",
        "                BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):",
        "    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)",
        "    emask = e < num_edges",
        "    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)",
    ]
    return header + em.constant_lines(1) + em.lines


def _edge_grads_kernel(program: _Program, layout: str, dtype: str, max_mul: int) -> list[str]:
    """Per-edge gradients of ``<g[dst], TP(x[src], attr, w)>`` wrt ``attr`` and ``w``."""
    em = _Emitter(dtype)
    used_attr = sorted({(c.attr, j) for c in program.contractions for _, j, _, _ in c.terms})
    for b, j in used_attr:
        em.emit(f"ga{b}_{j} = tl.full((BLOCK_E,), 0.0, {dtype})", 1)
    em.emit("if NEED_W:", 1)
    _load_attr(program, em, 2)
    em.emit("pass", 2)
    em.emit(f"for c0 in range(0, {max_mul}, BLOCK_C):", 1)
    body = 2
    em.emit("c = c0 + tl.arange(0, BLOCK_C)", body)
    _channel_masks(program, em, body)
    used_out = {(c.out, k) for c in program.contractions for _, _, k, _ in c.terms}
    _load_tiles("x", "x_ptr", "src", "stride_x", program.gathered,
                _used_gathered(program), layout, em, body)  # fmt: skip
    _load_tiles("g", "g_ptr", "dst", "stride_g", program.out, used_out, layout, em, body)
    em.emit("if NEED_W:", body)
    for c in program.contractions:
        if c.weight_offset is None:
            continue
        outputs = _path_outputs(c, em)
        gradient = " + ".join(f"g{c.out}_{k} * ({expr})" for k, expr in outputs.items())
        em.emit(
            f"tl.store(gw_ptr + e[:, None] * stride_gw + ({c.weight_offset} + c)[None, :], "
            f"{gradient}, mask=emask[:, None] & cm{program.out[c.out].mul})",
            body + 1,
        )
    em.emit("pass", body + 1)
    em.emit("if NEED_ATTR:", body)
    _load_weights(program, em, body + 1)
    for p, c in enumerate(program.contractions):
        by_j: dict[int, list[str]] = defaultdict(list)
        for i, j, k, value in c.terms:
            by_j[j].append(f"{em.constant(value)} * x{c.gathered}_{i} * g{c.out}_{k}")
        for j, products in sorted(by_j.items()):
            tile = " + ".join(products)
            if c.weight_offset is not None:
                tile = f"w{p} * ({tile})"
            em.emit(f"ga{c.attr}_{j} += tl.reduce({tile}, 1, _sum_combine)", body + 1)
    em.emit("pass", body + 1)
    em.emit("if NEED_ATTR:", 1)
    for b, j in used_attr:
        offset = program.attr[b].offset + j
        em.emit(f"tl.store(gattr_ptr + e * stride_gattr + {offset}, ga{b}_{j}, mask=emask)", 2)
    em.emit("pass", 2)
    header = [
        "@triton.jit",
        "def edge_grads(x_ptr, attr_ptr, w_ptr, g_ptr, src_ptr, dst_ptr, gattr_ptr, gw_ptr,",
        "               num_edges, stride_x, stride_attr, stride_w, stride_g, stride_gattr,",
        "               stride_gw, NEED_ATTR: tl.constexpr, NEED_W: tl.constexpr,",
        "               BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):",
        "    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)",
        "    emask = e < num_edges",
        "    src = tl.load(src_ptr + e, mask=emask, other=0).to(tl.int64)",
        "    dst = tl.load(dst_ptr + e, mask=emask, other=0).to(tl.int64)",
    ]
    return header + em.constant_lines(1) + em.lines


def _check_supported(descriptor: TPDescriptor, dtype: torch.dtype) -> str:
    reason = unsupported_descriptor_reason(descriptor)
    if reason is not None:
        raise ValueError(f"the Triton kernels cannot run this descriptor: {reason}")
    if dtype not in _DTYPES:
        raise ValueError(f"the Triton kernels run float32 and float64, got {dtype}")
    return _DTYPES[dtype]


def generate_source(descriptor: TPDescriptor, dtype: torch.dtype) -> str:
    """The Triton source of ``descriptor``'s kernels in ``dtype`` (a Python module).

    Args:
        descriptor: a descriptor of ``uvu`` paths whose ``irreps_in2`` blocks (those
            the paths read) have multiplicity 1, in either layout.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        The module source, defining ``node_csr``, ``node_atomic`` (forward program),
        ``node_csr_transposed``, ``node_atomic_transposed`` (the ``x_node`` gradient) and
        ``edge_grads``.

    Raises:
        ValueError: for a descriptor or dtype the kernels do not run.
    """
    tl_dtype = _check_supported(descriptor, dtype)
    forward = _forward_program(descriptor)
    transposed = _transposed_program(forward)
    layout = descriptor.layout
    lines = [
        f'"""Triton kernels generated by torsion (codegen version {CODEGEN_VERSION}).',
        "",
        f"irreps_in1: {descriptor.irreps_in1}",
        f"irreps_in2: {descriptor.irreps_in2}",
        f"irreps_out: {descriptor.irreps_out}",
        f"layout: {layout}; dtype: {dtype}; paths: {len(descriptor.paths)}",
        '"""',
        "",
        "import triton",
        "import triton.language as tl",
        "",
        *_PRELUDE,
    ]
    for name, kernel in (
        ("node_csr", _node_csr_kernel(forward, layout, tl_dtype)),
        ("node_atomic", _node_atomic_kernel(forward, layout, tl_dtype)),
        ("node_csr_transposed", _node_csr_kernel(transposed, layout, tl_dtype)),
        ("node_atomic_transposed", _node_atomic_kernel(transposed, layout, tl_dtype)),
        ("edge_grads", _edge_grads_kernel(forward, layout, tl_dtype, max_multiplicity(descriptor))),
    ):
        kernel[1] = (
            kernel[1]
            .replace("def node_csr(", f"def {name}(")
            .replace("def node_atomic(", f"def {name}(")
        )
        lines += ["", "", *kernel]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=256)
def _cache_key(descriptor: TPDescriptor, dtype: torch.dtype) -> str:
    identity = repr(
        (
            CODEGEN_VERSION,
            str(descriptor.irreps_in1),
            str(descriptor.irreps_in2),
            str(descriptor.irreps_out),
            descriptor.paths,
            descriptor.layout,
            str(dtype),
        )
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def kernel_source_path(descriptor: TPDescriptor, dtype: torch.dtype) -> FilePath:
    """The cached source file of ``descriptor``'s kernels in ``dtype``, written if missing.

    The name is a hash of the descriptor (irreps, paths with their coefficients, layout),
    the dtype and :data:`CODEGEN_VERSION`; an existing file is reused as it is, so
    generation happens once per machine. Files are written atomically (a temporary file
    renamed into place), so concurrent processes never import a partial file.

    Raises:
        ValueError: for a descriptor or dtype the kernels do not run.
    """
    _check_supported(descriptor, dtype)
    path = cache_dir() / f"tp_{_cache_key(descriptor, dtype)}.py"
    if path.exists():
        return path
    source = generate_source(descriptor, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(source)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


_MODULES: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def kernel_module(descriptor: TPDescriptor, dtype: torch.dtype) -> ModuleType:
    """The imported kernels of ``descriptor`` in ``dtype`` (cached per process).

    ``@triton.jit`` decides at decoration whether a kernel is compiled or interpreted
    (``TRITON_INTERPRET``), so the module is imported once per interpreter mode.

    Raises:
        ValueError: for a descriptor or dtype the kernels do not run.
        ImportError: if triton is not installed.
    """
    key = (_cache_key(descriptor, dtype), interpreter_enabled())
    module = _MODULES.get(key)
    if module is not None:
        return module
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            path = kernel_source_path(descriptor, dtype)
            name = f"torsion_triton_tp_{key[0]}_{'interpreted' if key[1] else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULES[key] = module
    return module


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))
