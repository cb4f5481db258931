"""Shared fixtures: a tiny random Qwen2-style model written as a GGUF (with a
real GPT-2 tokenizer from the pinned llama.cpp tree) together with the same
weights in transformers, and the real Gemma 3 270M model."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TREE = Path(os.environ.get("SLOT_CPP_LLAMA_DIR", ROOT / "third_party" / "llama.cpp"))
VOCAB_GGUF = LLAMA_TREE / "models" / "ggml-vocab-gpt-2.gguf"

TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, ctx=512, rope_theta=10000.0, eps=1e-6)


def _copy_tokenizer(writer: Any, vocab_path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(vocab_path))
    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(name, value, vtype, sub_type=sub)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    return n_vocab


def _hf_qwen2(n_vocab: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=n_vocab, hidden_size=TINY["hidden"], intermediate_size=TINY["ffn"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"], max_position_embeddings=TINY["ctx"],
        rope_theta=TINY["rope_theta"], rms_norm_eps=TINY["eps"], tie_word_embeddings=False,
        initializer_range=0.2, attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_qwen2_gguf(model: Any, path: Path, vocab_path: Path = VOCAB_GGUF, head_type: str = "F32",
                     head_scale: float = 1.0) -> Path:
    """Write a transformers Qwen2 model as a GGUF llama.cpp loads: F32 weights,
    with the output head in `head_type` (F32 or Q8_0), multiplied by `head_scale`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny-qwen2-random")
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(writer, vocab_path)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    for key, value in sd.items():
        if key == "lm_head.weight":
            value = value * np.float32(head_scale)
            if head_type == "Q8_0":
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor("output.weight", gguf.quants.quantize(value, q8), raw_dtype=q8)
            else:
                writer.add_tensor("output.weight", np.ascontiguousarray(value))
            continue
        assert key.startswith("model."), key
        rest = key[len("model."):]
        if rest in names:
            writer.add_tensor(names[rest], np.ascontiguousarray(value))
            continue
        parts = rest.split(".", 2)
        assert parts[0] == "layers", key
        writer.add_tensor(f"blk.{parts[1]}.{per_layer[parts[2]]}", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test, also when the run was
    started with SIGINT ignored (nohup, a background job), where Python
    installs no handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def restore_sigint() -> None:
    """preexec_fn for a child that must die of (or handle) SIGINT even if
    this process ignores it: ignored signals are inherited across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def vocab_gguf() -> Path:
    assert VOCAB_GGUF.exists(), f"the pinned llama.cpp tree is missing {VOCAB_GGUF}"
    return VOCAB_GGUF


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, vocab_gguf: Path) -> tuple[Path, Any]:
    """(GGUF path, transformers model) with identical random weights."""
    import gguf

    n_vocab = len(gguf.GGUFReader(str(vocab_gguf)).fields["tokenizer.ggml.tokens"].contents())
    model = _hf_qwen2(n_vocab, seed=1234)
    path = write_qwen2_gguf(model, tmp_path_factory.mktemp("tiny") / "tiny-qwen2-f32.gguf")
    return path, model


@pytest.fixture(scope="session")
def tiny_q8_head(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: tuple[Path, Any]):
    """The tiny model with its output head stored as Q8_0, the format of Gemma's head."""
    import slot_cpp

    path = write_qwen2_gguf(tiny_qwen2[1], tmp_path_factory.mktemp("tiny-q8") / "tiny-qwen2-q8head.gguf",
                            head_type="Q8_0")
    model = slot_cpp.Model(path, n_ctx=512, n_threads=2)
    yield path, model
    model.close()


@pytest.fixture(scope="session")
def peaked_path(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: tuple[Path, Any]) -> Path:
    """The tiny model with a 12x output head: a few likely tokens per step, as
    in a trained model, so that greedy choices are not near-ties."""
    return write_qwen2_gguf(tiny_qwen2[1], tmp_path_factory.mktemp("peaked") / "tiny-qwen2-peaked.gguf",
                            head_scale=12.0)


def open_with_portable_head_ops(path: Path):
    """A Model whose SLOT head products use ggml's portable ops (the code path
    of GPU backends) on the CPU backend."""
    import slot_cpp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLOT_CPP_PORTABLE_HEAD_OPS", "1")
        return slot_cpp.Model(path, n_ctx=512, n_threads=2)


@pytest.fixture(scope="session")
def tiny_path(tiny_qwen2: tuple[Path, Any]) -> Path:
    return tiny_qwen2[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path):
    import slot_cpp

    model = slot_cpp.Model(tiny_path, n_ctx=512, n_threads=2)
    yield model
    model.close()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    import slot_cpp

    return slot_cpp.default_model_path()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (ChatML template), fetched once and hash-checked."""
    from smollm2 import smollm2_path as fetch

    return fetch()


@pytest.fixture(scope="session")
def gemma(gemma_path: Path):
    import slot_cpp

    model = slot_cpp.Model(gemma_path, n_ctx=2048)
    yield model
    model.close()


PROMPT = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:"
)
