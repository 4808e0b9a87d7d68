"""bnnprune: prune binary neural networks guided by how often each weight's sign flips.

    counter = bnnprune.FlipCounter(model)                  # after each optimizer step: .step()
    pruned, report = bnnprune.prune(model, example_inputs, counter, target_bop_reduction=0.5)
    bnnprune.count_ops(pruned, example_inputs).bops
"""

from bnnprune.core.binary import BinaryConv2d, BinaryLayerError, BinaryLinear, ScaledBinaryConv2d
from bnnprune.core.flips import FlipCounter
from bnnprune.core.ops import OpCount, count_ops
from bnnprune.core.plan import METHODS, Method, PruneError
from bnnprune.core.prune import FlipImportance, PruneReport, prune

__all__ = ["BinaryConv2d", "BinaryLayerError", "BinaryLinear", "FlipCounter", "FlipImportance",
           "METHODS", "Method", "OpCount", "PruneError", "PruneReport", "ScaledBinaryConv2d",
           "count_ops", "prune"]
