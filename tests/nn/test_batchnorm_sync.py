"""SPDBatchNorm(sync=True) on two gloo ranks equals the layer on the concatenated batch."""

from __future__ import annotations

import pytest
import torch

from tests._distributed import run_on_ranks
from tests.nn._spd import F64, random_spd
from torsion.nn import SPDBatchNorm

WORLD_SIZE = 2
N = 3
METRICS = ("airm", "lem", "lcm")


def _inputs():
    generator = torch.Generator().manual_seed(7)
    # the two shards differ in spread, so their local statistics differ from the global ones
    x = torch.cat(
        [
            random_spd(4, n=N, generator=generator),
            random_spd(6, n=N, generator=generator, spread=3.0),
        ]
    )
    weights = torch.randn(x.shape, generator=generator, dtype=F64)
    bias = random_spd(n=N, generator=generator)
    return x, weights, bias


def _layer(metric: str, sync: bool, bias: torch.Tensor) -> SPDBatchNorm:
    layer = SPDBatchNorm(N, metric, momentum=0.3, sync=sync, dtype=F64)
    with torch.no_grad():
        layer.bias.copy_(bias)
        layer.scale.fill_(1.3)
    return layer


def _shards(t: torch.Tensor, sizes: tuple[int, int] = (4, 6)) -> tuple[torch.Tensor, ...]:
    return t[: sum(sizes)].split(list(sizes))


def _run(layer: SPDBatchNorm, x: torch.Tensor, weights: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * weights).sum().backward()
    return {
        "out": out.detach(),
        "grad_x": x.grad,
        "grad_bias": layer.bias.grad,
        "grad_scale": layer.scale.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
    }


def _on_rank(
    rank: int, world_size: int, metric: str, sync: bool, sizes: tuple[int, int] = (4, 6)
) -> dict:
    x, weights, bias = _inputs()
    layer = _layer(metric, sync, bias)
    return _run(layer, _shards(x, sizes)[rank], _shards(weights, sizes)[rank])


def _error_on_rank(rank: int, world_size: int, metric: str) -> str:
    """The message each rank raises when every shard is empty (returned, not raised, so
    that the test sees all ranks finish)."""
    try:
        _on_rank(rank, world_size, metric, True, (0, 0))
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("metric", METRICS)
def test_synced_statistics_equal_the_concatenated_batch(metric):
    x, weights, bias = _inputs()
    full = _run(_layer(metric, False, bias), x, weights)
    ranks = run_on_ranks(_on_rank, metric, True, world_size=WORLD_SIZE)
    close = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), full["out"], **close)
    # every rank's input gets the gradient of the summed losses (torch.nn.SyncBatchNorm's
    # convention); the parameter gradients add up to the full-batch ones
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), full["grad_x"], **close)
    for name in ("grad_bias", "grad_scale"):
        torch.testing.assert_close(sum(r[name] for r in ranks), full[name], **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], full["running_mean"], **close)
        torch.testing.assert_close(r["running_var"], full["running_var"], **close)


@pytest.mark.parametrize("metric", METRICS)
def test_a_rank_with_an_empty_batch_joins_the_statistics(metric):
    """One rank's shard is empty: it still joins every all-reduce (no hang), returns an
    empty batch and ends with the same running statistics; the other rank's rows are the
    layer on the whole batch."""
    x, weights, bias = _inputs()
    full = _run(_layer(metric, False, bias), x, weights)
    ranks = run_on_ranks(_on_rank, metric, True, (10, 0), world_size=WORLD_SIZE)
    close = {"rtol": 1e-10, "atol": 1e-12}
    assert ranks[1]["out"].shape == (0, N, N) and ranks[1]["grad_x"].shape == (0, N, N)
    torch.testing.assert_close(ranks[0]["out"], full["out"], **close)
    torch.testing.assert_close(ranks[0]["grad_x"], full["grad_x"], **close)
    for name in ("grad_bias", "grad_scale"):
        torch.testing.assert_close(ranks[0][name] + ranks[1][name], full[name], **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], full["running_mean"], **close)
        torch.testing.assert_close(r["running_var"], full["running_var"], **close)


def test_every_rank_raises_when_every_batch_is_empty():
    messages = run_on_ranks(_error_on_rank, "airm", world_size=WORLD_SIZE)
    assert all("every rank's batch is empty" in m for m in messages), messages


def test_unsynced_ranks_differ_from_the_concatenated_batch():
    """The control: local statistics are not the global ones on these shards."""
    x, weights, bias = _inputs()
    full = _run(_layer("airm", False, bias), x, weights)
    ranks = run_on_ranks(_on_rank, "airm", False, world_size=WORLD_SIZE)
    gap = (torch.cat([r["out"] for r in ranks]) - full["out"]).abs().max()
    assert gap > 1e-3


@pytest.mark.parametrize("metric", METRICS)
def test_sync_without_a_process_group_is_the_local_layer(metric):
    x, weights, bias = _inputs()
    synced = _run(_layer(metric, True, bias), x, weights)
    local = _run(_layer(metric, False, bias), x, weights)
    for key, value in local.items():
        torch.testing.assert_close(synced[key], value, rtol=0, atol=0)


def test_sync_must_be_a_bool():
    with pytest.raises(TypeError, match="sync"):
        SPDBatchNorm(N, sync="yes")
