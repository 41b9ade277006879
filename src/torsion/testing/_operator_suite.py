"""A property suite for curvature operators, and the dense oracles it checks them against.

Bind it by subclassing :class:`LinearOperatorSuite` and providing a ``case`` fixture that
returns an :class:`OperatorCase`: one or more operators that must all equal one dense
matrix (e.g. the same Hessian built on one batch and on a split of it), and optionally
the model they read, which must come out of every product untouched::

    class TestMyHessian(LinearOperatorSuite):
        @pytest.fixture
        def case(self):
            model, loss_fn, data = ...
            return OperatorCase(
                operators=[HessianOperator(model, loss_fn, data)],
                dense=dense_hessian(model, loss_fn, data),
                model=model,
            )

The oracles (:func:`dense_hessian`, :func:`dense_ggn`, :func:`dense_empirical_fisher`)
are written independently of :mod:`torsion.curvature`: ``torch.func.hessian`` and
``jacrev`` of the loss as a function of the flat parameter vector, on a deep copy of the
model in eval mode, with batches weighted by their size. They cost ``O(n^2)`` memory:
small models only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

__all__ = [
    "LinearOperatorSuite",
    "OperatorCase",
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
]


# ----------------------------------------------------------------------------- oracles


def _batches(data: Any) -> list[tuple[Any, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        return [data]
    return [tuple(batch) for batch in data]


def _args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class _FlatModel:
    """The model's outputs as a function of the flat vector of the selected parameters."""

    def __init__(self, model: nn.Module, params: Sequence[str] | None):
        named = dict(model.named_parameters())
        self.names = (
            [n for n, p in named.items() if p.requires_grad] if params is None else [*params]
        )
        self.shapes = [named[n].shape for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.reference = copy.deepcopy(model).eval()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(theta, sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)}

    def outputs(self, theta: Tensor, inputs: Any) -> Any:
        return torch.func.functional_call(self.reference, self.unflatten(theta), _args(inputs))


def _hessian_of_batch(flat: _FlatModel, loss_fn: Callable, inputs: Any, targets: Tensor):
    return torch.func.hessian(lambda t: loss_fn(flat.outputs(t, inputs), targets))(flat.theta)


def _ggn_of_batch(flat: _FlatModel, loss_fn: Callable, inputs: Any, targets: Tensor):
    out = flat.outputs(flat.theta, inputs)
    jac = torch.func.jacrev(lambda t: flat.outputs(t, inputs))(flat.theta)
    jac = jac.reshape(out.numel(), -1)
    loss_hessian = torch.func.hessian(lambda o: loss_fn(o.reshape(out.shape), targets))
    return jac.T @ loss_hessian(out.reshape(-1)) @ jac


def _sample_gradients(flat: _FlatModel, loss_fn: Callable, inputs: Any, targets: Tensor):
    args = _args(inputs)

    def sample_loss(t: Tensor, i: int) -> Tensor:
        sample = tuple(a[i : i + 1] for a in args)
        return loss_fn(flat.outputs(t, sample), targets[i : i + 1])

    return [torch.func.grad(sample_loss)(flat.theta, i) for i in range(len(targets))]


def _weighted_sum(of_batch: Callable, model, loss_fn, data, params) -> Tensor:
    flat = _FlatModel(model, params)
    batches = _batches(data)
    total = sum(len(targets) for _, targets in batches)
    return sum(
        (len(targets) / total) * of_batch(flat, loss_fn, inputs, targets)
        for inputs, targets in batches
    )


def dense_hessian(
    model: nn.Module, loss_fn: Callable, data: Any, params: Sequence[str] | None = None
) -> Tensor:
    """Dense Hessian of ``sum_b (n_b / N) loss_fn(model(inputs_b), targets_b)``.

    Args:
        model: the network; a deep copy in eval mode is differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss of a batch.
        data: one ``(inputs, targets)`` batch or an iterable of them; ``n_b`` is
            ``len(targets_b)``.
        params: parameter names (default: all with ``requires_grad``), in this order.

    Shapes:
        ``(n, n)`` with ``n`` the number of selected parameter entries, ordered by
        ``params`` (the default follows ``model.named_parameters()``).
    """
    return _weighted_sum(_hessian_of_batch, model, loss_fn, data, params)


