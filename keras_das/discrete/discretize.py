"""Discretize: turn a model that contains MixedOps into a plain model of the chosen ops.

Each MixedOp becomes a copy of its chosen candidate, with the candidate's trained weights,
followed by a copy of that candidate's channel adapter when it has one: with one-hot mixing
weights a MixedOp computes ``adapter_c(op_c(x))``, and so does the layer put in its place.

Example:
    >>> supernet.fit(...)                       # weights and alphas trained
    >>> model = keras_das.discretize(supernet)  # argmax of every MixedOp's alpha
    >>> model.save("chosen.keras")

The DARTS search network is discretized differently: derive its genotype
(``net.genotype()``) and build ``keras_das.DiscreteNetwork`` from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import keras
from keras import layers

# Keras exports no name for the class of keras.Model(inputs, outputs); clone_model tests it.
from keras.src.models.functional import Functional

from keras_das.space import primitives
from keras_das.space import variables
from keras_das.space.mixed_op import MixedOp

_DARTS_HINT = (
    "(to discretize the DARTS SearchNetwork, derive its genotype with net.genotype() and "
    "build keras_das.DiscreteNetwork from it)"
)

# How a MixedOp is called: (self, inputs, mixing_weights=None, training=None).
_MIXED_OP_CALL = inspect.signature(MixedOp.call)


def discretize(
    model: keras.Model, choices: Mapping[str | MixedOp, int] | None = None
) -> keras.Model:
    """Returns a copy of ``model`` in which every MixedOp is replaced by its chosen op.

    The copy has fresh layers holding copies of the trained weights (training it leaves
    ``model`` untouched) and no architecture parameters. With the MixedOps' mixing weights
    one-hot on the chosen candidates, it computes what ``model`` computes.

    - Functional and Sequential models are rebuilt with ``keras.models.clone_model``,
      descending into nested Functional and Sequential models.
    - A subclassed model has no graph to rebuild, and swapping attributes in a copy would
      leave a model whose ``get_config`` still builds MixedOps, so it cannot be saved and
      reloaded. Instead its ``call`` is traced once on ``keras.Input`` of the shape it was
      built with, which records a Functional graph of the layers and ``keras.ops`` it
      calls; that graph is rebuilt as above, so the result is a Functional model. The
      trace runs in inference mode (``training`` left unset), so branches taken only
      while training, such as an auxiliary head, are not part of the result.
    - A MixedOp is replaced where the graph calls it. One that sits inside another custom
      layer (as in the DARTS ``SearchCell``) cannot be reached and is an error.

    The result saves to ``.keras``. Chosen named ops (``sep_conv_3x3``, ``dil_conv_5x5``,
    ``max_pool_3x3``, ``skip_connect``, ...) are written as compositions of Keras's own
    layers, so when the rest of the model is made of Keras layers too it loads with
    ``keras.models.load_model`` without keras_das. Only ops Keras has no layer for stay
    keras_das layers and need keras_das imported to load: stride-2 pooling (the
    reference's padding) and stride-2 ``skip_connect`` (``FactorizedReduce``).

    Args:
        model: a built Keras model containing MixedOps.
        choices: overrides the choice of some MixedOps: ``{mixed_op_or_its_name: index}``,
            an index into the MixedOp's candidates. Required for every MixedOp that shares
            its owner's alpha (``owns_alpha=False``); the others default to
            ``MixedOp.chosen_index()``, the argmax of their mixing weights, ``none`` excluded.

    Returns:
        A Functional or Sequential Keras model without MixedOps.

    Raises:
        ValueError: ``model`` contains no MixedOp (the hint for a DARTS ``SearchNetwork``,
            whose fused cells hold none, included), a MixedOp was never built, a shared-alpha
            MixedOp has no entry in ``choices``, ``choices`` names an unknown MixedOp or an
            index out of range, a MixedOp sits where the rebuild cannot reach it, or a layer
            other than a MixedOp holds architecture parameters.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"discretize expects a keras.Model, got {type(model).__name__}")
    mixed_ops = [
        layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, MixedOp)
    ]
    if not mixed_ops:
        if variables.arch_variables(model):  # e.g. a SearchNetwork of fused cells
            raise ValueError(
                f"Model {model.name!r} has architecture parameters but no MixedOp layer to "
                f"replace {_DARTS_HINT}"
            )
        raise ValueError(
            f"Model {model.name!r} contains no MixedOp; there is nothing to discretize"
        )
    for mix in mixed_ops:
        if not mix.built:
            raise ValueError(
                f"MixedOp {mix.name!r} has not been built, so it has no trained weights to "
                "keep; call the model on a batch first"
            )
    chosen = _resolve_choices(mixed_ops, choices)

    graph = model if isinstance(model, keras.Sequential | Functional) else _trace(model)
    _check_reachable(graph)
    return _rebuild(graph, chosen)


