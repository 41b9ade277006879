"""The thread-parallel batched eigh: torch's results bit for bit, and the split only where safe."""

import pytest
import torch

from tests.linalg._matrices import random_spd
from torsion.linalg import eigh, sym_logm
from torsion.linalg._eigh import MIN_MATRICES_PER_THREAD, _splits


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _symmetric(*shape: int, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return a + a.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(2 * MIN_MATRICES_PER_THREAD,), (3, 70), (301,)])
def test_split_batch_equals_torch_bit_for_bit(two_threads, batch, dtype):
    a = _symmetric(*batch, 9, 9, dtype=dtype)
    assert _splits(a) == 2  # the parallel path is the one under test
    values, vectors = eigh(a)
    expected = torch.linalg.eigh(a)
    assert values.shape == expected.eigenvalues.shape
    assert vectors.shape == expected.eigenvectors.shape
    assert torch.equal(values, expected.eigenvalues)
    assert torch.equal(vectors, expected.eigenvectors)
    # and they are an eigendecomposition (float64 reference)
    q, lam = vectors.double(), values.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(q @ torch.diag_embed(lam) @ q.mT, a.double(), rtol=0, atol=tol)


def test_input_untouched(two_threads):
    a = _symmetric(256, 5, 5)
    before = a.clone()
    eigh(a)
    assert torch.equal(a, before)


def test_no_split_where_unsafe_or_too_small(two_threads):
    big = _symmetric(4 * MIN_MATRICES_PER_THREAD, 4, 4)
    assert _splits(big[: 2 * MIN_MATRICES_PER_THREAD - 1]) == 1  # under two threads' worth
    assert _splits(big[0]) == 1  # one matrix
    assert _splits(big.requires_grad_()) == 1  # a graph to record
    torch.set_num_threads(1)
    assert _splits(big.detach()) == 1


def test_no_graph_under_no_grad(two_threads):
    a = _symmetric(256, 4, 4).requires_grad_()
    with torch.no_grad():
        assert _splits(a) == 2
        values, vectors = eigh(a)
    assert not values.requires_grad and not vectors.requires_grad


def test_differentiable_input_falls_back_to_torch(two_threads):
    a = _symmetric(256, 4, 4).requires_grad_()
    values, _ = eigh(a)
    (grad,) = torch.autograd.grad(values.sum(), a)
    # d(trace)/dA = I on the symmetric part
    expected = torch.eye(4, dtype=a.dtype).expand(256, 4, 4)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)


def test_vmap_and_compile_take_torch_path(two_threads):
    a = _symmetric(4, 200, 3, 3)
    vmapped = torch.vmap(lambda m: eigh(m)[0])(a)
    torch.testing.assert_close(vmapped, torch.linalg.eigvalsh(a), rtol=0, atol=1e-12)
    compiled = torch.compile(lambda m: eigh(m)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(a), torch.linalg.eigvalsh(a), rtol=0, atol=1e-12)


def test_matrix_functions_use_it_and_agree(two_threads, monkeypatch):
    """``sym_logm`` goes through the split eigh on a batch and matches one thread exactly."""
    import torsion.linalg._eigh as module

    splits = []
    original = module._splits
    monkeypatch.setattr(module, "_splits", lambda a: splits.append(original(a)) or splits[-1])
    x = random_spd(6, (300,), generator=torch.Generator().manual_seed(1))
    parallel = sym_logm(x)
    assert splits == [2]
    torch.set_num_threads(1)
    torch.testing.assert_close(parallel, sym_logm(x), rtol=0, atol=0)
    assert splits == [2, 1]