def dense_ggn(
    model: nn.Module, loss_fn: Callable, data: Any, params: Sequence[str] | None = None
) -> Tensor:
    """Dense generalized Gauss-Newton matrix ``sum_b (n_b / N) J_b^T H_b J_b``.

    ``J_b`` is the Jacobian of the (tensor) outputs on batch ``b`` with respect to the flat
    parameters and ``H_b`` the Hessian of ``loss_fn(., targets_b)`` at those outputs.
    Arguments and shapes as in :func:`dense_hessian`.
    """
    return _weighted_sum(_ggn_of_batch, model, loss_fn, data, params)


def dense_empirical_fisher(
    model: nn.Module, loss_fn: Callable, data: Any, params: Sequence[str] | None = None
) -> Tensor:
    """Dense empirical Fisher ``(1/N) sum_i g_i g_i^T`` over all ``N`` samples.

    ``g_i`` is the gradient of ``loss_fn`` on the one-sample batch ``i`` (inputs and targets
    sliced along their first dimension). Arguments and shapes as in :func:`dense_hessian`.
    """
    flat = _FlatModel(model, params)
    grads = [
        g
        for inputs, targets in _batches(data)
        for g in _sample_gradients(flat, loss_fn, inputs, targets)
    ]
    g = torch.stack(grads)
    return g.T @ g / len(grads)


# ----------------------------------------------------------------------------- the suite


@dataclass
class OperatorCase:
    """Operators that must all equal one dense matrix.

    Attributes:
        operators: :class:`torsion.curvature.LinearOperator` s (e.g. one operator built on
            one batch and on several splits of it, or by several methods).
        dense: the oracle ``(n, n)``.
        model: if given, products must leave its parameters, buffers, ``.grad`` and every
            submodule's train/eval flag unchanged.
        symmetric: whether the operators must be symmetric.
        atol: absolute tolerance of the products against the oracle.
    """

    operators: Sequence[Any]
    dense: Tensor
    model: nn.Module | None = None
    symmetric: bool = True
    atol: float = 1e-10


def _vectors(n: int, k: int, case: OperatorCase, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n, k, dtype=case.dense.dtype, generator=generator)
    return v.to(case.dense.device)


