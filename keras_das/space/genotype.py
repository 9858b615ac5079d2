"""Genotype: the discrete architecture a search ends in, and the DARTS rule that derives it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from keras_das import io_utils
from keras_das.space import primitives
from keras_das.space import topology

Gene = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Genotype:
    """A DARTS cell pair: for each intermediate node, its (op, input) pairs, and the concat.

    Inputs are numbered as in DARTS: 0 is the output of the cell two back, 1 of the cell
    before, ``2 + i`` the i-th intermediate node. Every node has the same number of inputs
    (2 in DARTS).

    Example:
        >>> g = Genotype.from_json(DARTS_V2.to_json())
        >>> g == DARTS_V2
        True
    """

    normal: Gene
    normal_concat: tuple[int, ...]
    reduce: Gene
    reduce_concat: tuple[int, ...]
    inputs_per_node: int = 2

    def __post_init__(self):
        for field in ("normal", "reduce"):
            object.__setattr__(self, field, _as_gene(field, getattr(self, field)))
        for field in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, field, _as_indices(field, getattr(self, field)))
        k = self.inputs_per_node
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"inputs_per_node must be a positive int, got {k!r}")
        for cell in ("normal", "reduce"):
            gene = getattr(self, cell)
            if not gene or len(gene) % k:
                raise ValueError(
                    f"Genotype.{cell} has {len(gene)} entries; expected a positive multiple "
                    f"of inputs_per_node={k}"
                )
            steps = len(gene) // k
            for position, (op, index) in enumerate(gene):
                node = position // k
                if not 0 <= index < 2 + node:
                    raise ValueError(
                        f"Genotype.{cell}[{position}] = ({op!r}, {index}): node {node} can "
                        f"only read inputs 0..{1 + node}"
                    )
            concat = getattr(self, f"{cell}_concat")
            if not concat:
                raise ValueError(f"Genotype.{cell}_concat is empty")
            for index in concat:
                if not 0 <= index < 2 + steps:
                    raise ValueError(
                        f"Genotype.{cell}_concat has {index}; the cell has nodes 0..{1 + steps}"
                    )

    @property
    def steps(self) -> int:
        """Number of intermediate nodes per cell."""
        return len(self.normal) // self.inputs_per_node

    def validate_ops(self, valid: Sequence[str] | None = None) -> Genotype:
        """Raises if the genotype names an op outside ``valid`` (default: the registry)."""
        valid = tuple(primitives.OPS if valid is None else valid)
        for cell in ("normal", "reduce"):
            for position, (op, _) in enumerate(getattr(self, cell)):
                if op not in valid:
                    raise ValueError(
                        f"Genotype.{cell}[{position}] uses op {op!r}; expected one of "
                        f"{sorted(valid)}"
                    )
        return self

    def count(self, op: str, cell: str = "normal") -> int:
        """How many edges of ``cell`` use ``op`` (say, skip connections)."""
        return sum(name == op for name, _ in getattr(self, cell))

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
            "inputs_per_node": self.inputs_per_node,
        }

    @classmethod
    def from_dict(cls, data) -> Genotype:
        if not isinstance(data, dict):
            raise ValueError(f"A genotype is a JSON object, got {type(data).__name__}")
        required = ("normal", "normal_concat", "reduce", "reduce_concat")
        missing = [k for k in required if k not in data]
        unknown = sorted(set(data) - set(required) - {"inputs_per_node"})
        if missing or unknown:
            raise ValueError(
                f"Genotype fields missing {missing}, unknown {unknown}; expected {list(required)}"
                " and optionally 'inputs_per_node'"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Genotype JSON does not parse: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        """Writes the JSON atomically (no half-written file after a crash)."""
        io_utils.atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> Genotype:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"Cannot read genotype file {path!r}: {e}") from e
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Malformed genotype file {path!r}: {e}") from e


def _as_gene(field, value) -> Gene:
    try:
        gene = tuple((op, index) for op, index in value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Genotype.{field} must be a list of [op, input] pairs, got {value!r}"
        ) from e
    for op, index in gene:
        if not isinstance(op, str) or isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(
                f"Genotype.{field} entry ({op!r}, {index!r}) must be (op name, input index)"
            )
    return gene


def _as_indices(field, value) -> tuple[int, ...]:
    try:
        indices = tuple(value)
    except TypeError as e:
        raise ValueError(f"Genotype.{field} must be a list of node indices, got {value!r}") from e
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"Genotype.{field} must hold ints, got {value!r}")
    return indices


def derive_edges(
    weights: np.ndarray, op_names: Sequence[str], steps: int, k: int = 2, exclude=("none",)
) -> Gene:
    """The DARTS rule for one cell type.

    For each intermediate node, keep the ``k`` incoming edges whose strongest op (``exclude``
    left out) is strongest, strongest first; on each, keep that op.

    Args:
        weights: mixing weights ``[num_edges, num_ops]``, edges ordered node by node
            (node 0's edges from inputs 0 and 1, node 1's from 0, 1, 2, ...).
        op_names: names of the ops, in the order of the last axis.
        steps: number of intermediate nodes.
        k: incoming edges kept per node.
        exclude: ops never chosen.
    """
    weights = np.asarray(weights, dtype=np.float64)
    expected = topology.num_edges(steps)
    if weights.shape != (expected, len(op_names)):
        raise ValueError(
            f"weights have shape {weights.shape}; {steps} nodes over {len(op_names)} ops need "
            f"({expected}, {len(op_names)})"
        )
    allowed = np.array([name not in exclude for name in op_names])
    if not allowed.any():
        raise ValueError(f"every op of {list(op_names)} is excluded by {list(exclude)}")
    masked = np.where(allowed, weights, -np.inf)
    gene = []
    start = 0
    for node in range(steps):
        rows = masked[start : start + 2 + node]
        strength = rows.max(axis=1)
        # Stable sort on -strength: ties keep the lower input first, as DARTS's sorted().
        keep = sorted(range(2 + node), key=lambda j: -strength[j])[:k]
        for j in keep:
            gene.append((op_names[int(np.argmax(rows[j]))], j))
        start += 2 + node
    return tuple(gene)


def cap_skips(
    weights,
    op_names: Sequence[str],
    steps: int,
    k: int = 2,
    max_skips: int = 2,
    skip: str = "skip_connect",
) -> Gene:
    """P-DARTS: the DARTS rule, keeping at most ``max_skips`` skip connections.

    While the derived cell has more, the weakest chosen skip connection is ruled out on
    its edge and the cell derived again (that edge then takes its next-best op, or the
    node its next-best edge).
    """
    if not isinstance(max_skips, int) or max_skips < 0:
        raise ValueError(f"max_skips must be an int >= 0, got {max_skips!r}")
    weights = np.array(weights, dtype=np.float64)
    if skip not in op_names:
        return derive_edges(weights, op_names, steps, k)
    s = list(op_names).index(skip)
    while True:
        gene = derive_edges(weights, op_names, steps, k)
        chosen = [
            topology.edge_index(position // k, j)
            for position, (op, j) in enumerate(gene)
            if op == skip
        ]
        if len(chosen) <= max_skips:
            return gene
        weakest = min(chosen, key=lambda row: weights[row, s])
        weights[weakest, s] = -np.inf


def parameterised_depth(gene: Gene, concat, k: int = 2, parameter_free=None) -> int:
    """The fewest parameterised ops on any path from the cell's inputs to its output."""
    parameter_free = primitives.PARAMETER_FREE_OPS if parameter_free is None else parameter_free
    steps = len(gene) // k
    depth = [0, 0] + [0] * steps
    for node in range(steps):
        depth[2 + node] = min(
            depth[j] + (op not in parameter_free) for op, j in gene[node * k : (node + 1) * k]
        )
    return min(depth[c] for c in concat)


