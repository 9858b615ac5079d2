import json

import numpy as np
import pytest

from keras_das import DARTS_OPS
from keras_das import DARTS_V1
from keras_das import DARTS_V2
from keras_das import Genotype
from keras_das import derive_genotype
from keras_das.space import genotype as genotype_lib


def _weights_for(gene, strength=0.9, steps=4):
    """Hand-set mixing weights whose strongest entries spell out ``gene``.

    Within each node, the first listed edge is made stronger than the second, and every
    other entry small; ``none`` gets the largest weight everywhere, which the rule ignores.
    """
    w = np.full((sum(2 + i for i in range(steps)), len(DARTS_OPS)), 0.01)
    w[:, DARTS_OPS.index("none")] = 0.95
    start = 0
    for node in range(steps):
        for rank, (op, j) in enumerate(gene[2 * node : 2 * node + 2]):
            w[start + j, DARTS_OPS.index(op)] = strength - 0.1 * rank
        start += 2 + node
    return w


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2])
def test_derivation_on_hand_set_weights(genotype):
    derived = derive_genotype(
        _weights_for(genotype.normal), _weights_for(genotype.reduce), DARTS_OPS
    )
    assert derived == genotype


def test_derivation_keeps_the_two_strongest_edges_by_non_none_op():
    w = np.zeros((14, 8))
    # Node 0: edge from input 1 is strongest (dil_conv_5x5), input 0 second (max_pool).
    w[0, 1], w[1, 7] = 0.4, 0.6
    # Node 1 (edges 2, 3, 4): only `none` is large on edge 2 -> not chosen.
    w[2, 0], w[2, 4] = 0.99, 0.01
    w[3, 5], w[4, 3] = 0.3, 0.5
    gene = genotype_lib.derive_edges(w, DARTS_OPS, steps=4)
    assert gene[:4] == (
        ("dil_conv_5x5", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("sep_conv_5x5", 1),
    )


def test_darts_v2_round_trips_through_json(tmp_path):
    assert Genotype.from_json(DARTS_V2.to_json()) == DARTS_V2
    path = tmp_path / "genotype.json"
    DARTS_V2.save(str(path))
    assert Genotype.load(str(path)) == DARTS_V2
    assert json.loads(path.read_text())["normal"][0] == ["sep_conv_3x3", 0]


def test_published_genotypes_as_in_the_reference():
    assert DARTS_V2.normal[-1] == ("dil_conv_3x3", 2)
    assert DARTS_V1.reduce[-1] == ("avg_pool_3x3", 0)
    assert DARTS_V2.count("skip_connect") == 2 and DARTS_V1.count("skip_connect") == 3
    assert genotype_lib.get_genotype("DARTS_V2") is DARTS_V2


@pytest.mark.parametrize(
    "change,message",
    [
        ({"normal": [["sep_conv_3x3", 0]] * 7}, "multiple of inputs_per_node"),
        (
            {"normal": [["sep_conv_3x3", 2]] + [["sep_conv_3x3", 0]] * 7},
            r"node 0 can only read inputs 0..1",
        ),
        ({"normal_concat": [2, 9]}, "the cell has nodes 0..5"),
        ({"reduce": "max_pool_3x3"}, "list of \\[op, input\\] pairs"),
        ({"reduce": [["max_pool_3x3", "0"]] * 8}, "must be \\(op name, input index\\)"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_malformed_genotypes_name_the_field(change, message):
    data = {**DARTS_V2.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Genotype.from_json(json.dumps(data))


def test_malformed_file_names_the_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"normal": [')
    with pytest.raises(ValueError, match="Malformed genotype file .*broken.json"):
        Genotype.load(str(path))


def test_ops_outside_the_space_are_named():
    with pytest.raises(ValueError, match="uses op 'sep_conv_3x3'; expected one of"):
        DARTS_V2.validate_ops(["skip_connect", "max_pool_3x3", "dil_conv_3x3"])


def test_unknown_named_genotype():
    with pytest.raises(ValueError, match=r"Unknown genotype 'DARTS_V9'.*DARTS_V2"):
        genotype_lib.get_genotype("DARTS_V9")


def test_random_genotypes_follow_the_darts_rule():
    """Two distinct inputs per node, ops uniform over the non-none ops, reproducible."""
    draws = [genotype_lib.random_genotype(seed) for seed in range(400)]
    assert genotype_lib.random_genotype(7) == draws[7]
    assert genotype_lib.get_genotype("random:7") == draws[7]
    assert len({d.to_json() for d in draws}) == len(draws)
    counts = dict.fromkeys(DARTS_OPS, 0)
    for g in draws:
        assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
        for gene in (g.normal, g.reduce):
            for node in range(4):
                (op_a, a), (op_b, b) = gene[2 * node : 2 * node + 2]
                assert a != b and 0 <= a < b < 2 + node
                counts[op_a] += 1
                counts[op_b] += 1
            assert (gene[0][1], gene[1][1]) == (0, 1)  # node 0 can only read 0 and 1
    assert counts["none"] == 0
    # 6400 draws over 7 ops: 914 expected each, std ~28; a 5-sigma band.
    expected = 400 * 2 * 8 / 7
    for op in DARTS_OPS[1:]:
        assert abs(counts[op] - expected) < 5 * np.sqrt(expected), (op, counts)
    # A smaller space: only its ops, none still excluded.
    small = genotype_lib.random_genotype(3, ("none", "skip_connect", "sep_conv_3x3"), steps=2)
    assert {op for op, _ in small.normal + small.reduce} <= {"skip_connect", "sep_conv_3x3"}
    assert small.steps == 2


@pytest.mark.parametrize(
    "name,message",
    [("random:x", r"random:SEED with SEED an integer"), ("random:-1", r"integer >= 0")],
)
def test_bad_random_genotype_names(name, message):
    with pytest.raises(ValueError, match=message):
        genotype_lib.get_genotype(name)


def test_random_genotype_needs_a_real_op():
    with pytest.raises(ValueError, match=r"needs an op other than 'none', got \['none'\]"):
        genotype_lib.random_genotype(0, ("none",))


def _all_skip_weights():
    """Hand-made normal-cell weights where skip_connect wins every edge, sep_conv_3x3 second."""
    w = np.full((14, 8), 0.01)
    w[:, DARTS_OPS.index("skip_connect")] = np.linspace(0.9, 0.5, 14)
    w[:, DARTS_OPS.index("sep_conv_3x3")] = np.linspace(0.3, 0.2, 14)
    return w


def test_skip_cap_keeps_the_strongest_skips_and_replaces_the_rest():
    w = _all_skip_weights()
    plain = genotype_lib.derive_edges(w, DARTS_OPS, steps=4)
    assert sum(op == "skip_connect" for op, _ in plain) == 8
    capped = genotype_lib.cap_skips(w, DARTS_OPS, steps=4, max_skips=2)
    skips = [(op, j) for op, j in capped if op == "skip_connect"]
    assert len(skips) == 2
    # The two kept are the strongest skip edges: rows 0 and 1 (node 0's inputs).
    assert capped[:2] == (("skip_connect", 0), ("skip_connect", 1))
    assert all(op == "sep_conv_3x3" for op, _ in capped[2:])
    g = derive_genotype(w, w, DARTS_OPS, max_skips=2)
    assert g.count("skip_connect", "normal") == 2 and g.count("skip_connect", "reduce") == 8


def test_parameterised_path_constraint():
    w = _all_skip_weights()
    plain = genotype_lib.derive_edges(w, DARTS_OPS, steps=4)
    assert genotype_lib.parameterised_depth(plain, (2, 3, 4, 5)) == 0
    fixed = genotype_lib.enforce_parameterised_paths(plain, w, DARTS_OPS, (2, 3, 4, 5), min_ops=1)
    assert genotype_lib.parameterised_depth(fixed, (2, 3, 4, 5)) == 1
    # Only ops change, never which inputs a node reads.
    assert [j for _, j in fixed] == [j for _, j in plain]
    changed = [p for p, (a, b) in enumerate(zip(plain, fixed)) if a != b]
    assert changed and all(fixed[p][0] == "sep_conv_3x3" for p in changed)
    g = derive_genotype(w, w, DARTS_OPS, min_param_ops=1)
    assert genotype_lib.parameterised_depth(g.normal, g.normal_concat) >= 1


def test_impossible_path_constraint_is_a_clear_error():
    w = _all_skip_weights()
    with pytest.raises(ValueError, match=r"min_param_ops=2 is not possible.*shortest.*1 edge"):
        derive_genotype(w, w, DARTS_OPS, min_param_ops=2)
