"""memoe-fast: MEMoE model editing (a bypass mixture of experts routed by knowledge anchors), fast."""
from .config import MEMoEConfig
from .bypass import MEMoEBypass
from .integration import MEMoEHandle, apply_memoe
from .easyedit import MEMoEHyperParams, apply_memoe_to_model

__version__ = "0.1.0"

__all__ = ["MEMoEConfig", "MEMoEBypass", "MEMoEHandle", "MEMoEHyperParams", "apply_memoe", "apply_memoe_to_model",
           "__version__"]
