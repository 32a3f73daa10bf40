"""Ops layer: one public function per op, free of nn.Module and of transformers.

``moe_bypass`` dispatches among the implementations (``"reference"``, ``"torch"``, ``"triton"``,
``"auto"``); all of them meet the contract of :func:`memoe_fast.ops.reference.moe_bypass_reference`.
"""
from .reference import (
    gate_topk_reference,
    expert_ffn_reference,
    load_balance_loss,
    moe_bypass_reference,
)
from .moe import IMPLEMENTATIONS, moe_bypass, resolve_impl

__all__ = [
    "IMPLEMENTATIONS",
    "gate_topk_reference",
    "expert_ffn_reference",
    "load_balance_loss",
    "moe_bypass",
    "moe_bypass_reference",
    "resolve_impl",
]
