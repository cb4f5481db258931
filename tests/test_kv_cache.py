"""The context's settings llama-server exposes: KV cache types and flash
attention (--cache-type-k/-v, --flash-attn), RoPE scaling and mlock, as
Model settings and serve flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slot_cpp import Model

PROMPT = "Question: What is the capital of France?\nAnswer:"


def _greedy(path: Path, **settings: str) -> np.ndarray:
    with Model(path, n_ctx=1024, n_parallel=1, **settings) as m:  # type: ignore[arg-type]
        r = m.generate(PROMPT, max_tokens=8, logprobs=True, ignore_eos=True)
        return np.asarray(r.token_logprobs, dtype=np.float64)


def test_a_q8_0_cache_is_used_and_stays_close(gemma_path: Path) -> None:
    f16 = _greedy(gemma_path)
    q8 = _greedy(gemma_path, cache_type_k="q8_0", cache_type_v="q8_0")
    assert not np.array_equal(f16, q8)  # the cache's type reached llama.cpp
    assert np.max(np.abs(f16 - q8)) < 0.5
    assert np.array_equal(_greedy(gemma_path, flash_attn="on"), _greedy(gemma_path, flash_attn="auto"))


def test_bad_settings_are_clear_errors(gemma_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_type_k must be .*q8_0.*got .q3_k."):
        Model(gemma_path, cache_type_k="q3_k")
    with pytest.raises(ValueError, match="quantised V cache .* needs flash attention"):
        Model(gemma_path, cache_type_v="q4_0", flash_attn="off")
    with pytest.raises(ValueError, match="deterministic mode needs flash attention"):
        Model(gemma_path, deterministic=True, flash_attn="off")
    with pytest.raises(ValueError, match="flash_attn"):
        Model(gemma_path, flash_attn="maybe")


def test_the_serve_flags_exist() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "slot_cpp", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--cache-type-k", "--cache-type-v", "--flash-attn", "--rope-freq-scale", "--use-mlock",
                 "--deterministic", "--api-key-file", "--cors-origins", "--rope-scaling", "--yarn-orig-ctx",
                 "--override-kv", "--slot-save-path"):
        assert flag in out


def test_rope_scaling_and_mlock_reach_llama_cpp(gemma_path: Path) -> None:
    """A RoPE frequency scale stretches the positions (other logprobs, still a
    working model); mlock loads the same model."""
    plain = _greedy(gemma_path)
    stretched = _greedy(gemma_path, rope_freq_scale=0.5)  # type: ignore[arg-type]
    assert not np.array_equal(plain, stretched) and np.all(np.isfinite(stretched))
    assert np.array_equal(_greedy(gemma_path, rope_freq_scale=1.0), plain)  # type: ignore[arg-type]
    assert np.array_equal(_greedy(gemma_path, use_mlock=True), plain)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rope_freq_scale"):
        Model(gemma_path, rope_freq_scale=-1.0)


def test_yarn_scaling_reaches_llama_cpp(gemma_path: Path) -> None:
    """YaRN over a context stretched fourfold: other logprobs, a working
    model; the model's own scaling named explicitly changes nothing."""
    plain = _greedy(gemma_path)
    yarn = _greedy(gemma_path, rope_scaling="yarn", rope_freq_scale=0.25, yarn_orig_ctx=32768)  # type: ignore[arg-type]
    assert not np.array_equal(plain, yarn) and np.all(np.isfinite(yarn))
    with pytest.raises(ValueError, match="rope_scaling"):
        Model(gemma_path, rope_scaling="cubic")


def test_kv_overrides_change_the_loaded_metadata(gemma_path: Path) -> None:
    """An override of the RoPE base in the GGUF's metadata acts like the
    rope_freq_base setting; malformed overrides are clear errors."""
    with Model(gemma_path, n_ctx=256) as m:
        arch = m.info.architecture
    by_setting = _greedy(gemma_path, rope_freq_base=5000.0)  # type: ignore[arg-type]
    by_override = _greedy(gemma_path, kv_overrides={f"{arch}.rope.freq_base": 5000.0})  # type: ignore[arg-type]
    assert np.array_equal(by_setting, by_override) and not np.array_equal(by_override, _greedy(gemma_path))
    cli_form = _greedy(gemma_path, kv_overrides=[f"{arch}.rope.freq_base=float:5000"])  # type: ignore[arg-type]
    assert np.array_equal(cli_form, by_override)
    with pytest.raises(ValueError, match="KEY=TYPE:VALUE"):
        Model(gemma_path, kv_overrides=["no-type-here"])
    with pytest.raises(ValueError, match="is not a valid int"):
        Model(gemma_path, kv_overrides=["some.key=int:twelve"])
    with pytest.raises(TypeError, match="must be an int, float, bool or str"):
        Model(gemma_path, kv_overrides={"some.key": [1, 2]})
