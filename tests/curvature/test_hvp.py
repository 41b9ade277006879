import importlib

import pytest
import torch

from torsion.curvature._hvp import GradientGraph, ggn_vp, hvp, jvp, vjp
from torsion.curvature._linop import DenseOperator

hvp_module = importlib.import_module("torsion.curvature._hvp")

METHODS = ["double_backward", "forward_over_reverse", "reverse_over_reverse", "auto"]
SHAPES = {"w1": (5, 3), "b1": (5,), "w2": (2, 5), "b2": (2,)}
N = sum(torch.Size(s).numel() for s in SHAPES.values())
# flatten / unflatten helpers for the dense oracles
LAYOUT = DenseOperator(torch.zeros(N, N, dtype=torch.float64), param_shapes=SHAPES)


@pytest.fixture
def problem(generator):
    kw = {"dtype": torch.float64, "generator": generator}
    params = {k: torch.randn(*s, **kw) for k, s in SHAPES.items()}
    x, y = torch.randn(7, 3, **kw), torch.randn(7, 2, **kw)

    def model(p):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def loss_of_outputs(out):
        return ((out - y) ** 2).mean() + (out**3).mean() / 10

    def f(p):
        return loss_of_outputs(model(p))

    dense_h = torch.func.hessian(lambda t: f(LAYOUT.unflatten(t)))(LAYOUT.flatten(params))
    return params, model, loss_of_outputs, f, dense_h


