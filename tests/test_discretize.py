import contextlib
import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from keras import layers

import keras_das
from keras_das import MixedOp
from tests import testing

X = testing.random_inputs((2, 8, 8, 3))


def _conv_candidates():
    # The 1x1 conv is narrower than the others, so it gets a channel adapter.
    return [
        layers.Conv2D(4, 3, padding="same", name="c3"),
        layers.Conv2D(2, 1, name="c1"),
        layers.AveragePooling2D(3, 1, padding="same", name="pool"),
    ]


def _named_candidates():
    return ["sep_conv_3x3", "max_pool_3x3", "skip_connect"]


def _set_choice(mix, index):
    """Makes candidate ``index`` the clear argmax of the MixedOp's own alpha."""
    alpha = np.zeros(len(mix.candidates), "float32")
    alpha[index] = 3.0
    mix.alpha.assign(alpha)


@contextlib.contextmanager
def one_hot_mixing(model, choices=None):
    """Runs every MixedOp of ``model`` with one-hot mixing weights on its chosen candidate.

    The MixedOps' own ``call`` computes the reference, weights exactly 1 and 0, whatever
    mixing weights their owner passes.
    """
    choices = choices or {}
    mixes = [layer for layer in model._flatten_layers() if isinstance(layer, MixedOp)]
    for mix in mixes:
        index = choices.get(mix.name)
        if index is None:
            index = mix.chosen_index()
        one_hot = np.eye(len(mix.candidates), dtype="float32")[index]

        def call(inputs, mixing_weights=None, training=None, mix=mix, one_hot=one_hot):
            return MixedOp.call(mix, inputs, mixing_weights=one_hot, training=training)

        mix.call = call
    try:
        yield
    finally:
        for mix in mixes:
            del mix.call


def _functional_supernet():
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    h = MixedOp(_conv_candidates(), name="mix_a")(h)
    h = MixedOp(_named_candidates(), name="mix_b")(h)
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


class _AttributeSupernet(keras.Model):
    """A subclassed supernet: MixedOps are attributes, mixed with keras.ops in call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = layers.Conv2D(4, 3, padding="same")
        self.mix_a = MixedOp(_conv_candidates(), name="mix_a")
        self.mix_b = MixedOp(_named_candidates(), name="mix_b")
        self.head = layers.Dense(3)

    def call(self, inputs, training=None):
        h = self.stem(inputs)
        h = keras.ops.relu(self.mix_a(h, training=training)) + h
        h = self.mix_b(h, training=training)
        return self.head(keras.ops.mean(h, axis=(1, 2)))


class _SharedAlphaSupernet(keras.Model):
    """Two MixedOps that share the model's alpha, passed as mixing weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = layers.Conv2D(4, 3, padding="same")
        self.mixes = [
            MixedOp(_named_candidates(), owns_alpha=False, name=f"shared_{i}") for i in range(2)
        ]
        self.head = layers.Dense(3)

    def build(self, input_shape):
        self.alpha = keras_das.space.variables.add_arch_weight(self, "alpha", (3,))

    def call(self, inputs, training=None):
        weights = keras.ops.softmax(self.alpha)
        h = self.stem(inputs)
        for mix in self.mixes:
            h = mix(h, mixing_weights=weights, training=training)
        return self.head(keras.ops.mean(h, axis=(1, 2)))


def _assert_discrete(model):
    assert not [layer for layer in model._flatten_layers() if isinstance(layer, MixedOp)]
    assert keras_das.arch_variables(model) == []


def _check_against_one_hot(supernet, discrete, choices=None):
    with one_hot_mixing(supernet, choices):
        expected = np.asarray(supernet(X, training=False))
    np.testing.assert_allclose(np.asarray(discrete(X, training=False)), expected, atol=1e-6)
    # The check has teeth: the soft mix differs from the one-hot one.
    if choices is None:
        soft = np.asarray(supernet(X, training=False))
        assert np.abs(soft - expected).max() > 1e-3


