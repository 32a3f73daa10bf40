"""memoe-fast: fast MEMoE model editing (bypass mixture of experts with knowledge-anchor routing).

The top-level ``kernels/`` folder is installed as ``memoe_fast.kernels``: the bare name ``kernels``
belongs to Hugging Face's ``kernels`` package, which transformers and bitsandbytes probe for.
"""
from setuptools import setup

setup(
    name="memoe-fast",
    version="0.1.0",
    description="Fast MEMoE model editing: fused Triton kernels for a knowledge-anchor-routed bypass MoE",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["memoe_fast", "memoe_fast.ops", "memoe_fast.editing", "memoe_fast.kernels", "memoe_fast.data"],
    package_dir={"memoe_fast": "memoe_fast", "memoe_fast.kernels": "kernels"},
    package_data={"memoe_fast.data": ["*.json"]},
    install_requires=[
        # torch is installed first by install.sh (a CPU build on machines without a GPU); this range
        # admits what the machines have and never forces a reinstall.
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors>=0.4",
        "spacy>=3.7",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "gguf": ["gguf>=0.10", "accelerate>=0.26"],
        "int8": ["bitsandbytes>=0.43", "accelerate>=0.26"],
        "test": ["pytest>=7", "hypothesis>=6", "triton>=3.1", "gguf>=0.10", "accelerate>=0.26", "bitsandbytes>=0.43"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", "triton>=3.1", "gguf>=0.10", "accelerate>=0.26", "bitsandbytes>=0.43"],
    },
    entry_points={"console_scripts": ["memoe-fast=memoe_fast.cli:main"]},
)
