"""The search space: candidate ops, MixedOp and its relaxations, the DARTS cells and
supernet, genotypes and the rule that derives them, architecture parameters."""
