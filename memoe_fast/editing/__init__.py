"""Editing: train the bypass on edit requests.

``editor`` (the reference editor) ← ``fast_editor`` (the same training with the least work), which uses
``packing`` (packed rows, per-sequence attention), ``prepack`` (oneDNN packed weights on the CPU) and
``frozen_block`` (the upper blocks as one autograd node each).
"""
from .editor import MEMoEEditor
from .fast_editor import FastMEMoEEditor

__all__ = ["MEMoEEditor", "FastMEMoEEditor"]
