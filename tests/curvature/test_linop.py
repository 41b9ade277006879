import pytest
import torch

from torsion.curvature._linop import DenseOperator, LinearOperator, TangentSpace


def _sym(n, generator):
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return a + a.mT


SHAPES = {"w": (2, 3), "b": (3,)}


def test_matvec_matmat_and_matmul(generator):
    a = _sym(9, generator)
    op = DenseOperator(a, param_shapes=SHAPES, symmetric=True)
    v = torch.randn(9, dtype=torch.float64, generator=generator)
    V = torch.randn(9, 4, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(op.matvec(v), a @ v)
    torch.testing.assert_close(op.matmat(V), a @ V)
    torch.testing.assert_close(op @ v, a @ v)
    torch.testing.assert_close(op @ V, a @ V)
    assert op.shape == (9, 9) and op.dtype == torch.float64 and op.device.type == "cpu"


def test_pytree_roundtrip_and_product(generator):
    a = _sym(9, generator)
    op = DenseOperator(a, param_shapes=SHAPES)
    tree = {"b": torch.randn(3, dtype=torch.float64), "w": torch.randn(2, 3, dtype=torch.float64)}
    flat = op.flatten(tree)
    assert flat.shape == (9,)
    torch.testing.assert_close(flat[:6], tree["w"].reshape(-1))
    back = op.unflatten(flat)
    assert list(back) == ["w", "b"]
    torch.testing.assert_close(back["b"], tree["b"])
    out = op @ tree
    torch.testing.assert_close(op.flatten(out), a @ flat)
    # a block of k vectors: leading k on every leaf
    block = {
        "w": torch.randn(4, 2, 3, dtype=torch.float64),
        "b": torch.randn(4, 3, dtype=torch.float64),
    }
    flat_block = op.flatten(block)
    assert flat_block.shape == (9, 4)
    for i in range(4):
        torch.testing.assert_close(
            flat_block[:, i], op.flatten({k: x[i] for k, x in block.items()})
        )
    out_block = op @ block
    assert out_block["w"].shape == (4, 2, 3)
    torch.testing.assert_close(op.flatten(out_block), a @ flat_block)


def test_tuple_layout(generator):
    op = DenseOperator(_sym(9, generator), param_shapes=[(2, 3), (3,)])
    tree = (torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    out = op @ tree
    assert isinstance(out, tuple) and out[0].shape == (2, 3)


def test_algebra_and_dense(generator):
    a, b = _sym(5, generator), _sym(5, generator)
    A, B = DenseOperator(a), DenseOperator(b)
    torch.testing.assert_close((A + B).to_dense(), a + b)
    torch.testing.assert_close((A - B).to_dense(), a - b)
    torch.testing.assert_close((2.5 * A).to_dense(), 2.5 * a)
    torch.testing.assert_close((A * 3).to_dense(), 3 * a)
    torch.testing.assert_close((-A).to_dense(), -a)
    torch.testing.assert_close((A * torch.tensor(2.0)).to_dense(), 2 * a)
    torch.testing.assert_close((A / 4).to_dense(), a / 4)
    torch.testing.assert_close(LinearOperator.to_dense(A, chunk_size=2), a)
    with pytest.raises(ZeroDivisionError, match="by zero"):
        A / 0
    with pytest.raises(TypeError):
        A * torch.ones(2)
    # a sum or multiple of an operator summed over ranks is summed over ranks too: the
    # probes must then draw one set of random vectors for all ranks
    A.distributed = True
    assert all(op.distributed for op in (A + B, B - A, 2 * A, -A, A / 2))
    assert not (B + B).distributed


def test_to_scipy(generator):
    import numpy as np
    import scipy.sparse.linalg

    a = _sym(12, generator)
    sp = DenseOperator(a, symmetric=True).to_scipy()
    x = np.arange(12.0)
    np.testing.assert_allclose(sp @ x, (a @ torch.arange(12.0, dtype=torch.float64)).numpy())
    top = scipy.sparse.linalg.eigsh(sp, k=1, which="LA")[0]
    np.testing.assert_allclose(top, torch.linalg.eigvalsh(a)[-1:].numpy(), rtol=1e-10)
    np.testing.assert_allclose(sp.H @ x, sp @ x)


def test_errors(generator):
    op = DenseOperator(_sym(4, generator))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="matvec"):
        op.matvec(torch.zeros(4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        op.matmat(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="layout"):
        op @ {"w": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="param_shapes"):
        DenseOperator(torch.zeros(4, 4), param_shapes=[(3,)])
    with pytest.raises(ValueError, match="shapes"):
        DenseOperator(torch.zeros(4, 4)) + DenseOperator(torch.zeros(3, 3))
    shaped = DenseOperator(torch.zeros(9, 9), param_shapes=SHAPES)
    with pytest.raises(ValueError, match="keys"):
        shaped.flatten({"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="match neither"):
        shaped.flatten({"w": torch.zeros(3, 2), "b": torch.zeros(3)})


def test_operator_without_layout_passes_flat_through(generator):
    op = DenseOperator(_sym(4, generator))
    v = torch.ones(4, dtype=torch.float64)
    assert op.unflatten(v) is v and op.flatten(v) is v


def test_tangent_space_protocol():
    class Flat:
        def proju(self, x, u):
            return u

        def ehess2rhess(self, x, egrad, ehess, u):
            return ehess

    assert isinstance(Flat(), TangentSpace)
    assert not isinstance(object(), TangentSpace)