def _random_tree(generator, k=None):
    lead = () if k is None else (k,)
    return {
        k_: torch.randn(*lead, *s, dtype=torch.float64, generator=generator)
        for k_, s in SHAPES.items()
    }


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_dense_hessian(problem, generator, method):
    params, _, _, f, dense_h = problem
    v = _random_tree(generator)
    out = hvp(f, params, v, method=method)
    assert set(out) == set(SHAPES) and all(out[k].shape == SHAPES[k] for k in SHAPES)
    torch.testing.assert_close(LAYOUT.flatten(out), dense_h @ LAYOUT.flatten(v), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_block_matches_single_vectors(problem, generator, method):
    params, _, _, f, dense_h = problem
    V = _random_tree(generator, k=4)
    out = hvp(f, params, V, method=method, block=True)
    assert out["w1"].shape == (4, 5, 3)
    torch.testing.assert_close(LAYOUT.flatten(out), dense_h @ LAYOUT.flatten(V), atol=1e-10, rtol=0)
    single = hvp(f, params, {k: x[2] for k, x in V.items()}, method=method)
    torch.testing.assert_close(
        LAYOUT.flatten(single), LAYOUT.flatten(out)[:, 2], atol=1e-12, rtol=0
    )


def test_gradient_graph_reuse(problem, generator):
    params, _, _, f, dense_h = problem
    before = {k: x.clone() for k, x in params.items()}
    graph = GradientGraph(f, params)
    torch.testing.assert_close(graph.value, f(params))
    expected_grad = torch.func.grad(f)(params)
    for k in SHAPES:
        torch.testing.assert_close(graph.gradient[k], expected_grad[k])
    for _ in range(3):  # repeated products on the same graph
        v = _random_tree(generator)
        torch.testing.assert_close(
            LAYOUT.flatten(graph.hvp(v)), dense_h @ LAYOUT.flatten(v), atol=1e-10, rtol=0
        )
    V = _random_tree(generator, k=3)
    torch.testing.assert_close(
        LAYOUT.flatten(graph.hvp(V, block=True)), dense_h @ LAYOUT.flatten(V), atol=1e-10, rtol=0
    )
    for k in SHAPES:  # the caller's tensors are untouched
        assert torch.equal(params[k], before[k]) and params[k].grad is None


def test_gradient_graph_flat_block_products(problem, generator):
    """``hvp_flat`` on flat blocks in both memory layouts (column-major ``(n, k)`` and the
    transposed row-major block that eigsh passes) matches the dense Hessian."""
    params, _, _, f, dense_h = problem
    graph = GradientGraph(f, params)
    V = torch.randn(N, 3, dtype=torch.float64, generator=generator)
    for block in (V, V.T.contiguous().T, V[:, 1:2]):
        before = block.clone()
        out = graph.hvp_flat(block)
        assert out.shape == block.shape
        torch.testing.assert_close(out, dense_h @ block, atol=1e-10, rtol=0)
        assert torch.equal(block, before)
    with pytest.raises(ValueError, match="shape"):
        graph.hvp_flat(torch.zeros(N + 1, 2, dtype=torch.float64))


def test_flat_blocks_through_the_reused_chunked_transpose(problem, generator, monkeypatch):
    """Row-major blocks are transposed chunk by chunk into a buffer the graph reuses:
    chunks that split the rows, a second block of the same shape (no stale rows) and a
    block of another width (a new buffer) all give the dense products, and no result
    aliases the buffer."""
    monkeypatch.setattr(hvp_module, "_TRANSPOSE_CHUNK_ELEMENTS", 7)  # 2-3 rows per chunk
    params, _, _, f, dense_h = problem
    graph = GradientGraph(f, params)
    results = []
    for k in (3, 3, 2):
        V = torch.randn(N, k, dtype=torch.float64, generator=generator)
        out = graph.hvp_flat(V)
        torch.testing.assert_close(out, dense_h @ V, atol=1e-10, rtol=0)
        results.append((out, dense_h @ V))
    for out, want in results:  # earlier results survive later calls
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_tuple_params_and_key_order(problem, generator):
    params, _, _, f, dense_h = problem
    v = _random_tree(generator)
    reordered = dict(reversed(list(v.items())))
    for method in METHODS:
        out = hvp(f, params, reordered, method=method)
        torch.testing.assert_close(
            LAYOUT.flatten(out), dense_h @ LAYOUT.flatten(v), atol=1e-10, rtol=0
        )
    keys = list(SHAPES)

    def g(t):
        return f(dict(zip(keys, t, strict=True)))

    tup = tuple(params[k] for k in keys)
    vt = [v[k] for k in keys]
    for method in METHODS:
        for vectors in (tuple(vt), vt):  # a list against tuple params is the same structure
            out = hvp(g, tup, vectors, method=method)
            assert isinstance(out, tuple)
            flat = torch.cat([o.reshape(-1) for o in out])
            torch.testing.assert_close(flat, dense_h @ LAYOUT.flatten(v), atol=1e-10, rtol=0)
        empty = hvp(g, tup, [x.new_zeros((0, *x.shape)) for x in vt], method=method, block=True)
        assert [tuple(o.shape) for o in empty] == [(0, *x.shape) for x in vt]


def test_parameter_f_does_not_depend_on(generator):
    p = {
        "a": torch.randn(3, dtype=torch.float64, generator=generator),
        "b": torch.ones(2, dtype=torch.float64),
    }
    v = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    for method in METHODS:
        out = hvp(lambda q: (q["a"] ** 3).sum(), p, v, method=method)
        torch.testing.assert_close(out["a"], 6 * p["a"])
        torch.testing.assert_close(out["b"], torch.zeros(2, dtype=torch.float64))
    # a linear f: the gradient carries no graph at all
    out = hvp(lambda q: q["a"].sum() + q["b"].sum(), p, v, method="double_backward")
    assert all(torch.equal(x, torch.zeros_like(x)) for x in out.values())


def test_jvp_vjp(problem, generator):
    params, model, _, _, _ = problem
    jac = torch.func.jacrev(lambda t: model(LAYOUT.unflatten(t)))(
        LAYOUT.flatten(params)
    )  # (7, 2, N)
    v = _random_tree(generator)
    out, jv = jvp(model, params, v)
    torch.testing.assert_close(out, model(params))
    torch.testing.assert_close(jv, jac @ LAYOUT.flatten(v), atol=1e-12, rtol=0)
    u = torch.randn(7, 2, dtype=torch.float64, generator=generator)
    _, jtu = vjp(model, params, u)
    torch.testing.assert_close(
        LAYOUT.flatten(jtu), jac.reshape(14, N).T @ u.reshape(-1), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("method", ["auto", "torch_func", "autograd"])
def test_ggn_matches_dense(problem, generator, method):
    params, model, loss_of_outputs, _, _ = problem
    theta = LAYOUT.flatten(params)
    jac = torch.func.jacrev(lambda t: model(LAYOUT.unflatten(t)))(theta).reshape(14, N)
    out0 = model(params)
    h_loss = torch.func.hessian(lambda o: loss_of_outputs(o.reshape(7, 2)))(out0.reshape(-1))
    dense = jac.T @ h_loss @ jac
    v = _random_tree(generator)
    out = ggn_vp(model, loss_of_outputs, params, v, method=method)
    torch.testing.assert_close(LAYOUT.flatten(out), dense @ LAYOUT.flatten(v), atol=1e-10, rtol=0)
    V = _random_tree(generator, k=3)
    out = ggn_vp(model, loss_of_outputs, params, V, block=True, method=method)
    torch.testing.assert_close(LAYOUT.flatten(out), dense @ LAYOUT.flatten(V), atol=1e-10, rtol=0)
    assert all(not t.requires_grad for t in out.values())


def test_ggn_by_autograd_on_a_model_torch_func_cannot_run(problem, generator):
    """A model whose forward calls ``torch.autograd.grad`` (like forces): the outputs are
    the input gradient of a potential, and some outputs form a tuple. ``auto`` falls back
    to autograd and matches a dense GGN built row by row with autograd; ``torch_func``
    names the problem."""
    params, _, _, _, _ = problem
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator)

    def model(p):
        pos = x.clone().requires_grad_()
        energy = (torch.tanh(pos @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]).pow(2).sum()
        (force,) = torch.autograd.grad(-energy, pos, create_graph=True)
        return energy.reshape(1), force

    def loss(outputs):
        energy, force = outputs
        return energy.square().sum() / 10 + (force - 1).pow(2).mean() + force.pow(3).mean() / 5

    theta = LAYOUT.flatten(params).requires_grad_()
    energy, force = model(LAYOUT.unflatten(theta))
    flat_out = torch.cat([energy, force.reshape(-1)])
    jac = torch.stack(
        [torch.autograd.grad(o, theta, retain_graph=True)[0] for o in flat_out]
    )  # (22, N)
    point = flat_out.detach()
    h_loss = torch.func.hessian(lambda o: loss((o[:1], o[1:].reshape(7, 3))))(point)
    dense = jac.T @ h_loss @ jac
    V = _random_tree(generator, k=2)
    out = ggn_vp(model, loss, params, V, block=True)
    torch.testing.assert_close(LAYOUT.flatten(out), dense @ LAYOUT.flatten(V), atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="use method='autograd'"):
        ggn_vp(model, loss, params, V, block=True, method="torch_func")
    with pytest.raises(ValueError, match="unknown method"):
        ggn_vp(model, loss, params, V, block=True, method="finite_differences")


@pytest.mark.parametrize("method", METHODS)
def test_non_scalar_f_raises(problem, generator, method):
    params, model, _, _, _ = problem
    with pytest.raises(ValueError, match="scalar"):
        hvp(model, params, _random_tree(generator), method=method)
    with pytest.raises(ValueError, match="scalar"):
        GradientGraph(model, params)


def test_ggn_non_scalar_loss_raises(problem, generator):
    params, model, _, _, _ = problem
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        ggn_vp(model, lambda out: out, params, _random_tree(generator))


def test_structure_mismatch_raises(problem, generator):
    params, _, _, f, _ = problem
    v = _random_tree(generator)
    with pytest.raises(ValueError, match="structure"):
        hvp(f, params, {k: v[k] for k in ["w1", "b1", "w2"]})
    with pytest.raises(ValueError, match="structure"):
        hvp(f, params, tuple(v.values()))
    with pytest.raises(ValueError, match="shaped like"):
        hvp(f, params, {**v, "w1": torch.zeros(3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="block"):
        hvp(f, params, v, block=True)
    with pytest.raises(ValueError, match="unknown method"):
        hvp(f, params, v, method="finite_differences")


def test_forward_over_reverse_torch_bug(generator, monkeypatch):
    """pytorch#123996: F.mse_loss under jvp(grad) fails; explicit -> named error, auto -> exact
    reverse-over-reverse."""
    w = torch.randn(3, 2, dtype=torch.float64, generator=generator)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def f(p):
        return torch.nn.functional.mse_loss(x @ p, y)

    v = torch.randn(3, 2, dtype=torch.float64, generator=generator)
    expected = hvp(f, w, v, method="double_backward")
    try:
        hvp(f, w, v, method="forward_over_reverse")
    except RuntimeError as error:
        assert "123996" in str(error)
    # the package re-exports the function hvp, which shadows the submodule attribute
    monkeypatch.setattr(hvp_module, "_auto_method", lambda params, block: "forward_over_reverse")
    torch.testing.assert_close(hvp(f, w, v), expected, atol=1e-12, rtol=0)


def test_flat_block_after_a_block_of_another_dtype_keeps_full_precision(problem, generator):
    """The reused transposing buffer must follow the block's dtype: a float64 block after
    a float32 one of the same shape is not rounded through the old float32 buffer."""
    params, _, _, f, dense_h = problem
    graph = GradientGraph(f, params)
    V = torch.randn(N, 3, dtype=torch.float64, generator=generator)  # rows: transposed
    low = graph.hvp_flat(V.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), dense_h @ V, atol=1e-5, rtol=0)
    torch.testing.assert_close(graph.hvp_flat(V), dense_h @ V, atol=1e-12, rtol=0)


def test_vjp_accepts_dict_cotangents_in_any_key_order(problem, generator):
    """``vjp`` of a model with dict outputs: the cotangent's keys may come in another
    order; ``J^T u`` matches the Jacobian oracle (keys matched by name, not position)."""
    params, model, _, _, _ = problem

    def two_heads(p):
        out = model(p)
        return {"first": out[:, 0], "second": out[:, 1] ** 2}

    flat = LAYOUT.flatten(params)
    jac_first, jac_second = (
        torch.func.jacrev(lambda t, k=k: two_heads(LAYOUT.unflatten(t))[k])(flat)
        for k in ("first", "second")
    )  # (7, N) each
    u = {
        "second": torch.randn(7, dtype=torch.float64, generator=generator),
        "first": torch.randn(7, dtype=torch.float64, generator=generator),
    }
    _, jtu = vjp(two_heads, params, u)
    expected = jac_first.T @ u["first"] + jac_second.T @ u["second"]
    torch.testing.assert_close(LAYOUT.flatten(jtu), expected, atol=1e-12, rtol=0)


def test_a_function_without_forward_mode_names_the_way_out(generator):
    """OrthMap's autograd.Function has no jvp: an explicit forward-over-reverse product
    raised torch's bare NotImplementedError; it now says to use double backward, and
    'auto' (and double backward) give the product of reverse over reverse."""
    from torsion.nn import OrthMap

    x = torch.randn(5, 5, dtype=torch.float64, generator=generator)
    params = {"x": x + x.mT}
    v = {"x": torch.randn(5, 5, dtype=torch.float64, generator=generator)}

    def f(p):
        return (OrthMap(2)(p["x"]) @ OrthMap(2)(p["x"]).mT).pow(2).sum() + p["x"].pow(3).sum()

    with pytest.raises(RuntimeError, match="use method='double_backward'"):
        hvp(f, params, v, method="forward_over_reverse")
    want = hvp(f, params, v, method="reverse_over_reverse")["x"]
    for method in ("auto", "double_backward"):
        torch.testing.assert_close(hvp(f, params, v, method=method)["x"], want)
