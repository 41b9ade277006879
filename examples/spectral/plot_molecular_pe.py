"""
Positional encodings for molecular property regression
======================================================

Message-passing networks cannot tell apart nodes whose neighbourhoods look alike, so
they cannot count ring sizes or see how far apart two groups are. Positional encodings
(PEs) add that information to the node features. This example trains **the same** small
graph network on a real chemistry task four ways:

* **no PE**;
* **LapPE + SignNet**: the 8 smallest non-trivial eigenvectors of each molecule's
  normalized Laplacian (``AddLaplacianPE(k=8)``), read by a sign-invariant
  :class:`~torsion.spectral.SignNet`;
* **SPE**: the same eigenpairs read by :class:`~torsion.spectral.SPE`, which is
  invariant to any basis of the eigenspaces and stable under perturbations;
* **RWPE**: the random-walk return probabilities ``[P^t]_ii``, ``t = 1 .. 16``
  (``AddRandomWalkPE(16)``), through a linear layer.

The data ship inside the RDKit wheel; nothing is downloaded. The molecules are the 5,000
NCI compounds of ``rdkit/Data/NCI/first_5K.smi``; the target is ZINC's *penalized logP*,
``logP - SA - max(0, largest ring - 6)``: RDKit's Crippen logP minus the synthetic
accessibility score of Ertl & Schuffenhauer (``rdkit/Contrib/SA_Score``) minus a penalty
on rings larger than six atoms. Atoms are described as in the ZINC benchmark (element,
charge, hydrogens, aromaticity; no ring or degree flags) and bonds by their type, so ring
sizes must come from the graph itself.

Both transforms run **once on the whole data set**, collated into one PyG ``Batch``: the
Laplacian eigenpairs of all molecules come from one batched dense ``eigh`` per molecule
size, the return probabilities from blocked sparse x dense products whose cost is that of
the largest molecule.
"""

# %%
import copy
import math
import os
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from rdkit import Chem, RDConfig, RDLogger
from rdkit.Chem import Crippen
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GINEConv, global_add_pool

from torsion.spectral import SPE, AddLaplacianPE, AddRandomWalkPE, SignNet

sys.path.append(os.path.join(RDConfig.RDContribDir, "SA_Score"))
import sascorer  # the SA-score model that ships with RDKit

quick = os.environ.get("TORSION_QUICK") == "1"
out = Path(os.environ.get("TORSION_OUT", "."))
out.mkdir(parents=True, exist_ok=True)
RDLogger.DisableLog("rdApp.*")  # a few NCI entries do not parse; they are skipped
torch.manual_seed(0)

NUM_EIGENPAIRS = 8
WALK_LENGTH = 16

# %%
# Molecules and targets. Every SMILES line of the file is parsed; those RDKit rejects
# are skipped. Salts and mixtures stay in: they are disconnected graphs, whose extra
# zero eigenvalues ``AddLaplacianPE`` leaves out.
ELEMENTS = ["C", "N", "O", "S", "F", "Cl", "Br", "I", "P"]  # and "other"
BOND_TYPES = [
    Chem.BondType.SINGLE,
    Chem.BondType.DOUBLE,
    Chem.BondType.TRIPLE,
    Chem.BondType.AROMATIC,
]


def one_hot(index: int, size: int) -> list[float]:
    return [float(i == index) for i in range(size)]


def atom_features(atom: Chem.Atom) -> list[float]:
    """Element (10), formal charge sign (3), attached hydrogens 0..3+ (4), aromaticity (1)."""
    symbol = atom.GetSymbol()
    element = ELEMENTS.index(symbol) if symbol in ELEMENTS else len(ELEMENTS)
    charge = max(-1, min(1, atom.GetFormalCharge())) + 1
    hydrogens = min(atom.GetTotalNumHs(), 3)
    return [
        *one_hot(element, len(ELEMENTS) + 1),
        *one_hot(charge, 3),
        *one_hot(hydrogens, 4),
        float(atom.GetIsAromatic()),
    ]


def penalized_logp(mol: Chem.Mol) -> float:
    """ZINC's target: Crippen logP minus SA score minus the large-ring penalty."""
    rings = [len(ring) for ring in mol.GetRingInfo().AtomRings()]
    ring_penalty = max(max(rings, default=0) - 6, 0)
    return Crippen.MolLogP(mol) - sascorer.calculateScore(mol) - ring_penalty


def molecule_graph(mol: Chem.Mol) -> Data:
    """Atoms as nodes, each bond as two directed edges with a one-hot bond type."""
    x = torch.tensor([atom_features(atom) for atom in mol.GetAtoms()])
    pairs, types = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        # the few other bond types (dative, ...) count as single bonds
        kind = BOND_TYPES.index(bond.GetBondType()) if bond.GetBondType() in BOND_TYPES else 0
        pairs += [(i, j), (j, i)]
        types += [kind, kind]
    edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.contiguous()
    edge_attr = nn.functional.one_hot(torch.tensor(types, dtype=torch.long), 4).float()
    y = torch.tensor([penalized_logp(mol)])
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, y=y)


