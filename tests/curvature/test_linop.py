import pytest
import torch

from torsion.curvature._linop import DenseOperator, LinearOperator, TangentSpace
from torsion.testing import LinearOperatorSuite, OperatorCase


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


def _nonsym(n, generator):
    return torch.randn(n, n, dtype=torch.float64, generator=generator)


def test_symmetric_flag_and_adjoint_of_sums_scalings_and_differences(generator):
    s1, s2 = _sym(5, generator), _sym(5, generator)
    m1, m2 = _nonsym(5, generator), _nonsym(5, generator)
    S1, S2 = DenseOperator(s1, symmetric=True), DenseOperator(s2, symmetric=True)
    M1, M2 = DenseOperator(m1), DenseOperator(m2)
    # (operator, its dense matrix, whether every term is declared symmetric)
    cases = [
        (S1 + S2, s1 + s2, True),
        (S1 - S2, s1 - s2, True),
        (2.5 * S1, 2.5 * s1, True),
        (-S1 / 4, -s1 / 4, True),
        (S1 + M1, s1 + m1, False),
        (M1 + S1, m1 + s1, False),
        (S1 - M1, s1 - m1, False),
        (M1 - S1, m1 - s1, False),
        (M1 + M2, m1 + m2, False),
        (3 * M1, 3 * m1, False),
        (-M1, -m1, False),
        (M1 / 2, m1 / 2, False),
        (2 * (S1 + M1), 2 * (s1 + m1), False),
        ((S1 + S2) - 0.5 * M1, s1 + s2 - 0.5 * m1, False),
        (-(S1 + S2) + S1 * 2, s1 - s2, True),
    ]
    x = torch.randn(5, dtype=torch.float64, generator=generator)
    X = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    for op, dense, all_symmetric in cases:
        torch.testing.assert_close(op.to_dense(), dense)
        # symmetric only when every term is: a flag set on a non-symmetric sum would hand
        # out the operator itself as its adjoint
        assert op.symmetric == all_symmetric
        sp = op.to_scipy()
        if op.symmetric:
            torch.testing.assert_close(torch.as_tensor(sp.rmatvec(x.numpy())), dense.mT @ x)
            torch.testing.assert_close(torch.as_tensor(sp.rmatmat(X.numpy())), dense.mT @ X)
            torch.testing.assert_close(torch.as_tensor(sp.H @ x.numpy()), dense.mT @ x)
        else:  # no adjoint rather than a wrong one
            with pytest.raises(NotImplementedError):
                sp.rmatvec(x.numpy())


def test_to_dense_returns_a_copy_the_operator_does_not_share(generator):
    a, b = _sym(6, generator), _nonsym(6, generator)
    A, B = DenseOperator(a.clone(), symmetric=True), DenseOperator(b.clone())
    V = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    for op, dense in [(A, a), (B, b), (A + B, a + b), (A - B, a - b), (2 * A, 2 * a), (-B, -b)]:
        out = op.to_dense()
        out.add_(5.0)  # the caller owns the result
        torch.testing.assert_close(op @ V, dense @ V)
        torch.testing.assert_close(op.to_dense(), dense)
    torch.testing.assert_close(A.matrix, a)
    torch.testing.assert_close(B.matrix, b)


class TestDenseOperators(LinearOperatorSuite):
    """DenseOperator (with a parameter layout) and its sums, differences and multiples."""

    @pytest.fixture(params=["dense", "sum", "difference", "scaled"])
    def case(self, request):
        generator = torch.Generator().manual_seed(1)
        a, b = _sym(9, generator), _sym(9, generator)
        A = DenseOperator(a.clone(), param_shapes=SHAPES, symmetric=True)
        B = DenseOperator(b.clone(), symmetric=True)
        op, dense = {
            "dense": (A, a),
            "sum": (A + B, a + b),
            "difference": (B - A, b - a),
            "scaled": (-2.5 * A, -2.5 * a),
        }[request.param]
        return OperatorCase(operators=[op], dense=dense)


class _AliasedDense(DenseOperator):
    """Writes every product into one reused buffer (a later product overwrites the last)."""

    def _matmat(self, V):
        if getattr(self, "_buffer", None) is None or self._buffer.shape != V.shape:
            self._buffer = torch.empty_like(V)
        return torch.matmul(self.matrix, V, out=self._buffer)


def test_operator_suite_rejects_products_aliasing_one_buffer(generator):
    a = _sym(6, generator)
    case = OperatorCase(operators=[_AliasedDense(a, symmetric=True)], dense=a)
    suite = LinearOperatorSuite()
    suite.test_products_on_vectors_blocks_and_pytrees(case)  # each product alone is right
    with pytest.raises(AssertionError, match="overwrote an earlier result"):
        suite.test_results_survive_later_products(case)
    suite.test_results_survive_later_products(OperatorCase(operators=[DenseOperator(a)], dense=a))
