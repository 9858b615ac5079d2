import os

import numpy as np

from keras_das import DARTS_OPS
from keras_das import DARTS_V2
from keras_das.runs import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_genotype_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "genotype.png"
    plot.plot_genotype(DARTS_V2, str(path), title="DARTS_V2")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(path.parent) == ["genotype.png"]  # no temporary file left behind


def test_plot_weight_history_writes_a_png(tmp_path):
    path = tmp_path / "alphas.png"
    history = [np.random.default_rng(i).dirichlet(np.ones(8), size=14) for i in range(4)]
    plot.plot_weight_history(history, DARTS_OPS, str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC
