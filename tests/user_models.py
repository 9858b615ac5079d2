"""Models a user writes and hands the search binary (``--config.model.builder=...``), and
builders that get it wrong; the tests name them as ``tests.user_models:function``."""

import keras
from keras import layers

import keras_das

# Stride-1 named ops: keras_das.discretize writes each as Keras's own layers.
CANDIDATES = ("conv_3x3", "sep_conv_3x3", "max_pool_3x3")


def functional(info) -> keras.Model:
    """A small functional classifier with two MixedOps."""
    inputs = keras.Input(info.image_shape)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras_das.MixedOp(CANDIDATES, name="block_1")(x)
    x = layers.MaxPooling2D()(x)
    x = keras_das.MixedOp(CANDIDATES, name="block_2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(info.num_classes)(x), name="user_functional")


class Subclassed(keras.Model):
    """A subclassed classifier with one MixedOp and a batch norm (no ``build`` method)."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.stem = layers.Conv2D(8, 3, padding="same", activation="relu")
        self.mix = keras_das.MixedOp(CANDIDATES, name="block")
        self.norm = layers.BatchNormalization()
        self.pool = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(num_classes)

    def call(self, x, training=None):
        x = self.norm(self.mix(self.stem(x), training=training), training=training)
        return self.head(self.pool(x))


def subclassed(info) -> keras.Model:
    return Subclassed(info.num_classes, name="user_subclassed")


def not_a_model(info):
    return "a model"


def wrong_input(info) -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras_das.MixedOp(CANDIDATES, name="block")(layers.Conv2D(4, 1)(inputs))
    return keras.Model(inputs, layers.Dense(info.num_classes)(layers.Flatten()(x)))


def not_a_source(data_config):
    return ("images", "labels")


def any_size(info) -> keras.Model:
    """A fully convolutional classifier that takes images of any height and width."""
    inputs = keras.Input((None, None, info.image_shape[-1]))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras_das.MixedOp(CANDIDATES, name="block")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(info.num_classes)(x), name="user_any_size")
