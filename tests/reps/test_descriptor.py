"""TPDescriptor: builders, e3nn normalizations and interop, weight layout, validation."""

import dataclasses
import itertools
import random

import numpy as np
import pytest
from e3nn import o3

from tests.reps._random import random_problem
from torsion.reps import (
    IRREP_NORMALIZATIONS,
    PATH_NORMALIZATIONS,
    Path,
    PathMode,
    TPDescriptor,
    path_coefficients,
)

NORMALIZATIONS = list(itertools.product(IRREP_NORMALIZATIONS, PATH_NORMALIZATIONS))


def _e3nn_paths(tp):
    return tuple(
        (i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight, i.path_weight)
        for i in tp.instructions
    )


def _paths(descriptor):
    return tuple(
        (p.in1, p.in2, p.out, p.mode.value, p.weighted, p.path_weight) for p in descriptor.paths
    )


def _mace_irreps_mid(irreps1, irreps2, target):
    """MACE's ``tp_out_irreps_with_instructions`` (mace/modules/irreps_tools.py), transcribed."""
    irreps_out_list, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps1):
        for j, (_, ir_edge) in enumerate(irreps2):
            for ir_out in ir_in * ir_edge:
                if ir_out in target:
                    k = len(irreps_out_list)
                    irreps_out_list.append((mul, ir_out))
                    instructions.append((i, j, k, "uvu", True))
    irreps_out, permut, _ = o3.Irreps(irreps_out_list).sort()
    instructions = [(a, b, permut[c], mode, t) for a, b, c, mode, t in instructions]
    return irreps_out, sorted(instructions, key=lambda x: x[2])


# -- builders -------------------------------------------------------------------------------


def test_channelwise_problem_a_has_the_published_sizes():
    d = TPDescriptor.channelwise("128x0e+128x1o+128x2e", "0e+1o+2e", "0e+1o+2e")
    assert len(d.paths) == 11 and d.weight_numel == 1408 and d.irreps_out.dim == 4480
    assert all(p.mode is PathMode.uvu and p.weighted for p in d.paths)
    assert d.weight_shapes == ((128, 1),) * 11


@pytest.mark.parametrize(
    ("irreps1", "irreps2", "target"),
    [
        ("128x0e+128x1o+128x2e", "0e+1o+2e", "0e+1o+2e"),
        ("3x0e+2x1o+4x2e+1x3o", "0e+1o+2e+3o", "0e+0o+1o+1e+2e+3o"),
        ("2x1e+3x0o", "2x0e+1x1o+2x2o", "0e+1o+1e+2o+3e"),
    ],
)
def test_channelwise_matches_mace_irreps_mid_and_instructions(irreps1, irreps2, target):
    irreps_mid, instructions = _mace_irreps_mid(*(o3.Irreps(s) for s in (irreps1, irreps2, target)))
    tp = o3.TensorProduct(
        irreps1, irreps2, irreps_mid, instructions, shared_weights=False, compile_left_right=False
    )
    d = TPDescriptor.channelwise(irreps1, irreps2, target)
    assert d.irreps_out == irreps_mid
    assert _paths(d) == _e3nn_paths(tp)
    assert d.weight_numel == tp.weight_numel


def test_channelwise_without_filter_keeps_every_product():
    d = TPDescriptor.channelwise("2x1o+2x2e", "1o+2e")
    # 1o x 1o -> 0e,1e,2e; 1o x 2e -> 1o,2o,3o; 2e x 1o -> 1o,2o,3o; 2e x 2e -> 0e..4e
    assert len(d.paths) == 3 + 3 + 3 + 5
    assert d.irreps_out.dim == 2 * sum(ir.dim for _, ir in d.irreps_out)
    assert list(d.irreps_out) == sorted(d.irreps_out, key=lambda m: m.ir)


@pytest.mark.parametrize(("irrep_normalization", "path_normalization"), NORMALIZATIONS)
def test_fully_connected_equals_e3nn(irrep_normalization, path_normalization):
    args = ("2x0e+3x1o+2x2e+1x3o", "1x0e+2x1o+1x2e", "3x1e+2x0e+1x2o+2x1o+1x4e")
    tp = o3.FullyConnectedTensorProduct(
        *args,
        irrep_normalization=irrep_normalization,
        path_normalization=path_normalization,
        compile_left_right=False,
    )
    d = TPDescriptor.fully_connected(
        *args, irrep_normalization=irrep_normalization, path_normalization=path_normalization
    )
    assert d == TPDescriptor.from_e3nn(tp)
    assert d.weight_numel == tp.weight_numel
    assert d.weight_shapes == tuple(i.path_shape for i in tp.instructions if i.has_weight)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("irrep_normalization", "path_normalization"), NORMALIZATIONS)
