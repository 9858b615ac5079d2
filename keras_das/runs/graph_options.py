"""Graph optimisation for the binaries: the same step graphs, optimised in less time.

Before a search's first step runs, TensorFlow's graph optimiser (Grappler) rewrites the
step's graph (about 60,000 nodes at DARTS size D first order, 170,000 second order once the
passes are inlined), and every run and every resume pays for it. Logged per pass
(``TF_CPP_VMODULE=meta_optimizer=1``, size D second order, oneDNN off): with TensorFlow's
defaults the second round of passes took 8.4 s and changed 0.5% of the nodes, the memory
optimizer 6.6 s (it adds 60 nodes on a CPU; its swapping targets GPU memory) and the layout
optimizer 1.9 s (no change: the graph is channels-last, which the CPU kernels want). Of the
passes left, on a CPU-only host: the TFG pipeline (3.7 s), the loop optimizer (0.5 s) and
the implementation selector (0.3 s) changed nothing; constant folding (3.0 s) removed 0.7%
of the nodes and the remapper (1.3 s) five, as it fuses ops for oneDNN and GPUs only.

``shorten_graph_optimization`` skips what does nothing for us: one round everywhere; the
memory, layout, loop, implementation-selection, TFG and constant-folding passes when no GPU
is visible; the remapper too where oneDNN's kernels are off. Steps compute the same ops
and take as long; only the first one starts sooner: at size D second order, portable
kernels, two cores, the first call of the step (graph optimisation, executor set-up and
one step, after 14 s of tracing) took 44.3 s with the first set (3 runs, 41.3-46.9) and
36.2 s with the CPU-only passes skipped too (34.4-37.7); see
``benchmarks/search_step.py``'s first-step column.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from keras_das.space import kernels

# RewriterConfig toggles turned off where no GPU is visible (see the module docstring).
CPU_SKIPPED_PASSES = (
    "layout_optimizer",
    "loop_optimization",
    "implementation_selector",
    "constant_folding",
)


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
        for name in CPU_SKIPPED_PASSES:
            setattr(rewrite, name, rewriter.OFF)
        if kernels.onednn_enabled() is False:
            rewrite.remapping = rewriter.OFF
        rewrite.disable_tfg_optimizer = True
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