@pytest.mark.parametrize("index_a", [0, 1, 2])  # 1 has a channel adapter
@pytest.mark.parametrize("index_b", [0, 1, 2])
def test_functional_matches_one_hot_supernet(index_a, index_b):
    supernet = _functional_supernet()
    _set_choice(supernet.get_layer("mix_a"), index_a)
    _set_choice(supernet.get_layer("mix_b"), index_b)
    discrete = keras_das.discretize(supernet)
    _assert_discrete(discrete)
    _check_against_one_hot(supernet, discrete)
    assert isinstance(discrete.get_layer("mix_a"), keras.Sequential) == (index_a == 1)


def test_replacement_is_the_adapted_chosen_op():
    supernet = _functional_supernet()
    mix = supernet.get_layer("mix_a")
    _set_choice(mix, 1)
    discrete = keras_das.discretize(supernet)
    h = supernet.get_layer("stem")(X)
    expected = mix.adapters[1](mix.ops[1](h))
    got = discrete.get_layer("mix_a")(discrete.get_layer("stem")(X))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
    assert discrete.count_params() < supernet.count_params()


def test_weights_are_copies():
    supernet = _functional_supernet()
    discrete = keras_das.discretize(supernet)
    before = [np.array(w) for w in supernet.get_weights()]
    for v in discrete.trainable_variables:
        v.assign(v + 1.0)
    for b, a in zip(before, supernet.get_weights()):
        np.testing.assert_array_equal(b, a)


def test_sequential():
    supernet = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, padding="same"),
            MixedOp(_conv_candidates(), name="mix_a"),
            MixedOp(_named_candidates(), name="mix_b"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3),
        ]
    )
    _set_choice(supernet.get_layer("mix_a"), 1)
    _set_choice(supernet.get_layer("mix_b"), 0)
    discrete = keras_das.discretize(supernet)
    assert isinstance(discrete, keras.Sequential)
    _assert_discrete(discrete)
    _check_against_one_hot(supernet, discrete)


def test_nested_functional():
    inner_inputs = keras.Input((8, 8, 4))
    inner = keras.Model(
        inner_inputs, MixedOp(_conv_candidates(), name="inner_mix")(inner_inputs), name="inner"
    )
    inputs = keras.Input((8, 8, 3))
    h = inner(layers.Conv2D(4, 3, padding="same")(inputs))
    supernet = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))
    _set_choice(inner.get_layer("inner_mix"), 1)
    discrete = keras_das.discretize(supernet)
    _assert_discrete(discrete)
    _check_against_one_hot(supernet, discrete)


def test_subclassed_model_is_traced_into_a_functional_model():
    supernet = _AttributeSupernet()
    supernet(X)
    _set_choice(supernet.mix_a, 1)
    _set_choice(supernet.mix_b, 0)
    discrete = keras_das.discretize(supernet)
    _assert_discrete(discrete)
    _check_against_one_hot(supernet, discrete)
    sep_conv = discrete.get_layer("mix_b")  # sep_conv_3x3 as a Sequential of Keras layers
    assert isinstance(sep_conv, keras.Sequential)
    assert [type(layer).__name__ for layer in sep_conv.layers] == [
        "ReLU", "DepthwiseConv2D", "Conv2D", "BatchNormalization",
        "ReLU", "DepthwiseConv2D", "Conv2D", "BatchNormalization",
    ]  # fmt: skip
    # Any batch size, not just the one the supernet was built with.
    assert discrete(np.concatenate([X, X, X])).shape == (6, 3)


def test_shared_alpha_needs_choices():
    supernet = _SharedAlphaSupernet()
    supernet(X)
    with pytest.raises(ValueError, match=r"shared_0.*shared_1.*owns_alpha=False.*choices"):
        keras_das.discretize(supernet)
    with pytest.raises(ValueError, match=r"\['shared_1'\] share"):
        keras_das.discretize(supernet, choices={"shared_0": 0})


