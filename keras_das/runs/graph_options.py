"""Graph optimisation for the binaries: the same step graphs, optimised in less time.

Before a search's first step runs, TensorFlow's graph optimiser (Grappler) rewrites the
step's graph (about 60,000 nodes at DARTS size D first order, 185,000 second order), and
every run and every resume pays for it. Logged per pass (``TF_CPP_VMODULE=meta_optimizer=1``,
size D second order, oneDNN off, one core): 35 s in all, of which the second round of
passes took 8.4 s and changed 0.5% of the nodes, the memory optimizer 6.6 s (it adds 60
nodes on a CPU; its swapping targets GPU memory) and the layout optimizer 1.9 s (no change:
the graph is channels-last, which the CPU kernels want). ``shorten_graph_optimization``
skips those three where they do nothing for us: one round everywhere, the memory and
layout optimizers only when no GPU is visible. Steps compute the same ops; only the
first one starts sooner (see ``benchmarks/search_step.py``'s first-step column).
"""

from __future__ import annotations

import logging

import tensorflow as tf


def shorten_graph_optimization() -> bool:
    """Sets the options above for the functions this thread calls from now on.

    TensorFlow has public switches for the layout optimizer only; the round count and the
    memory optimizer live in the function-call options of the eager context (private,
    per thread, and reset when another optimizer option changes: call this after those).
    Returns False (and changes nothing) where this TensorFlow lacks them.
    """
    try:
        from tensorflow.core.protobuf import rewriter_config_pb2

        options, config = _function_call_config()
    except (ImportError, AttributeError) as e:
        logging.warning("Graph optimisation options unavailable (%s); left at defaults", e)
        return False
    rewrite = config.graph_options.rewrite_options
    rewriter = rewriter_config_pb2.RewriterConfig
    rewrite.meta_optimizer_iterations = rewriter.ONE
    if not tf.config.list_logical_devices("GPU"):
        rewrite.memory_optimization = rewriter.NO_MEM_OPT
        rewrite.layout_optimizer = rewriter.OFF
    options.config_proto_serialized = config
    return True


def current_rewrite_options():
    """The Grappler options the functions this thread calls are optimised with."""
    return _function_call_config()[1].graph_options.rewrite_options


def _function_call_config():
    """This thread's function-call options and the ``ConfigProto`` they hold (a copy)."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    options = context.context().function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(options.config_proto_serialized)
    return options, config
