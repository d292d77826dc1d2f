"""actprune: cut training memory by pruning the activations saved for backward to block-sparse form.

    import actprune
    actprune.prune_activations_(model, actprune.PruneConfig(sparsity=0.9, block_size=32))

Seed method: Barley & Fröning 2023, "Compressing the Backward Pass of Large-Scale Neural
Architectures by Structured Activation Pruning" (arXiv 2311.16883).
"""

from . import models
from .blocksparse import BlockSparse, compress, select_blocks
from .config import PruneConfig
from .convert import describe_compression, prune_activations_, restore_dense_
from .derivative_code import DerivativeCode, gelu_derivative_code
from .layers import (
    CodedGELU,
    PrunedAffine,
    PrunedLayerScale,
    PrunedLinear,
    exact_gradients,
)
from .memory import (
    SavedTensorLog,
    StepMemory,
    measure_training_step,
    peak_memory,
    saved_activation_bytes,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSparse",
    "CodedGELU",
    "DerivativeCode",
    "PruneConfig",
    "PrunedAffine",
    "PrunedLayerScale",
    "PrunedLinear",
    "SavedTensorLog",
    "StepMemory",
    "compress",
    "describe_compression",
    "exact_gradients",
    "gelu_derivative_code",
    "measure_training_step",
    "models",
    "peak_memory",
    "prune_activations_",
    "restore_dense_",
    "saved_activation_bytes",
    "select_blocks",
]
