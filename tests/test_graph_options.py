"""The binaries' graph-optimisation options: applied, and the step computes the same."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow.python.eager import context

from keras_das.runs import graph_options
from keras_das.space import kernels

RewriterConfig = rewriter_config_pb2.RewriterConfig


@pytest.fixture
def restored_options():
    options = context.context().function_call_options
    saved = config_pb2.ConfigProto()
    saved.ParseFromString(options.config_proto_serialized)
    yield
    options.config_proto_serialized = saved


def _function_result():
    @tf.function
    def f(x):
        return tf.reduce_sum(tf.nn.relu(x @ tf.transpose(x)) * 0.5 + 1.0)

    return f(tf.reshape(tf.range(12, dtype=tf.float32), (3, 4)) / 7.0).numpy()


def test_shorten_graph_optimization_sets_one_round_and_no_cpu_only_passes(restored_options):
    # From TensorFlow's defaults (an in-process run earlier in this worker may have set them).
    context.context().function_call_options.config_proto_serialized = context.context().config
    assert graph_options.current_rewrite_options().meta_optimizer_iterations == (
        RewriterConfig.DEFAULT_NUM_ITERS
    )
    before = _function_result()
    assert graph_options.shorten_graph_optimization()
    options = graph_options.current_rewrite_options()
    assert options.meta_optimizer_iterations == RewriterConfig.ONE
    if not tf.config.list_logical_devices("GPU"):
        assert options.memory_optimization == RewriterConfig.NO_MEM_OPT
        for name in ("layout_optimizer", "loop_optimization", "constant_folding"):
            assert getattr(options, name) == RewriterConfig.OFF, name
        assert options.disable_tfg_optimizer
        assert (options.remapping == RewriterConfig.OFF) == (kernels.onednn_enabled() is False)
    np.testing.assert_array_equal(_function_result(), before)
