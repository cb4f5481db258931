"""Bad input gets a specific Python exception and leaves the Model usable."""

from __future__ import annotations

import numpy as np
import pytest

import slot_cpp
from slot_cpp import probes


def test_missing_path(tmp_path):
    with pytest.raises(slot_cpp.ModelLoadError, match="not found"):
        slot_cpp.Model(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(slot_cpp.ModelLoadError, match="directory"):
        slot_cpp.Model(tmp_path)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model" * 10)
    with pytest.raises(slot_cpp.ModelLoadError, match="not a GGUF"):
        slot_cpp.Model(p)


def test_truncated_gguf(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    for keep in (16, len(data) // 3, len(data) - 100):
        p = tmp_path / f"cut{keep}.gguf"
        p.write_bytes(data[:keep])
        with pytest.raises(slot_cpp.ModelLoadError):
            slot_cpp.Model(p)


def test_vocabulary_only_gguf(vocab_gguf):
    with pytest.raises(slot_cpp.ModelLoadError, match="no tensors|no output head"):
        slot_cpp.Model(vocab_gguf)


def test_wrong_path_type():
    with pytest.raises(TypeError):
        slot_cpp.Model(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(steps=-1), ValueError),
        (dict(lr=0.0), ValueError),
        (dict(lr=float("nan")), ValueError),
        (dict(temperature=-0.1), ValueError),
        (dict(top_p=0.0), ValueError),
        (dict(top_p=1.5), ValueError),
        (dict(top_k=-1), ValueError),
        (dict(max_tokens=-1), ValueError),
        (dict(steps=1.5), TypeError),
        (dict(stop=[""]), ValueError),
        (dict(delta=np.zeros(3, dtype=np.float32)), ValueError),
        (dict(delta=np.zeros(64, dtype=np.int32)), TypeError),
        (dict(delta=np.full(64, np.nan, dtype=np.float32)), ValueError),
    ],
)
def test_bad_generation_arguments(tiny_model, kwargs, exc):
    with pytest.raises(exc):
        tiny_model.generate_with_slot("hello there", **{"max_tokens": 2, **kwargs})
    # The model still works afterwards.
    assert tiny_model.generate("hello there", max_tokens=2, ignore_eos=True).generated_tokens == 2


def test_prompt_too_long(tiny_model):
    with pytest.raises(slot_cpp.ContextLengthError):
        tiny_model.generate_with_slot("", prompt_token_ids=[1] * 600, max_tokens=1)
    assert tiny_model.generate("hi", max_tokens=1, ignore_eos=True).generated_tokens == 1


def test_empty_prompt_and_unknown_role(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.generate_with_slot("")
    with pytest.raises(ValueError, match="role"):
        tiny_model.generate_with_slot([{"role": "wizard", "content": "hi"}])


def test_one_token_prompt_skips_optimisation(tiny_model):
    result = tiny_model.generate_with_slot("", prompt_token_ids=[42], steps=5, max_tokens=3, ignore_eos=True)
    assert result.steps_done == 0 and "one token" in result.slot_status
    assert result.generated_tokens == 3


def test_closed_model(tiny_path):
    model = slot_cpp.Model(tiny_path, n_ctx=128)
    model.close()
    model.close()  # idempotent
    with pytest.raises(slot_cpp.ModelClosedError):
        model.generate("hi")


def test_a_model_without_a_chat_template_falls_back_and_unknown_names_are_explained(tiny_path, caplog):
    # The tiny Qwen2 GGUF has no template: llama.cpp's ChatML, as llama.cpp
    # itself falls back for architectures without a built-in of their own, said once.
    import slot_cpp

    with slot_cpp.Model(tiny_path, n_ctx=256) as model, caplog.at_level("WARNING", logger="slot_cpp"):
        assert not model.info.has_chat_template
        messages = [{"role": "user", "content": "hi"}]
        text = model.apply_chat_template(messages)
        assert text == model.apply_chat_template(messages, template="chatml") and "<|im_start|>user" in text
        model.generate_with_slot(messages, max_tokens=1, steps=0)
        said = [r for r in caplog.records if "no chat template" in r.getMessage()]
        assert len(said) == 1 and "'chatml'" in said[0].getMessage()
        with pytest.raises(ValueError, match="chat template 'no-such-template'"):
            model.apply_chat_template(messages, template="no-such-template")


def test_unsupported_architecture(tmp_path, tiny_path):
    import gguf

    reader = gguf.GGUFReader(str(tiny_path))
    writer = gguf.GGUFWriter(str(tmp_path / "alien.gguf"), "alien-arch")
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    writer.add_tensor("token_embd.weight", np.zeros((len(reader.fields["tokenizer.ggml.tokens"].contents()), 64),
                                                    dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(slot_cpp.ModelLoadError, match="alien-arch|could not load"):
        slot_cpp.Model(tmp_path / "alien.gguf")


def test_non_finite_optimisation_keeps_last_finite_delta(tiny_model):
    result = tiny_model.generate_with_slot("The quick brown fox jumps over the lazy dog", steps=5, lr=1e37,
                                           max_tokens=2, ignore_eos=True)
    assert "non-finite" in result.slot_status
    assert result.steps_done < 5 and len(result.losses) == result.steps_done
    assert result.delta is not None and np.all(np.isfinite(result.delta))
    assert result.generated_tokens == 2


def test_prompt_logprobs_equal_token_logprobs_and_refuse_slot(tiny_model):
    ids = tiny_model.tokenize("one two three four five")
    r = tiny_model.generate("", prompt_token_ids=ids, max_tokens=1, prompt_logprobs=True)
    np.testing.assert_allclose(r.prompt_logprobs, probes.token_logprobs(tiny_model, ids, 1), atol=1e-4)
    with pytest.raises(ValueError, match="prompt logprobs need steps=0"):
        tiny_model.generate_with_slot("", prompt_token_ids=ids, max_tokens=1, prompt_logprobs=True, steps=2)
