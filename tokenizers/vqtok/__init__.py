"""vqtok: discrete tokenizers for autoregressive multimodal models.

Fused quantizer kernels (nearest-codebook search, FSQ, LFQ) in C++, CUDA and Triton, quantizer
modules built on them, and a CLI that trains, evaluates and exports tokenizers.
"""

__version__ = "0.1.0"