def enforce_parameterised_paths(
    gene: Gene,
    weights,
    op_names: Sequence[str],
    concat,
    k: int = 2,
    min_ops: int = 1,
    parameter_free=None,
) -> Gene:
    """Makes every input-to-output path of a cell pass ``min_ops`` parameterised ops.

    While some path has fewer, the parameter-free op on it whose edge has the strongest
    parameterised alternative is replaced by that alternative (the least costly change in
    mixing weight). Connectivity is kept; only ops change.

    Raises:
        ValueError: when ``min_ops`` exceeds the number of edges on the cell's shortest path
            (no choice of ops could satisfy it).
    """
    parameter_free = primitives.PARAMETER_FREE_OPS if parameter_free is None else parameter_free
    weights = np.asarray(weights, dtype=np.float64)
    gene = list(gene)
    steps = len(gene) // k
    # Counting every op as parameterised gives the number of edges on the shortest path.
    shortest = parameterised_depth(tuple(gene), concat, k, parameter_free=frozenset())
    if not isinstance(min_ops, int) or not 0 <= min_ops <= shortest:
        raise ValueError(
            f"min_param_ops={min_ops!r} is not possible: the cell's shortest input-to-output "
            f"path has {shortest} edge(s); expected an int in [0, {shortest}]"
        )
    param = [i for i, name in enumerate(op_names) if name not in parameter_free]
    while parameterised_depth(tuple(gene), concat, k, parameter_free) < min_ops:
        # The positions on a path of least parameterised depth, found backwards.
        depth = [0, 0] + [0] * steps
        best_in = {}
        for node in range(steps):
            entries = [
                (depth[j] + (op not in parameter_free), node * k + e, j)
                for e, (op, j) in enumerate(gene[node * k : (node + 1) * k])
            ]
            depth[2 + node], best_in[2 + node], _ = min(entries)
        state = min(concat, key=lambda c: depth[c])
        path = []
        while state >= 2:
            position = best_in[state]
            path.append(position)
            state = gene[position][1]
        options = [
            (weights[topology.edge_index(p // k, gene[p][1]), param].max(), p)
            for p in path
            if gene[p][0] in parameter_free
        ]
        _, position = max(options)
        row = topology.edge_index(position // k, gene[position][1])
        gene[position] = (op_names[param[int(np.argmax(weights[row, param]))]], gene[position][1])
    return tuple(gene)


def derive_genotype(
    normal_weights,
    reduce_weights,
    op_names: Sequence[str],
    steps: int = 4,
    k: int = 2,
    concat: Sequence[int] | None = None,
    max_skips: int | None = None,
    min_param_ops: int = 0,
) -> Genotype:
    """The DARTS genotype for a pair of mixing-weight matrices ``[edges, ops]``.

    Args:
        normal_weights, reduce_weights: mixing weights ``[num_edges, num_ops]``.
        op_names: the ops, in the order of the last axis.
        steps: intermediate nodes per cell.
        k: incoming edges kept per node.
        concat: the nodes concatenated into a cell's output (default: all intermediate).
        max_skips: P-DARTS's cap on skip connections in the normal cell (None: no cap).
        min_param_ops: every path from the inputs to the output of the normal cell passes
            at least this many parameterised ops (0: no constraint).
    """
    concat = tuple(range(2, 2 + steps)) if concat is None else tuple(concat)
    if max_skips is None:
        normal = derive_edges(normal_weights, op_names, steps, k)
    else:
        normal = cap_skips(normal_weights, op_names, steps, k, max_skips)
    if min_param_ops:
        normal = enforce_parameterised_paths(
            normal, normal_weights, op_names, concat, k, min_param_ops
        )
    return Genotype(
        normal=normal,
        normal_concat=concat,
        reduce=derive_edges(reduce_weights, op_names, steps, k),
        reduce_concat=concat,
        inputs_per_node=k,
    )


DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)

GENOTYPES = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}
RANDOM_PREFIX = "random:"


def random_genotype(
    seed: int, op_names: Sequence[str] = primitives.DARTS_OPS, steps: int = 4
) -> Genotype:
    """A genotype drawn by the DARTS random-search rule (the baseline a search must beat).

    Every intermediate node of each cell reads two distinct inputs drawn uniformly from the
    nodes before it, each through an op drawn uniformly from ``op_names`` without ``none``;
    the cell concatenates all its intermediate nodes. The same seed gives the same genotype.
    """
    candidates = [op for op in op_names if op != "none"]
    if not candidates:
        raise ValueError(f"random_genotype needs an op other than 'none', got {list(op_names)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"random_genotype needs steps >= 1, got {steps!r}")
    rng = np.random.default_rng(seed)

    def cell() -> Gene:
        gene = []
        for node in range(steps):
            for j in sorted(rng.choice(2 + node, size=2, replace=False)):
                gene.append((candidates[rng.integers(len(candidates))], int(j)))
        return tuple(gene)

    concat = tuple(range(2, 2 + steps))
    return Genotype(normal=cell(), normal_concat=concat, reduce=cell(), reduce_concat=concat)


def get_genotype(name_or_path: str) -> Genotype:
    """A named genotype (``DARTS_V2``), ``random:SEED`` or one loaded from a JSON file."""
    if name_or_path in GENOTYPES:
        return GENOTYPES[name_or_path]
    if name_or_path.startswith(RANDOM_PREFIX):
        seed = name_or_path[len(RANDOM_PREFIX) :]
        if not seed.isdigit():
            raise ValueError(
                f"Genotype {name_or_path!r}: expected {RANDOM_PREFIX}SEED with SEED an integer >= 0"
            )
        return random_genotype(int(seed))
    if name_or_path.endswith(".json"):
        return Genotype.load(name_or_path)
    raise ValueError(
        f"Unknown genotype {name_or_path!r}; expected a .json file, {RANDOM_PREFIX}SEED or one "
        f"of {sorted(GENOTYPES)}"
    )