def _resolve_choices(mixed_ops, choices) -> dict[int, int]:
    """``{id(mixed_op): candidate index}`` for every MixedOp of the model."""
    chosen = {}
    by_name = {}
    for mix in mixed_ops:
        by_name.setdefault(mix.name, []).append(mix)
    for key, index in dict(choices or {}).items():
        if isinstance(key, MixedOp):
            if not any(key is mix for mix in mixed_ops):
                raise ValueError(
                    f"choices names MixedOp {key.name!r}, which is not in the model; "
                    f"its MixedOps are {sorted(by_name)}"
                )
            mix = key
        elif isinstance(key, str):
            matches = by_name.get(key, [])
            if not matches:
                raise ValueError(
                    f"choices names MixedOp {key!r}, which is not in the model; "
                    f"expected one of {sorted(by_name)}"
                )
            if len(matches) > 1:
                raise ValueError(
                    f"choices names {key!r}, which {len(matches)} MixedOps of the model "
                    "share; pass the MixedOp layers themselves as keys"
                )
            mix = matches[0]
        else:
            raise TypeError(
                f"choices keys must be MixedOp layers or their names, got {key!r} "
                f"({type(key).__name__})"
            )
        n = len(mix.candidates)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            options = ", ".join(f"{i}: {name}" for i, name in enumerate(mix.candidate_names))
            raise ValueError(
                f"choices[{mix.name!r}] = {index!r} is not a candidate index of that "
                f"MixedOp; expected an int in [0, {n}) ({options})"
            )
        chosen[id(mix)] = index
    missing = [mix.name for mix in mixed_ops if id(mix) not in chosen and not mix.owns_alpha]
    if missing:
        raise ValueError(
            f"MixedOps {missing} share their owner's alpha (owns_alpha=False), so they "
            "cannot pick an op by themselves; pass choices={name: candidate index} for "
            f"each of them {_DARTS_HINT}"
        )
    for mix in mixed_ops:
        if id(mix) not in chosen:
            chosen[id(mix)] = mix.chosen_index()
    return chosen


def _trace(model: keras.Model) -> keras.Model:
    """Records a subclassed model's ``call`` as a Functional model sharing its layers."""
    build_config = model.get_build_config() or {}
    if "input_shape" not in build_config:
        raise ValueError(
            f"Subclassed model {model.name!r} was not built on a single input, so its call "
            "cannot be traced; call it on a batch first"
        )
    inputs = keras.tree.map_shape_structure(
        lambda shape: keras.Input(batch_shape=(None, *tuple(shape)[1:])),
        build_config["input_shape"],
    )
    try:
        outputs = model.call(inputs)
        return keras.Model(inputs, outputs, name=model.name)
    except Exception as error:
        raise ValueError(
            f"Could not trace the call of subclassed model {model.name!r} "
            f"({type(model).__name__}) into a graph of layers: {error}. discretize rebuilds "
            "subclassed models whose call applies Keras layers and keras.ops to its inputs"
        ) from error