class LinearOperatorSuite:
    """Properties every curvature operator must have, checked against a dense oracle.

    Subclasses provide a ``case`` fixture returning an :class:`OperatorCase` (parametrize
    it to cover several models, losses and data splits).
    """

    def test_shape_dtype_device(self, case: OperatorCase):
        for op in case.operators:
            assert tuple(op.shape) == tuple(case.dense.shape)
            assert op.dtype == case.dense.dtype
            assert torch.device(op.device) == case.dense.device

    def test_dense_matches_the_oracle(self, case: OperatorCase):
        v = _vectors(case.dense.shape[0], 1, case, seed=9)[:, 0]
        for op in case.operators:
            dense = op.to_dense()
            torch.testing.assert_close(dense, case.dense, atol=case.atol, rtol=0)
            # the result belongs to the caller: editing it must not change the operator
            dense.add_(1.0)
            torch.testing.assert_close(op.matvec(v), case.dense @ v, atol=case.atol, rtol=0)

    def test_products_on_vectors_blocks_and_pytrees(self, case: OperatorCase):
        n = case.dense.shape[0]
        V = _vectors(n, 3, case)
        for op in case.operators:
            expected = case.dense @ V
            torch.testing.assert_close(op.matmat(V), expected, atol=case.atol, rtol=0)
            torch.testing.assert_close(op.matvec(V[:, 0]), expected[:, 0], atol=case.atol, rtol=0)
            torch.testing.assert_close(op @ V, expected, atol=case.atol, rtol=0)
            tree = op.unflatten(V[:, 0])
            if not isinstance(tree, Tensor):  # operators with a parameter layout
                out = op @ tree
                torch.testing.assert_close(op.flatten(out), expected[:, 0], atol=case.atol, rtol=0)
                block = op @ op.unflatten(V)
                torch.testing.assert_close(op.flatten(block), expected, atol=case.atol, rtol=0)

    def test_symmetric(self, case: OperatorCase):
        if not case.symmetric:
            pytest.skip("the case's operators are not symmetric")
        n = case.dense.shape[0]
        U, W = _vectors(n, 2, case, seed=1), _vectors(n, 2, case, seed=2)
        for op in case.operators:
            scale = case.dense.abs().max().clamp_min(1)
            torch.testing.assert_close(
                U.mT @ op.matmat(W), (op.matmat(U)).mT @ W, atol=case.atol * scale * n, rtol=0
            )

    def test_deterministic_and_linear(self, case: OperatorCase):
        n = case.dense.shape[0]
        V = _vectors(n, 2, case, seed=3)
        for op in case.operators:
            first = op.matmat(V)
            assert torch.equal(op.matmat(V), first), "two identical products differ"
            combined = op.matvec(2.0 * V[:, 0] - 3.0 * V[:, 1])
            torch.testing.assert_close(
                combined, 2.0 * first[:, 0] - 3.0 * first[:, 1], atol=case.atol * 10, rtol=0
            )

    def test_results_survive_later_products(self, case: OperatorCase):
        # an operator that writes every product into one reused buffer hands the caller a
        # result that the next product of the same shape silently overwrites
        n = case.dense.shape[0]
        V1, V2 = _vectors(n, 2, case, seed=7), _vectors(n, 2, case, seed=8)
        for op in case.operators:
            # the second product of each pair has the first one's shape, right after it
            block = op.matmat(V1)
            kept_block = block.clone()
            op.matmat(V2)
            assert torch.equal(block, kept_block), "a later matmat overwrote an earlier result"
            vector = op.matvec(V1[:, 0])
            kept_vector = vector.clone()
            op.matvec(V2[:, 0])
            assert torch.equal(vector, kept_vector), "a later matvec overwrote an earlier result"
            expected = case.dense @ V1
            torch.testing.assert_close(block, expected, atol=case.atol, rtol=0)
            torch.testing.assert_close(vector, expected[:, 0], atol=case.atol, rtol=0)

    def test_algebra(self, case: OperatorCase):
        v = _vectors(case.dense.shape[0], 1, case, seed=4)[:, 0]
        op = case.operators[0]
        av = case.dense @ v
        torch.testing.assert_close((op + op) @ v, 2 * av, atol=2 * case.atol, rtol=0)
        torch.testing.assert_close((op * 3.0) @ v, 3 * av, atol=3 * case.atol, rtol=0)
        torch.testing.assert_close((-op) @ v, -av, atol=case.atol, rtol=0)
        torch.testing.assert_close((op - op) @ v, torch.zeros_like(v), atol=2 * case.atol, rtol=0)

    def test_to_scipy(self, case: OperatorCase):
        np = pytest.importorskip("numpy")
        v = _vectors(case.dense.shape[0], 1, case, seed=5)[:, 0]
        out = case.operators[0].to_scipy().matvec(v.cpu().numpy())
        expected = (case.dense @ v).cpu().numpy()
        assert np.abs(out - expected).max() <= case.atol

    def test_model_untouched(self, case: OperatorCase):
        if case.model is None:
            pytest.skip("the case has no model")
        model = case.model
        flags = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        V = _vectors(case.dense.shape[0], 2, case, seed=6)
        for op in case.operators:
            op.matmat(V)
        assert [m.training for m in model.modules()] == flags, "train/eval flags changed"
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed"
        for p, g in zip(model.parameters(), grads, strict=True):
            assert (p.grad is None) == (g is None), ".grad was written"
            assert g is None or torch.equal(p.grad, g), ".grad changed"
