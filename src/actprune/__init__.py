"""actprune: cut training memory by compressing the activations saved for the backward pass.

    import actprune
    actprune.prune_activations_(model, actprune.PruneConfig.preset("recommended"))

Seed method: Barley & Fröning 2023, "Compressing the Backward Pass of Large-Scale Neural
Architectures by Structured Activation Pruning" (arXiv 2311.16883).
"""

from .attention import CodedAttention, coded_attention
from .blocksparse import compress
from .checkpoint import coded_checkpoint
from .config import PruneConfig
from .convert import describe_compression, prune_activations_, register_conversion, restore_dense_
from .derivative_code import DerivativeCode, activation_derivative, derivative_code
from .dropout import CodedDropout
from .kernels import select_blocks
from .layers import (
    CodedActivation,
    CodedGELU,
    CodedReLU,
    CodedSiLU,
    PrunedChannelScale,
    PrunedLinear,
    PrunedTransposedLinear,
    exact_gradients,
)
from .loss import linear_cross_entropy
from .memory import (
    SavedTensorLog,
    StepMemory,
    measure_training_step,
    peak_memory,
    saved_activation_bytes,
)
from .models.resmlp import PrunedAffine, PrunedLayerScale
from .norms import CodedLayerNorm, CodedNorm, CodedRMSNorm
from .storage import BlockSparse
from .swiglu import FusedSwiGLU

__version__ = "0.1.0"

__all__ = [
    "BlockSparse",
    "CodedActivation",
    "CodedAttention",
    "CodedDropout",
    "CodedGELU",
    "CodedLayerNorm",
    "CodedNorm",
    "CodedRMSNorm",
    "CodedReLU",
    "CodedSiLU",
    "DerivativeCode",
    "FusedSwiGLU",
    "PruneConfig",
    "PrunedAffine",
    "PrunedChannelScale",
    "PrunedLayerScale",
    "PrunedLinear",
    "PrunedTransposedLinear",
    "SavedTensorLog",
    "StepMemory",
    "activation_derivative",
    "coded_attention",
    "coded_checkpoint",
    "compress",
    "derivative_code",
    "describe_compression",
    "exact_gradients",
    "linear_cross_entropy",
    "measure_training_step",
    "peak_memory",
    "prune_activations_",
    "register_conversion",
    "restore_dense_",
    "saved_activation_bytes",
    "select_blocks",
]
