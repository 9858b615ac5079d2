"""Runs: a config in, data, strategies, checkpoints, callbacks and reports, a workdir out
(what the binaries ``keras_das.search`` and ``keras_das.train`` run)."""