def test_shared_alpha_with_choices():
    supernet = _SharedAlphaSupernet()
    supernet(X)
    choices = {"shared_0": 0, supernet.mixes[1]: 2}
    discrete = keras_das.discretize(supernet, choices=choices)
    _assert_discrete(discrete)
    _check_against_one_hot(supernet, discrete, {"shared_0": 0, "shared_1": 2})


def test_choices_override_the_alpha():
    supernet = _functional_supernet()
    _set_choice(supernet.get_layer("mix_a"), 0)
    _set_choice(supernet.get_layer("mix_b"), 0)
    discrete = keras_das.discretize(supernet, choices={"mix_a": 1})
    _check_against_one_hot(supernet, discrete, {"mix_a": 1})
    assert isinstance(discrete.get_layer("mix_a"), keras.Sequential)


@pytest.mark.parametrize(
    "choices, error, match",
    [
        ({"mix_c": 0}, ValueError, r"'mix_c'.*expected one of \['mix_a', 'mix_b'\]"),
        ({"mix_a": 3}, ValueError, r"choices\['mix_a'\] = 3.*\[0, 3\).*0: c3, 1: c1, 2: pool"),
        ({"mix_a": -1}, ValueError, r"= -1"),
        ({"mix_a": True}, ValueError, r"= True"),
        ({"mix_a": 1.0}, ValueError, r"= 1.0"),
        ({0: 1}, TypeError, r"keys must be MixedOp layers or their names, got 0"),
    ],
)
def test_bad_choices(choices, error, match):
    with pytest.raises(error, match=match):
        keras_das.discretize(_functional_supernet(), choices=choices)


def test_choices_with_a_foreign_mixed_op():
    other = MixedOp(_named_candidates(), name="elsewhere")
    with pytest.raises(ValueError, match=r"'elsewhere', which is not in the model"):
        keras_das.discretize(_functional_supernet(), choices={other: 0})


def test_model_without_mixed_ops():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layers.Conv2D(2, 1)(inputs), name="plain")
    with pytest.raises(ValueError, match=r"'plain' contains no MixedOp"):
        keras_das.discretize(model)


def test_unbuilt_mixed_op():
    supernet = _AttributeSupernet()
    with pytest.raises(ValueError, match=r"MixedOp 'mix_a' has not been built"):
        keras_das.discretize(supernet)


def test_search_network_points_to_the_genotype():
    config = dict(
        num_classes=3,
        channels=4,
        num_cells=1,
        steps=1,
        multiplier=1,
        op_names=("max_pool_3x3", "skip_connect"),
    )
    fused = keras_das.SearchNetwork(**config)
    fused(X)
    with pytest.raises(ValueError, match=r"no MixedOp layer.*genotype.*DiscreteNetwork"):
        keras_das.discretize(fused)
    net = keras_das.SearchNetwork(**config, cell_implementation="per_edge")
    net(X)
    with pytest.raises(ValueError, match=r"owns_alpha=False.*genotype.*DiscreteNetwork"):
        keras_das.discretize(net)
    choices = {layer: 0 for layer in net._flatten_layers() if isinstance(layer, MixedOp)}
    with pytest.raises(ValueError, match=r"inside layer .*SearchCell.*DiscreteNetwork"):
        keras_das.discretize(net, choices=choices)


class _ArchScale(layers.Layer):
    """Not a MixedOp, yet it holds an architecture parameter."""

    def build(self, input_shape):
        self.alpha = keras_das.space.variables.add_arch_weight(self, "alpha", ())

    def call(self, inputs):
        return inputs * self.alpha


def test_other_architecture_parameters_are_an_error():
    inputs = keras.Input((8, 8, 3))
    h = MixedOp(_named_candidates(), name="mix_b")(inputs)
    supernet = keras.Model(inputs, _ArchScale(name="scale")(h))
    with pytest.raises(ValueError, match=r"\['scale/alpha'\] belong to layers that are not"):
        keras_das.discretize(supernet)