def test_from_instructions_coefficients_are_bitwise_e3nn(
    seed, irrep_normalization, path_normalization
):
    rng = random.Random(seed)
    irreps1, irreps2, irreps_out, instructions = random_problem(rng)
    # e3nn's optional multiplier, on some instructions
    instructions = [
        (*ins, rng.choice([0.0, 0.5, 3.0])) if rng.random() < 0.3 else ins for ins in instructions
    ]
    tp = o3.TensorProduct(
        irreps1,
        irreps2,
        irreps_out,
        instructions,
        irrep_normalization=irrep_normalization,
        path_normalization=path_normalization,
        compile_left_right=False,
    )
    d = TPDescriptor.from_instructions(
        irreps1,
        irreps2,
        irreps_out,
        instructions,
        irrep_normalization=irrep_normalization,
        path_normalization=path_normalization,
    )
    assert _paths(d) == _e3nn_paths(tp)  # exact float equality
    assert d.weight_numel == tp.weight_numel
    assert d.path_shapes == tuple(i.path_shape for i in tp.instructions)


def test_path_coefficients_closed_forms():
    # one uvu path 2x1o (x) 3x1o -> 2x0e: component -> sqrt(1 / 3), norm -> sqrt(9 / 3)
    ins = [(0, 0, 0, "uvu", 1.0)]
    args = (o3.Irreps("2x1o"), o3.Irreps("3x1o"), o3.Irreps("2x0e"), ins)
    assert path_coefficients(*args) == [np.sqrt(1 / 3)]
    assert path_coefficients(*args, "norm", "element") == [np.sqrt(9 / 3)]
    assert path_coefficients(*args, "none", "none") == [1.0]
    # two paths into one block: "element" shares the fan-in, "path" splits it per path
    ins = [(0, 0, 0, "uvw", 1.0), (0, 0, 0, "uuu", 1.0)]
    args = (o3.Irreps("2x0e"), o3.Irreps("2x0e"), o3.Irreps("2x0e"), ins)
    np.testing.assert_allclose(path_coefficients(*args, "component", "element"), [5**-0.5] * 2)
    np.testing.assert_allclose(
        path_coefficients(*args, "component", "path"), [(4 * 2) ** -0.5, 2**-0.5]
    )


# -- e3nn interop ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_e3nn_round_trips(seed):
    rng = random.Random(100 + seed)
    irreps1, irreps2, irreps_out, instructions = random_problem(rng)
    tp = o3.TensorProduct(
        irreps1,
        irreps2,
        irreps_out,
        instructions,
        irrep_normalization="norm",
        compile_left_right=False,
    )
    d = TPDescriptor.from_e3nn(tp)
    back = d.to_e3nn(shared_weights=False, internal_weights=False, compile_left_right=False)
    assert _e3nn_paths(back) == _e3nn_paths(tp)  # sqrt(c ** 2) == c exactly
    assert TPDescriptor.from_e3nn(back) == d
    assert back.weight_numel == tp.weight_numel and not back.shared_weights
    ir_mul = TPDescriptor.from_e3nn(tp, layout="ir_mul")
    assert ir_mul == d.with_layout("ir_mul") and ir_mul.layout == "ir_mul"


def test_from_e3nn_reads_the_subclasses():
    elementwise = o3.ElementwiseTensorProduct("3x1o+3x2e", "3x1e+3x0o", compile_left_right=False)
    d = TPDescriptor.from_e3nn(elementwise)
    assert {p.mode for p in d.paths} == {PathMode.uuu} and d.weight_numel == 0
    fc = o3.FullyConnectedTensorProduct(
        "2x0e+1o", "1o", "3x1o+2x0e", irrep_normalization="norm", compile_left_right=False
    )
    assert TPDescriptor.from_e3nn(fc) == TPDescriptor.fully_connected(
        "2x0e+1o", "1o", "3x1o+2x0e", irrep_normalization="norm"
    )


def test_from_e3nn_rejects_unsupported_modes_and_objects():
    tp = o3.TensorProduct(
        "2x0e", "3x0e", "3x0e", [(0, 0, 0, "uvv", True)], compile_left_right=False
    )
    with pytest.raises(ValueError, match="connection mode 'uvv'"):
        TPDescriptor.from_e3nn(tp)
    with pytest.raises(TypeError, match=r"e3nn\.o3\.TensorProduct"):
        TPDescriptor.from_e3nn(o3.Irreps("2x0e"))


def test_to_e3nn_rejects_negative_path_weights():
    d = TPDescriptor("1o", "1o", "0e", (Path(0, 0, 0, "uvw", True, -0.5),))
    with pytest.raises(ValueError, match="negative path_weight"):
        d.to_e3nn()


# -- plain data -----------------------------------------------------------------------------


def test_descriptor_is_frozen_hashable_and_coerces_its_fields():
    d = TPDescriptor("2x0e + 2x1o", "1o", "2x1o+2x1e", [Path(0, 0, 0, "uvu"), Path(1, 0, 1, "uvu")])
    assert isinstance(d.irreps_in1, o3.Irreps) and isinstance(d.paths, tuple)
    assert d.paths[0].mode is PathMode.uvu and d.layout == "mul_ir"
    same = TPDescriptor(o3.Irreps("2x0e+2x1o"), "1x1o", "2x1o+2x1e", (d.paths[0], d.paths[1]))
    assert same == d and hash(same) == hash(d)
    assert {d: 1}[same] == 1
    assert d.with_layout("ir_mul") != d and d.with_layout("ir_mul").paths == d.paths
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.layout = "ir_mul"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.paths[0].path_weight = 2.0


