"""Triton kernels of memoe-fast, installed as ``memoe_fast.kernels``.

This folder must never be importable as the top-level name ``kernels``: that name belongs to Hugging
Face's ``kernels`` package, which transformers and bitsandbytes probe with ``from kernels import ...``.
"""
if __name__ == "kernels":
    raise ImportError(
        "the folder 'kernels/' of memoe-fast is the package 'memoe_fast.kernels', not the top-level "
        "'kernels' (Hugging Face's package); import memoe_fast.kernels instead"
    )