def _check_reachable(graph: keras.Model) -> None:
    """Raises if a MixedOp sits inside a layer that the rebuild copies as a whole."""
    for layer in graph.layers:
        if isinstance(layer, MixedOp):
            continue
        if isinstance(layer, keras.Sequential | Functional):
            _check_reachable(layer)
            continue
        inner = [
            sub.name
            for sub in layer._flatten_layers(include_self=False)
            if isinstance(sub, MixedOp)
        ]
        if inner:
            raise ValueError(
                f"MixedOps {inner} sit inside layer {layer.name!r} ({type(layer).__name__}); "
                "discretize replaces MixedOps that a Functional, Sequential or subclassed "
                f"model calls directly, not those inside other custom layers {_DARTS_HINT}"
            )


def _copy_layer(layer: layers.Layer, copies: list, name: str | None = None) -> layers.Layer:
    """A fresh layer of the same config; its weights are copied once the model is built."""
    config = layer.get_config()
    if name is not None:
        config["name"] = name
    new = layer.__class__.from_config(config)
    copies.append((new, layer))
    return new


def _keras_only(layer: layers.Layer, copies: list, name: str | None = None) -> layers.Layer:
    """A copy of a chosen op made of Keras's own layers where they compute the same, so the
    discrete model loads without keras_das: a chain op (``sep_conv_*``, ``dil_conv_*``,
    ``*_pool_3x3`` with its batch norm, ...) becomes a ``keras.Sequential`` of copies of its
    layers; stride-1 pooling, identity and the even-pixel subsampling of strided
    ``dil_conv`` become Keras pooling and ``Identity`` layers. What has no Keras equivalent
    (stride-2 pooling with the reference's padding, ``FactorizedReduce``, ``Zero``) stays a
    keras_das layer."""
    if isinstance(layer, primitives.OpChain):
        parts = [_keras_only(part, copies) for part in layer.chain]
        return keras.Sequential(parts, name=name or layer.name)
    kwargs = {} if name is None else {"name": name}
    if isinstance(layer, primitives.Pool) and layer.strides == 1:
        pool = layers.MaxPooling2D if layer.pool_type == "max" else layers.AveragePooling2D
        return pool(layer.pool_size, strides=1, padding="same", **kwargs)  # excludes padding
    if isinstance(layer, primitives.EvenPixels):
        return layers.MaxPooling2D(pool_size=1, strides=2, **kwargs)  # x[:, ::2, ::2]
    if isinstance(layer, primitives.Identity):
        return layers.Identity(**kwargs)
    return _copy_layer(layer, copies, name=name)


def _rebuild(graph: keras.Model, chosen: dict[int, int]) -> keras.Model:
    copies = []  # (new layer, layer whose weights it takes)
    replacements = set()  # ids of the layers standing in for MixedOps

    def clone_function(layer):
        if isinstance(layer, MixedOp):
            index = chosen[id(layer)]
            op, adapter = layer.ops[index], layer.adapters[index]
            if adapter is None:
                new = _keras_only(op, copies, name=layer.name)
            else:
                new = keras.Sequential(
                    [_keras_only(op, copies), _copy_layer(adapter, copies)], name=layer.name
                )
            replacements.add(id(new))
            return new
        if not isinstance(layer, layers.Layer):
            return layer  # a keras.ops operation: stateless
        return _copy_layer(layer, copies)

    def call_function(layer, *args, **kwargs):
        if id(layer) not in replacements:
            return layer(*args, **kwargs)
        # The chosen op takes the MixedOp's input, not the mixing weights an owner passed.
        bound = _MIXED_OP_CALL.bind(None, *args, **kwargs).arguments
        if bound.get("training") is None:
            return layer(bound["inputs"])
        return layer(bound["inputs"], training=bound["training"])

    new_model = keras.models.clone_model(
        graph,
        clone_function=clone_function,
        call_function=call_function if isinstance(graph, Functional) else None,
        recursive=True,
    )
    for new, source in copies:
        new.set_weights(source.get_weights())
    alphas = [v.path for v in variables.arch_variables(new_model)]
    if alphas:
        raise ValueError(
            f"Architecture parameters {alphas} belong to layers that are not MixedOps; "
            "discretize replaces MixedOps only"
        )
    return new_model
