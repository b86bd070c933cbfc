"""vqtok: discrete tokenizers for autoregressive multimodal models.

Fused quantizer kernels (nearest-codebook search, FSQ, LFQ) in C++, CUDA and Triton, quantizer
modules built on them, and a CLI that trains, evaluates and exports tokenizers.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `vqtok.Tokenizer` is imported on first use, so `import vqtok` stays light (no torch models)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'vqtok' has no attribute {name!r}")
