"""SPD message passing, spectral filters and positional encodings in one model, one PyG batch.

The model: Laplacian PE (``AddLaplacianPE``) -> ``SPE`` with an orthonormal readout ->
``OptBasisConv`` with an orthogonal channel frame -> per-node SPD matrices
``expm(sym(.))`` -> ``torsion.nn.SPDConv`` -> log-Euclidean readout pooled per graph.
Its Stiefel parameters (SPE's readout, the filter's frame, SPDConv's BiMaps) are trained
by ``RiemannianAdam`` together with the Euclidean ones.

The batch mixes a 5-cycle (two repeated eigenvalue pairs), a star (a repeated pair), a
random graph, a path and a graph with no edges at all (its PE is all padding; SPDConv
returns each node's root term). With ``k = 4`` no graph's eigenspace is cut by the
``k``-th eigenpair, so SPE's basis invariance holds and per-graph eigensolves may pick
any basis: the outputs must not notice.
"""

from __future__ import annotations

import geoopt
import pytest
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import global_mean_pool

from tests.spectral._eigen_graphs import cycle, path, random_graph, undirected
from torsion.linalg import sym_expm, sym_logm
from torsion.nn import SPDConv
from torsion.optim import RiemannianAdam
from torsion.spectral import SPE, AddLaplacianPE, OptBasisConv

F64 = torch.float64
FEATURES = 2  # input node features
K_PE = 4  # Laplacian eigenpairs per graph


