"""The discrete side: the network a genotype describes, ``discretize`` for any Keras
model with MixedOps, and export for TF Serving and TFLite."""