smiles_file = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
lines = [line.split()[0] for line in smiles_file.read_text().splitlines() if line.strip()]
order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(0)).tolist()
wanted = 400 if quick else 4000
graphs, disconnected = [], 0
for index in order:
    mol = Chem.MolFromSmiles(lines[index])
    if mol is None or mol.GetNumAtoms() == 0:
        continue
    graphs.append(molecule_graph(mol))
    disconnected += len(Chem.GetMolFrags(mol)) > 1
    if len(graphs) == wanted:
        break
sizes = torch.tensor([g.num_nodes for g in graphs])
print(
    f"{len(graphs)} molecules of {int(sizes.min())}-{int(sizes.max())} heavy atoms "
    f"(median {int(sizes.median())}); {disconnected} are salts or mixtures (disconnected)"
)

# %%
# Positional encodings for the whole data set in one call each. ``AddLaplacianPE``
# stores ``lap_pe`` ``(N, 8)``, ``lap_pe_eigvals`` and ``lap_pe_mask`` ``(B, 8)``; a
# molecule with fewer than 8 non-trivial eigenpairs gets zero columns and ``False`` in
# the mask. Signs follow the canonical rule (the first non-negligible odd moment of each
# eigenvector is made positive), so they depend neither on the solver nor on the atom
# order, except for eigenvectors whose entries are symmetric under ``v -> -v``, where no
# order-independent rule exists.
everything = Batch.from_data_list(graphs)
start = time.perf_counter()
everything = AddLaplacianPE(k=NUM_EIGENPAIRS)(everything)
lap_seconds = time.perf_counter() - start
start = time.perf_counter()
everything = AddRandomWalkPE(walk_length=WALK_LENGTH)(everything)
rw_seconds = time.perf_counter() - start
print(
    f"AddLaplacianPE(k={NUM_EIGENPAIRS}) on all {everything.num_graphs} molecules in one call: "
    f"{lap_seconds:.2f} s; AddRandomWalkPE({WALK_LENGTH}): {rw_seconds:.2f} s"
)
padded = (~everything.lap_pe_mask).any(1).sum()
print(f"{int(padded)} molecules have fewer than {NUM_EIGENPAIRS} non-trivial eigenpairs")


# Both transforms record how their attributes split, so ``to_data_list()`` hands each
# molecule its rows.
dataset = everything.to_data_list()
split = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1)).tolist()
num_val = num_test = len(dataset) // 10
test_set = [dataset[i] for i in split[:num_test]]
val_set = [dataset[i] for i in split[num_test : num_test + num_val]]
train_set = [dataset[i] for i in split[num_test + num_val :]]
train_y = torch.cat([g.y for g in train_set])
y_mean, y_std = train_y.mean(), train_y.std()
baseline_mae = float((torch.cat([g.y for g in test_set]) - train_y.median()).abs().mean())
print(
    f"{len(train_set)} training, {len(val_set)} validation, {len(test_set)} test molecules; "
    f"target std {float(y_std):.2f}; predicting the training median gives test MAE "
    f"{baseline_mae:.3f}"
)


