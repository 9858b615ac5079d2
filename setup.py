"""keras_das: differentiable architecture search (DARTS family) for TensorFlow / Keras 3."""

import re
from pathlib import Path

from setuptools import find_packages
from setuptools import setup

VERSION = re.search(
    r'__version__ = "([^"]+)"', Path(__file__).with_name("keras_das").joinpath("__init__.py").read_text()
).group(1)

setup(
    name="keras_das",
    version=VERSION,
    description="Differentiable neural architecture search (DARTS family) for Keras 3 / TensorFlow",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_das", "keras_das.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.5",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets needs it to prepare data
        "absl-py",
        "ml-collections",
        "matplotlib",  # genotype and alpha-history pictures
        "tensorboard",  # tf.summary (TensorFlow 2.21 no longer pulls it in)
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist"]},
)
