"""The trained LoRA weights as a GGUF LoRA adapter for llama.cpp: tensor
names, llama.cpp's Q/K row order, and the metadata the corrector reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_path
from .._model import ADAPTER_BASE_DIGEST_KEY
from .corrector import ADAPTER_FORMAT_KEY, CorrectorFormat

_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# llama.cpp's converter permutes the rows of Q and K for these architectures
# (rotary pairs interleaved); transformers undoes it when it reads the GGUF.
_PERMUTED_QK = {"llama"}
# Architectures whose tensors map as above and whose Q/K order is known here.
_TRAINABLE = {"llama", "qwen2", "qwen3", "gemma2", "gemma3"}


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter: rows grouped per head as (2, dim/2) -> (dim/2, 2).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _lora_tensors(peft_model: Any, architecture: str, config: Any) -> list[tuple[str, np.ndarray]]:
    """The LoRA A and B matrices under llama.cpp's tensor names."""
    tensors: list[tuple[str, np.ndarray]] = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        key = ".".join(parts[-2:])
        if key not in _HF_TO_GGUF:
            raise ValueError(f"cannot map the LoRA module {name} to a llama.cpp tensor")
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()   # (r, in)
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()   # (out, r)
        if architecture in _PERMUTED_QK and key == "self_attn.q_proj":
            b = _permute_rows(b, config.num_attention_heads)
        elif architecture in _PERMUTED_QK and key == "self_attn.k_proj":
            b = _permute_rows(b, config.num_key_value_heads)
        base = f"blk.{layer}.{_HF_TO_GGUF[key]}.weight"
        tensors.append((base + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        tensors.append((base + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    if not tensors:
        raise ValueError("the trained model has no LoRA modules")
    return tensors


def _write_adapter(peft_model: Any, out: Path, *, architecture: str, alpha: float, config: Any,
                   base_digest: str, fmt: CorrectorFormat) -> None:
    write_adapter_file(out, _lora_tensors(peft_model, architecture, config), architecture=architecture,
                       alpha=alpha, base_digest=base_digest, fmt=fmt)


def write_adapter_file(out: Path, tensors: list[tuple[str, np.ndarray]], *, architecture: str, alpha: float,
                       base_digest: str, fmt: CorrectorFormat) -> None:
    """Writes LoRA tensors (llama.cpp's names) as a GGUF adapter, atomically."""
    import gguf

    with atomic_path(out) as tmp:  # fsynced and renamed over `out` once complete
        writer = gguf.GGUFWriter(str(tmp), architecture)
        try:
            writer.add_string("general.type", "adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", float(alpha))
            writer.add_string(ADAPTER_BASE_DIGEST_KEY, base_digest)
            writer.add_string(ADAPTER_FORMAT_KEY, fmt.to_json())
            for name, arr in tensors:
                writer.add_tensor(name, arr)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