def _keras_config(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def _outputs_loaded_without_keras_das(tmp_path, model):
    """Saves ``model``, loads it in a process where keras_das cannot be imported, and
    returns that model's outputs on ``X`` (after checking the file names no keras_das class)."""
    path = os.path.join(tmp_path, "discrete.keras")
    model.save(path)
    assert "keras_das" not in json.dumps(_keras_config(path))
    np.save(os.path.join(tmp_path, "x.npy"), X)
    script = (
        "import sys\n"
        "sys.modules['keras_das'] = None  # the editable install would make it importable\n"
        "try:\n"
        "    import keras_das\n"
        "    raise SystemExit('keras_das is importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "import keras, numpy as np\n"
        "model = keras.models.load_model('discrete.keras')\n"
        "np.save('y.npy', np.asarray(model(np.load('x.npy'), training=False)))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(os.path.join(tmp_path, "y.npy"))


def test_saves_and_loads_without_keras_das(tmp_path):
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same")(inputs)
    h = MixedOp(_conv_candidates(), name="mix_a")(h)
    supernet = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))
    _set_choice(supernet.get_layer("mix_a"), 1)  # a Conv2D and its adapter
    discrete = keras_das.discretize(supernet)
    np.testing.assert_allclose(
        _outputs_loaded_without_keras_das(tmp_path, discrete),
        np.asarray(discrete(X, training=False)),
        atol=1e-6,
    )


# Named ops chosen in each MixedOp of _named_op_supernet: (candidates, strides, chosen).
NAMED_CHOICES = {
    "sep": (["sep_conv_3x3", "sep_conv_5x5", "skip_connect"], 1, 0),
    "dil": (["dil_conv_3x3", "dil_conv_5x5", "skip_connect"], 1, 1),
    "avg": (["avg_pool_3x3", "max_pool_3x3", "sep_conv_3x3"], 1, 0),
    "max": (["avg_pool_3x3", "max_pool_3x3", "sep_conv_3x3"], 1, 1),
    "skip": (["skip_connect", "sep_conv_3x3"], 1, 0),
    "dil_strided": (["dil_conv_3x3", "sep_conv_3x3"], 2, 0),
    "sep_strided": (["dil_conv_3x3", "sep_conv_3x3"], 2, 1),
}


def _named_op_supernet():
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    for name, (candidates, strides, _) in NAMED_CHOICES.items():
        h = MixedOp(candidates, strides=strides, name=name)(h)
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))


def test_chosen_named_ops_are_keras_layers_and_load_without_keras_das(tmp_path):
    supernet = _named_op_supernet()
    supernet(X, training=True)  # batch statistics away from their initial values
    for name, (_, _, index) in NAMED_CHOICES.items():
        _set_choice(supernet.get_layer(name), index)
    discrete = keras_das.discretize(supernet)
    _check_against_one_hot(supernet, discrete)
    np.testing.assert_allclose(
        _outputs_loaded_without_keras_das(tmp_path, discrete),
        np.asarray(discrete(X, training=False)),
        atol=1e-6,
    )


def test_op_without_a_keras_equivalent_saves_and_reloads_with_keras_das(tmp_path):
    inputs = keras.Input((8, 8, 3))
    h = layers.Conv2D(4, 3, padding="same")(inputs)
    h = MixedOp(["skip_connect", "max_pool_3x3"], strides=2, name="reduce")(h)
    supernet = keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(h)))
    _set_choice(supernet.get_layer("reduce"), 0)  # FactorizedReduce: no Keras equivalent
    discrete = keras_das.discretize(supernet)
    path = os.path.join(tmp_path, "discrete.keras")
    discrete.save(path)
    assert '"module": "keras_das.space.primitives"' in json.dumps(_keras_config(path))
    reloaded = keras.models.load_model(path)
    _assert_discrete(reloaded)
    np.testing.assert_allclose(
        np.asarray(reloaded(X, training=False)), np.asarray(discrete(X, training=False)), atol=1e-6
    )