# %%
# The network: an atom embedding plus the positional encoding (nothing for "no PE"),
# four residual GINE layers over the bonds, sum pooling and a two-layer head. Only the
# positional branch differs between the four variants. The encoders take the
# eigenpairs in the layout ``AddLaplacianPE`` stores them, with its mask of the missing
# eigenpairs (graphs with fewer than ``k`` non-trivial ones).
class MoleculeGNN(nn.Module):
    def __init__(self, pe: str, hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.pe = pe
        self.atom = nn.Linear(graphs[0].num_node_features, hidden)
        if pe == "LapPE + SignNet":
            self.encoder = SignNet(hidden, hidden_channels=32)
        elif pe == "SPE":
            self.encoder = SPE(hidden, num_partitions=16, hidden_channels=32)
        elif pe == "RWPE":
            self.encoder = nn.Linear(WALK_LENGTH, hidden)
        self.convs = nn.ModuleList(
            GINEConv(
                nn.Sequential(
                    nn.Linear(hidden, hidden),
                    nn.BatchNorm1d(hidden),
                    nn.ReLU(),
                    nn.Linear(hidden, hidden),
                ),
                edge_dim=len(BOND_TYPES),
            )
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def positional(self, data: Batch) -> torch.Tensor | float:
        if self.pe == "RWPE":
            return self.encoder(data.rw_pe)
        if self.pe == "no PE":
            return 0.0
        return self.encoder(
            data.lap_pe,
            data.lap_pe_eigvals,
            data.batch,
            edge_index=data.edge_index,
            mask=data.lap_pe_mask,
        )

    def forward(self, data: Batch) -> torch.Tensor:
        h = self.atom(data.x) + self.positional(data)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = h + torch.relu(norm(conv(h, data.edge_index, data.edge_attr)))
        return self.head(global_add_pool(h, data.batch, size=data.num_graphs)).squeeze(-1)


@torch.no_grad()
def mean_absolute_error(model: nn.Module, molecules: list[Data]) -> float:
    model.eval()
    errors = [
        (model(batch) * y_std + y_mean - batch.y).abs()
        for batch in DataLoader(molecules, batch_size=256)
    ]
    return float(torch.cat(errors).mean())


def train(pe: str, epochs: int) -> dict:
    """Adam on the L1 loss of the standardized target; test MAE at the best validation."""
    torch.manual_seed(0)
    model = MoleculeGNN(pe)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(
        train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    history = {"train": [], "val": [], "best": math.inf, "state": None, "epoch": 0}
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for batch in loader:
            optimizer.zero_grad()
            loss = (model(batch) - (batch.y - y_mean) / y_std).abs().mean()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.num_graphs
        scheduler.step()
        history["train"].append(total / len(train_set) * float(y_std))
        history["val"].append(mean_absolute_error(model, val_set))
        if history["val"][-1] < history["best"]:
            history["best"], history["epoch"] = history["val"][-1], epoch + 1
            history["state"] = copy.deepcopy(model.state_dict())
    history["seconds"] = time.perf_counter() - start
    model.load_state_dict(history["state"])
    history["test"] = mean_absolute_error(model, test_set)
    history["parameters"] = sum(p.numel() for p in model.parameters())
    return history


epochs = 2 if quick else 12
results = {pe: train(pe, epochs) for pe in ("no PE", "LapPE + SignNet", "SPE", "RWPE")}

# %%
# Results: test MAE of penalized logP at the epoch of the best validation MAE.
print("\n| model | parameters | best epoch | test MAE | training time |")
print("|---|---|---|---|---|")
for pe, result in results.items():
    print(
        f"| {pe} | {result['parameters']} | {result['epoch']}/{epochs} | "
        f"{result['test']:.3f} | {result['seconds']:.1f} s |"
    )
print(f"| training median (no model) | 0 | - | {baseline_mae:.3f} | - |")

fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for pe, result in results.items():
    epochs_axis = range(1, epochs + 1)
    ax_train.plot(epochs_axis, result["train"], marker=".", label=pe)
    ax_val.plot(epochs_axis, result["val"], marker=".", label=pe)
for ax, title in ((ax_train, "training"), (ax_val, "validation")):
    # the training median as a predictor, scored on the test set (a yardstick, not a curve)
    ax.axhline(baseline_mae, color="gray", linestyle="--", label="median predictor, test MAE")
    ax.set(xlabel="epoch", title=f"{title} MAE", yscale="log")
ax_train.set_ylabel("MAE of penalized logP")
ax_val.legend()
fig.tight_layout()
fig.savefig(out / "molecular_pe.png", dpi=120)

# %%
# What to read from it. In the full run (3,200 training molecules, 12 epochs, about
# 80 s of training on one core) every network beats the trivial predictor (test MAE 1.93)
# by a factor of three to five, and all curves are still falling at the last epoch: this
# is a short training run, not a converged benchmark. The test MAEs of seed 0 with the
# code of 2026-11-25 (evening) were 0.50 (no PE), 0.57 (LapPE + SignNet), 0.39 (SPE) and
# 0.38 (RWPE); that morning's code gave 0.66 for LapPE + SignNet and 0.38 for SPE (the
# eigenvectors of the 109 disconnected molecules moved at rounding level when each
# component's null vector got a shift of its own). Changing the initialisation seed moves
# them by up to about 0.12 (with an earlier
# version of the code, the means over seeds 0, 1 and 2 were 0.41 (no PE), 0.58 (LapPE +
# SignNet), 0.40 (SPE) and 0.36 (RWPE); rerun the seeds before quoting a ranking).
#
# So, honestly, at this scale:
#
# * **RWPE helps**, consistently (the best of the four for all three seeds in the earlier
#   version; tied with SPE at seed 0 now). Return probabilities are a direct signal of the
#   rings a node sits on (``[P^t]_ii`` for small even and odd ``t``), and ring sizes (the
#   large-ring penalty, the SA score's ring terms) are what message passing on these atom
#   features cannot count; we did not check which part of the target the gain comes from.
# * **SPE helps at seed 0** (0.39 against 0.50 without PE), but was within the seed spread
#   of no PE in the three-seed means of the earlier version. It costs about four times the
#   time of the base network per step, for pair features over whole molecules.
# * **LapPE + SignNet hurts** here: its training loss falls more slowly too, so it is an
#   optimisation effect, not overfitting; SignNet adds a sum over eight eigenvectors to
#   the atom embedding, and 12 epochs are not enough to make use of it. The published
#   gain of SignNet on ZINC (test MAE 0.128 -> 0.105 for PNA with 8 eigenvectors) comes
#   from full-length training on ZINC's 10,000 training molecules.
#
# What the encodings do guarantee does not depend on the training budget: the
# eigenvectors' signs are canonical (no random flips between runs, and none between atom
# orderings outside the symmetric fallback),
# SignNet is exactly invariant to them, SPE is invariant to any basis of a repeated
# eigenvalue and stable, and disconnected salts get no spurious "positions" from their
# null space.