def _upper(matrices: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of ``(N, n, n)`` matrices: ``(N, n(n+1)/2)``."""
    rows, cols = torch.triu_indices(matrices.size(-1), matrices.size(-1))
    return matrices[:, rows, cols]


class SpectralSPDNet(nn.Module):
    """PE encoder, spectral filter and SPD graph convolution; node SPD outputs and one
    prediction per graph."""

    def __init__(self, aggregation: str = "log_euclidean", channels: int = 6, pe: int = 4):
        super().__init__()
        self.spd_in, self.spd_out = 3, 2
        self.encoder = SPE(pe, num_partitions=4, hidden_channels=8, weight_manifold="stiefel")
        self.mix = nn.Linear(FEATURES + pe, channels)
        self.filter = OptBasisConv(channels, K=3, weight_manifold="stiefel")
        self.to_symmetric = nn.Linear(channels, self.spd_in * (self.spd_in + 1) // 2)
        self.conv = SPDConv(self.spd_in, self.spd_out, aggregation)
        self.head = nn.Linear(self.spd_out * (self.spd_out + 1) // 2, 1)
        #: pass the batch vector to the filter (its Lanczos inner products stay per graph)
        self.filter_per_graph = True

    def node_spd(self, data: Batch) -> Tensor:
        """Per-node SPD features ``(N, 3, 3)`` from the PE, the filter and the node features."""
        pe = self.encoder(
            data.lap_pe,
            data.lap_pe_eigvals,
            data.batch,
            edge_index=data.edge_index,
            mask=data.lap_pe_mask,
        )
        h = self.mix(torch.cat([data.x, pe], -1))
        batch = data.batch if self.filter_per_graph else None
        h = self.filter(h, data.edge_index, data.edge_weight, batch=batch)
        rows, cols = torch.triu_indices(self.spd_in, self.spd_in)
        upper = h.new_zeros(h.size(0), self.spd_in, self.spd_in)
        upper[:, rows, cols] = self.to_symmetric(torch.tanh(h))
        return sym_expm(upper + upper.mT)

    def forward(self, data: Batch) -> tuple[Tensor, Tensor]:
        """``(N, 2, 2)`` SPD node outputs and ``(B,)`` graph predictions."""
        spd = self.conv(self.node_spd(data), data.edge_index, data.edge_weight)
        pooled = global_mean_pool(_upper(sym_logm(spd)), data.batch)
        return spd, self.head(pooled).squeeze(-1)


def _model(aggregation: str = "log_euclidean") -> SpectralSPDNet:
    torch.manual_seed(0)  # module initialisation draws from the global generator
    return SpectralSPDNet(aggregation).double()


def _graphs(generator: torch.Generator) -> list[Data]:
    structures = [
        (cycle(5), 5),
        (undirected([(0, 1), (0, 2), (0, 3)]), 4),  # a star
        (torch.empty(2, 0, dtype=torch.long), 3),  # no edges
        (random_graph(7, 0.3, generator), 7),
        (path(4), 4),
    ]
    return [
        Data(
            x=torch.randn(n, FEATURES, generator=generator, dtype=F64),
            edge_index=edge_index,
            # float64 weights make AddLaplacianPE solve in float64
            edge_weight=torch.ones(edge_index.size(1), dtype=F64),
            num_nodes=n,
        )
        for edge_index, n in structures
    ]


def _prepare(graphs: list[Data]) -> Batch:
    """Collate and add the Laplacian PE of every graph in one batched call."""
    return AddLaplacianPE(k=K_PE)(Batch.from_data_list(graphs))


def _relabel(graph: Data, perm: Tensor) -> Data:
    """``graph`` with node ``perm[i]`` renamed ``i``."""
    inv = torch.argsort(perm)
    return Data(
        x=graph.x[perm],
        edge_index=inv[graph.edge_index],
        edge_weight=graph.edge_weight,
        num_nodes=graph.num_nodes,
    )


def _stiefel_parameters(model: nn.Module) -> list[geoopt.ManifoldParameter]:
    return [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]


def _orthonormality_error(weight: Tensor) -> Tensor:
    weight = weight.detach()
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype)
    return (weight.mT @ weight - eye).abs().amax()


def test_the_batch_exercises_padding_and_an_edgeless_graph(generator):
    data = _prepare(_graphs(generator))
    assert data.num_graphs == 5
    assert data.lap_pe_mask.sum(1).tolist() == [4, 3, 0, 4, 3]
    assert data.lap_pe.dtype == F64
    model = _model()
    assert len(_stiefel_parameters(model)) == 4  # SPE readout, filter frame, two BiMaps


@pytest.mark.parametrize("aggregation", ["log_euclidean", "affine_invariant"])
def test_each_graph_of_the_batch_gets_its_own_output(aggregation, generator):
    graphs = _graphs(generator)
    model = _model(aggregation)
    spd, prediction = model(_prepare(graphs))
    alone = [model(_prepare([graph])) for graph in graphs]
    torch.testing.assert_close(spd, torch.cat([s for s, _ in alone]), rtol=0, atol=1e-10)
    torch.testing.assert_close(prediction, torch.cat([p for _, p in alone]), rtol=0, atol=1e-10)


def test_the_batching_check_has_teeth(generator):
    """Without ``batch`` the optimal basis's inner products run over the whole batch."""
    graphs = _graphs(generator)
    model = _model()
    model.filter_per_graph = False
    _, prediction = model(_prepare(graphs))
    alone = torch.cat([model(_prepare([graph]))[1] for graph in graphs])
    assert (prediction - alone).abs().max() > 1e-4


def test_relabelling_nodes_permutes_node_outputs_and_keeps_graph_outputs(generator):
    graphs = _graphs(generator)
    perms = [torch.randperm(g.num_nodes, generator=generator) for g in graphs]
    model = _model()
    spd, prediction = model(_prepare(graphs))
    moved_spd, moved_prediction = model(
        _prepare([_relabel(g, p) for g, p in zip(graphs, perms, strict=True)])
    )
    offsets = torch.tensor([0, *[g.num_nodes for g in graphs]]).cumsum(0)
    perm = torch.cat([p + o for p, o in zip(perms, offsets[:-1], strict=True)])
    torch.testing.assert_close(moved_spd, spd[perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(moved_prediction, prediction, rtol=0, atol=1e-10)


def test_node_features_and_outputs_are_spd(generator):
    data = _prepare(_graphs(generator))
    model = _model()
    for matrices in (model.node_spd(data), model(data)[0]):
        assert matrices.shape[0] == data.num_nodes
        torch.testing.assert_close(matrices, matrices.mT, rtol=0, atol=1e-12)
        assert (torch.linalg.eigvalsh(matrices) > 0).all()


def test_riemannian_adam_trains_the_composed_model(generator):
    data = _prepare(_graphs(generator))
    target = torch.randn(data.num_graphs, generator=generator, dtype=F64)
    model = _model()
    optimizer = RiemannianAdam(model.parameters(), lr=0.02)
    stiefel = _stiefel_parameters(model)
    start = [p.detach().clone() for p in stiefel]
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        spd, prediction = model(data)
        loss = (prediction - target).pow(2).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for p, p0 in zip(stiefel, start, strict=True):
        assert _orthonormality_error(p) < 1e-10
        assert (p.detach() - p0).abs().max() > 1e-4  # every frame was trained
    spd, _ = model(data)
    assert (torch.linalg.eigvalsh(spd) > 0).all()
