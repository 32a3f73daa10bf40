"""memoe-fast: MEMoE model editing (a bypass mixture of experts routed by knowledge anchors), fast."""
from .config import MEMoEConfig
from .bypass import MEMoEBypass
from .integration import MEMoEHandle, apply_memoe

__version__ = "0.1.0"

__all__ = ["MEMoEConfig", "MEMoEBypass", "MEMoEHandle", "apply_memoe", "__version__"]