def test_weight_layout_offsets_follow_path_order():
    d = TPDescriptor(
        "2x0e+3x1o",
        "4x1o",
        "2x1o+3x1e+3x0e",
        (
            Path(0, 0, 0, "uvu", True),  # (2, 4)
            Path(1, 0, 2, "uvw", True),  # (3, 4, 3)
            Path(1, 0, 1, "uvu", False),  # (3, 4), no weights
            Path(0, 0, 0, "uvw", True),  # (2, 4, 2)
        ),
    )
    assert d.path_shapes == ((2, 4), (3, 4, 3), (3, 4), (2, 4, 2))
    assert d.weight_shapes == ((2, 4), (3, 4, 3), (2, 4, 2))
    assert d.weight_slices == (slice(0, 8), slice(8, 44), None, slice(44, 60))
    assert d.weight_numel == 60


def test_path_accepts_numpy_indices_and_mode_names():
    p = Path(np.int64(1), 0, 2, "uuu", False, np.float32(0.5))
    assert p.in1 == 1 and type(p.in1) is int and p.mode is PathMode.uuu
    assert type(p.path_weight) is float


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("irreps", "path", "message"),
    [
        (("1o", "1o", "0e"), Path(1, 0, 0, "uvw"), "in1=1 is out of range for irreps_in1"),
        (("1o", "1o", "0e"), Path(0, 3, 0, "uvw"), "in2=3 is out of range for irreps_in2"),
        (("1o", "1o", "0e"), Path(0, 0, 1, "uvw"), "out=1 is out of range for irreps_out"),
        (("1o", "1o", "0o"), Path(0, 0, 0, "uvw"), "parity"),
        (("1o", "1o", "1e+3e"), Path(0, 0, 1, "uvw"), "selection rule"),
        (("2x1o", "1o", "3x0e"), Path(0, 0, 0, "uvu"), r"uvu needs mul\(in1\) == mul\(out\)"),
        (("2x1o", "3x1o", "2x0e"), Path(0, 0, 0, "uuu"), "uuu needs mul"),
        (("1o", "1o", "0e"), Path(0, 0, 0, "uvw", False), "uvw needs weighted=True"),
    ],
)
def test_invalid_paths_are_named(irreps, path, message):
    with pytest.raises(ValueError, match="invalid path 0") as info:
        TPDescriptor(*irreps, (path,))
    assert info.match(message)


def test_invalid_fields_raise_clear_errors():
    with pytest.raises(ValueError, match="irreps_in2 is not a valid e3nn Irreps"):
        TPDescriptor("1o", "1q", "0e")
    with pytest.raises(ValueError, match="layout must be one of"):
        TPDescriptor("1o", "1o", "0e", (), layout="channels_last")
    with pytest.raises(TypeError, match=r"paths\[0\] must be a Path"):
        TPDescriptor("1o", "1o", "0e", [(0, 0, 0, "uvw", True)])
    with pytest.raises(TypeError, match="sequence of Path"):
        TPDescriptor("1o", "1o", "0e", Path(0, 0, 0, "uvw"))
    with pytest.raises(ValueError, match=r"Path\.mode must be one of"):
        Path(0, 0, 0, "uvv")
    with pytest.raises(ValueError, match=r"Path\.in2 must be >= 0"):
        Path(0, -1, 0, "uvw")
    with pytest.raises(TypeError, match=r"Path\.out must be an int"):
        Path(0, 0, True, "uvw")
    with pytest.raises(TypeError, match=r"Path\.weighted must be a bool"):
        Path(0, 0, 0, "uvu", 1)
    with pytest.raises(ValueError, match="path_weight must be finite"):
        Path(0, 0, 0, "uvw", True, float("nan"))


def test_invalid_instructions_raise_clear_errors():
    with pytest.raises(ValueError, match="irrep_normalization must be one of"):
        TPDescriptor.fully_connected("1o", "1o", "0e", irrep_normalization="unit")
    with pytest.raises(ValueError, match="path_normalization must be one of"):
        TPDescriptor.fully_connected("1o", "1o", "0e", path_normalization="edge")
    with pytest.raises(ValueError, match="multiplier"):
        TPDescriptor.from_instructions("1o", "1o", "0e", [(0, 0, 0, "uvw", True, -1.0)])
    with pytest.raises(ValueError, match="instruction 0 must be"):
        TPDescriptor.from_instructions("1o", "1o", "0e", [(0, 0, 0, "uvw")])
    with pytest.raises(ValueError, match="parity"):
        TPDescriptor.from_instructions("1o", "1o", "0o", [(0, 0, 0, "uvw", True)])


def test_empty_descriptors_are_valid():
    d = TPDescriptor("2x1o", "1e", "3x0e")
    assert d.paths == () and d.weight_numel == 0 and d.weight_shapes == ()
    assert TPDescriptor.channelwise("2x1o", "1o", filter_irreps_out="3o").irreps_out.dim == 0
