"""LMCor: the corrector's input format, the generator's candidate pool, the
overflow policy, resumable training data, a LoRA corrector trained with
transformers + PEFT and loaded by llama.cpp (checked against the same
adapter merged into the torch weights), and the evaluation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from conftest import VOCAB_GGUF, _hf_qwen2, write_qwen2_gguf

import slot_cpp
from slot_cpp import lmcor
from slot_cpp.options import QAlignOptions
from slot_cpp import probes

GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slot_cpp", *args], capture_output=True, text=True, timeout=600)


def _merged(hf: Any, adapter: Path, unpermute_heads: tuple[int, int] | None = None) -> Any:
    """A copy of the torch model with the GGUF adapter's B @ A * alpha / r
    added to its weights; for llama files, the rows of Q and K put back in
    transformers' order (the inverse of llama.cpp's converter)."""
    reader = gguf.GGUFReader(str(adapter))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for name, a in tensors.items():
            if not name.endswith(".lora_a"):
                continue
            b = tensors[name[:-1] + "b"]
            _, layer, kind, _, _ = name.split(".")
            delta = b @ a * (alpha / a.shape[0])
            if unpermute_heads is not None and kind in ("attn_q", "attn_k"):
                n_head = unpermute_heads[0] if kind == "attn_q" else unpermute_heads[1]
                delta = delta.reshape(n_head, delta.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(
                    delta.shape)
            module = model.get_submodule(f"model.layers.{layer}.{GGUF_TO_HF[kind]}")
            module.weight += torch.from_numpy(delta).to(module.weight.dtype)
    return model


def _torch_logprobs(model: Any, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        ids = torch.tensor([tokens])
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return lp[torch.arange(len(tokens) - 1), ids[0, 1:]].numpy()


ROWS = [{"input": f"the cat sat on {w} mat", "target": f"The cat sat on the {w} mat."}
        for w in ("red", "blue", "green", "old", "new", "big", "small", "soft", "warm", "wet", "dry", "flat")]


@pytest.fixture(scope="module")
def trained(tiny_qwen2, tmp_path_factory) -> dict[str, Any]:
    """Candidates from the tiny model and a LoRA corrector trained on them."""
    path, hf = tiny_qwen2
    work = tmp_path_factory.mktemp("lmcor")
    fmt = lmcor.CorrectorFormat(input_prefix="x = ", candidate_prefix="#{i} = ", output_prefix="y =")
    with slot_cpp.Model(path, n_ctx=512, n_threads=2) as gen:
        lmcor.make_corrector_data(gen, ROWS, work / "cands.jsonl", prompt="fix: {input}\n", k=3, max_tokens=6)
    report = lmcor.train_corrector(path, work / "cands.jsonl", work / "adapter.gguf", format=fmt, rank=4,
                                   epochs=8, lr=1e-2, batch_tokens=256, threads=2)
    return {"path": path, "hf": hf, "work": work, "adapter": work / "adapter.gguf", "report": report,
            "format": fmt}


def test_corrector_input_is_the_documented_format(tiny_model):
    golden = "input: fix this sentense\ncandidate 1: Fix this sentence.\ncandidate 2: fix this sentence\noutput:"
    assert lmcor.CorrectorFormat().render(" fix this sentense ", [" Fix this sentence.", "fix this sentence\n"]) \
        == golden
    corrector = lmcor.Corrector(tiny_model, max_tokens=8)
    tokens, text, dropped = corrector.input_tokens("fix this sentense", ["Fix this sentence.", "fix this sentence"])
    assert text == golden and dropped == 0 and tokens == tiny_model.tokenize(golden)
    with pytest.raises(ValueError, match="'{i}'"):
        lmcor.CorrectorFormat(candidate_prefix="candidate: ")
    with pytest.raises(ValueError, match="at least one candidate"):
        lmcor.CorrectorFormat().render("x", [])
    with pytest.raises(ValueError, match="overflow"):
        lmcor.Corrector(tiny_model, overflow="cut")


def test_candidates_are_greedy_plus_seeded_draws_sharing_the_prompt(tiny_model):
    prompt = "Candidates for: {input}\n"
    x = "a small test"
    before = tiny_model.stats()
    tiny_model.clear_cache()
    pool = lmcor.generate_candidates(tiny_model, [x], prompt=prompt, k=4, temperature=1.0, seed=11, max_tokens=8,
                                     stop=[])[0]
    after = tiny_model.stats()
    assert pool.seeds == [None, 12, 13, 14] and len(pool.texts) == 4
    text = prompt.replace("{input}", x)
    # Each candidate equals a call made alone: greedy, then temperature 1 with seed 11 + j.
    assert pool.texts[0] == tiny_model.generate(text, temperature=0.0, max_tokens=8, cache_prompt=False).text.strip()
    for j in (1, 2, 3):
        alone = tiny_model.generate(text, temperature=1.0, seed=11 + j, max_tokens=8, cache_prompt=False)
        assert pool.texts[j] == alone.text.strip()
    assert len(set(pool.texts[1:])) > 1  # distinct draws
    tiny_model.clear_cache()
    again = lmcor.generate_candidates(tiny_model, [x], prompt=prompt, k=4, temperature=1.0, seed=11, max_tokens=8,
                                      stop=[])[0]
    assert again.texts == pool.texts
    # Only the first of the four sequences evaluated the prompt: the others reused its cells.
    n_prompt = len(tiny_model.tokenize(text))
    assert after.prompt_tokens - before.prompt_tokens == 4 * n_prompt
    assert after.cached_tokens - before.cached_tokens >= 3 * (n_prompt - 1)
    with pytest.raises(ValueError, match="{input}"):
        lmcor.generate_candidates(tiny_model, [x], prompt="no placeholder")


def test_slot_on_the_generator_learns_once_per_input(tiny_model):
    before = tiny_model.stats()
    pools = lmcor.generate_candidates(tiny_model, ["one input", "another"], k=3, max_tokens=4, steps=2, lr=0.01)
    after = tiny_model.stats()
    # One call learns a delta per input (2 requests), one samples with them (6).
    assert after.completed_calls - before.completed_calls == 2
    assert after.slot_requests - before.slot_requests == 2 + 6
    delta = tiny_model.generate_batch(["one input"], max_tokens=0, steps=2, lr=0.01)[0].delta
    alone = tiny_model.generate_batch(["one input"], max_tokens=4, delta=delta, stop=["\n"])[0]
    assert pools[0].texts[0] == alone.text.strip()


def test_every_slot_option_reaches_the_generators_slot_step(tiny_model, monkeypatch):
    # lr="auto" with a kl_budget: the delta the candidates are drawn with is
    # the one SLOT learns with that budget, not with the default one.
    budget = 0.05
    seen: list[dict] = []
    real = tiny_model.generate_batch

    def recording(prompts, *args, **kwargs):  # the real call, with its arguments kept
        seen.append(kwargs)
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "generate_batch", recording)
    lmcor.generate_candidates(tiny_model, ["one input"], k=2, max_tokens=2, steps=3, lr="auto", kl_budget=budget)
    monkeypatch.undo()
    used = seen[-1]["delta"][0]
    wanted = tiny_model.generate_batch(["one input"], max_tokens=0, steps=3, lr="auto", kl_budget=budget)[0]
    default = tiny_model.generate_batch(["one input"], max_tokens=0, steps=3, lr="auto")[0]
    assert not np.allclose(wanted.delta, default.delta)
    np.testing.assert_allclose(used, wanted.delta, rtol=1e-5, atol=1e-7)


def test_qalign_samples_are_the_chains_last_states(peaked_path):
    from slot_cpp.qalign import QAlignSamples, qalign

    def reward(prompt: str, response: str) -> float:
        return float(len(response))

    with slot_cpp.Model(peaked_path, n_ctx=1024, n_threads=2, n_parallel=4) as model:
        options = QAlignSamples(reward=reward, steps=4, beta=0.5)
        pool = lmcor.generate_candidates(model, ["some words"], prompt="{input}:", k=3, seed=7, max_tokens=6,
                                         sampler=options)[0]
        ids = model.tokenize("some words:")
        greedy = model.generate_batch([ids], temperature=0.0, max_tokens=6, stop=["\n"])[0]
        direct = qalign(model, "", prompt_token_ids=ids, reward=reward, beta=0.5, steps=4, chains=2, seed=8,
                        max_tokens=6, stop=["\n"], answer="mbr")
        assert pool.texts == [greedy.text.strip()] + [c[-1].text.strip() for c in direct.chains]
        assert pool.generated_tokens == len(greedy.tokens) + direct.generated_tokens
        with pytest.raises(ValueError, match="with a sampler, the generator takes no steps"):
            lmcor.generate_candidates(model, ["x"], k=3, sampler=options, steps=3)
    # The chains' steps default to QAlignOptions' (one definition).
    assert QAlignSamples(reward=reward).steps == QAlignOptions().steps


def test_too_long_inputs_fail_or_drop_whole_candidates(tiny_path):
    with slot_cpp.Model(tiny_path, n_ctx=256, n_threads=2) as model:
        long = " ".join(["word"] * 60)
        cands = [f"{long} {i}" for i in range(5)]
        strict = lmcor.Corrector(model, max_tokens=16)
        with pytest.raises(lmcor.CorrectorInputTooLong, match="256"):
            strict.input_tokens("x", cands)
        lenient = lmcor.Corrector(model, max_tokens=16, overflow="drop")
        tokens, text, dropped = lenient.input_tokens("x", cands)
        assert 0 < dropped < 5 and len(tokens) <= 256 - 16
        # Whole candidates only, the first ones kept.
        assert text == lmcor.CorrectorFormat().render("x", cands[:5 - dropped])
        with pytest.raises(lmcor.CorrectorInputTooLong, match="candidate 1 alone"):
            lenient.input_tokens("x", [" ".join(["word"] * 400)])


def test_make_data_resumes_to_the_same_file(peaked_path, tmp_path):
    # The peaked model and no prompt cache: draws that do not hinge on rounding.
    with slot_cpp.Model(peaked_path, n_ctx=512, n_threads=2) as gen:
        opts: dict[str, Any] = dict(prompt="{input} ->", k=3, max_tokens=5, batch_size=2, cache_prompt=False)
        assert lmcor.make_corrector_data(gen, ROWS[:5], tmp_path / "one.jsonl", **opts) == 5
        assert lmcor.make_corrector_data(gen, ROWS[:3], tmp_path / "two.jsonl", **opts) == 3
        assert lmcor.make_corrector_data(gen, ROWS[:5], tmp_path / "two.jsonl", **opts) == 2
        assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
        records = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
        assert [r["input"] for r in records] == [r["input"] for r in ROWS[:5]]
        assert all(len(r["candidates"]) == 3 for r in records)
        with pytest.raises(ValueError, match="does not match row 0"):
            lmcor.make_corrector_data(gen, ROWS[5:], tmp_path / "one.jsonl", **opts)
        with pytest.raises(ValueError, match="with k=4"):
            lmcor.make_corrector_data(gen, ROWS[:6], tmp_path / "one.jsonl", **{**opts, "k": 4})


def test_trained_adapter_loads_and_matches_torch(trained):
    path, hf, adapter = trained["path"], trained["hf"], trained["adapter"]
    report = trained["report"]
    assert report.rows == len(ROWS) and report.skipped_too_long == 0 and report.parameters > 0
    assert report.losses[-1] < 0.5 * report.losses[0]
    with slot_cpp.Model(path, n_ctx=512, n_threads=2) as base, \
            slot_cpp.Model(path, n_ctx=512, n_threads=2, lora=adapter) as tuned:
        assert tuned.loras == [(str(adapter), 1.0)]
        corrector = lmcor.Corrector(tuned, max_tokens=16)
        assert corrector.format == trained["format"]  # read back from the adapter
        tokens, _, _ = corrector.input_tokens(ROWS[0]["input"], ["x", "y"])
        tokens = tokens + tuned.tokenize(" " + ROWS[0]["target"], add_special=False)
        plain, adapted = probes.token_logprobs(base, tokens, 1), probes.token_logprobs(tuned, tokens, 1)
        assert np.abs(adapted - plain).max() > 1.0  # the adapter changes the model
        merged = _torch_logprobs(_merged(hf, adapter), tokens)
        np.testing.assert_allclose(adapted, merged, atol=0.02)
        # It learned the task: the target is far likelier, and the answer changes.
        n_target = len(tuned.tokenize(" " + ROWS[0]["target"], add_special=False))
        assert adapted[-n_target:].mean() > plain[-n_target:].mean() + 1.0
        out = corrector.rewrite(ROWS[1]["input"], ["a", "b", "c"])
        assert out.text != lmcor.Corrector(base, max_tokens=16, format=trained["format"]).rewrite(
            ROWS[1]["input"], ["a", "b", "c"]).text
        with slot_cpp.Model(path, n_ctx=512, n_threads=2, lora=(adapter, 0.0)) as off:
            np.testing.assert_allclose(probes.token_logprobs(off, tokens, 1), plain, atol=1e-4)


def test_adapter_for_another_base_is_refused(trained, tmp_path, gemma_path):
    n_vocab = len(gguf.GGUFReader(str(VOCAB_GGUF)).fields["tokenizer.ggml.tokens"].contents())
    other = write_qwen2_gguf(_hf_qwen2(n_vocab, seed=99), tmp_path / "other.gguf")
    with pytest.raises(slot_cpp.ModelLoadError, match="trained on another base model"):
        slot_cpp.Model(other, n_ctx=512, lora=trained["adapter"])
    with pytest.raises(slot_cpp.ModelLoadError, match="LoRA adapter"):
        slot_cpp.Model(gemma_path, n_ctx=512, lora=trained["adapter"])
    with pytest.raises(FileNotFoundError, match="LoRA adapter not found"):
        slot_cpp.Model(trained["path"], n_ctx=512, lora=tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="lora"):
        slot_cpp.Model(trained["path"], n_ctx=512, lora=[3])  # type: ignore[list-item]


def test_bad_training_rows_are_refused(tiny_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n')
    with pytest.raises(ValueError, match="candidates"):
        lmcor.train_corrector(tiny_path, bad, tmp_path / "a.gguf")
    bad.write_text('{"input": "a", "target": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        lmcor.read_rows(bad)
    with pytest.raises(ValueError, match="every training row is longer"):
        lmcor.train_corrector(tiny_path, [{"input": "a " * 50, "target": "b", "candidates": ["c"]}],
                              tmp_path / "a.gguf", max_len=16)
    with pytest.raises(ValueError, match="target_modules"):
        lmcor.train_corrector(tiny_path, [{"input": "a", "target": "b", "candidates": ["c"]}], tmp_path / "a.gguf",
                              target_modules=["lm_head"])
    assert not (tmp_path / "a.gguf").exists()


def test_evaluate_scores_the_three_systems(trained):
    import sacrebleu

    path = trained["path"]
    with slot_cpp.Model(path, n_ctx=512, n_threads=2) as gen, \
            slot_cpp.Model(path, n_ctx=512, n_threads=2, lora=trained["adapter"]) as cor:
        report = lmcor.evaluate(gen, lmcor.Corrector(cor, max_tokens=16), ROWS[:6], batch_size=4,
                                prompt="fix: {input}\n", k=3, max_tokens=6)
    assert report.rows == 6 and report.k == 3 and [s.name for s in report.systems] == ["greedy", "oracle", "lmcor"]
    by = {s.name: s for s in report.systems}
    targets = [r["target"] for r in report.records]
    for name in ("greedy", "oracle", "lmcor"):
        hyps = [r[name] for r in report.records]
        assert by[name].chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [targets]).score)
        assert by[name].exact_match == pytest.approx(np.mean([h == t for h, t in zip(hyps, targets)]))
    for r in report.records:
        assert r["greedy"] == r["candidates"][0] and r["oracle"] in r["candidates"]
    assert by["oracle"].sentence_chrf >= by["greedy"].sentence_chrf
    vs_greedy = report.paired[0]
    assert vs_greedy.versus == "greedy"
    assert vs_greedy.exact_match == pytest.approx(by["lmcor"].exact_match - by["greedy"].exact_match)
    assert vs_greedy.sentence_chrf == pytest.approx(by["lmcor"].sentence_chrf - by["greedy"].sentence_chrf)


def test_cli_correct_and_eval(trained, tmp_path):
    path, adapter = str(trained["path"]), str(trained["adapter"])
    (tmp_path / "prompt.txt").write_text("fix: {input}\n")
    done = _cli("lmcor", "correct", ROWS[2]["input"], "--model", path, "--corrector", path, "--corrector-lora",
                adapter, "--prompt-file", str(tmp_path / "prompt.txt"), "-k", "3", "-n", "6", "--json", "-q")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    with slot_cpp.Model(path, n_ctx=512, n_threads=2) as gen, \
            slot_cpp.Model(path, n_ctx=2048, n_threads=2, lora=adapter) as cor:
        here = lmcor.Corrector(cor, max_tokens=128).correct(gen, ROWS[2]["input"], prompt="fix: {input}\n", k=3,
                                                            max_tokens=6)
    assert out["text"] == here.text and out["candidates"] == here.candidates and len(here.candidates) == 3
    assert out["corrector_input"].startswith("x = " + ROWS[2]["input"] + "\n#1 = ")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    done = _cli("eval", "lmcor", "--data", str(tmp_path / "rows.jsonl"), "--model", path, "--corrector", path,
                "--corrector-lora", adapter, "--prompt-file", str(tmp_path / "prompt.txt"), "-k", "3", "-n", "6",
                "--json", "-q")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows"] == 4 and [x["name"] for x in summary["systems"]] == ["greedy", "oracle", "lmcor"]
    done = _cli("lmcor", "correct", "x", "--model", path, "--corrector", path, "--prompt-file",
                str(tmp_path / "rows.jsonl"), "-q")
    assert done.returncode == 2 and "{input}" in done.stderr


@pytest.mark.slow
def test_smollm2_corrector_trained_by_the_cli(smollm2_path, tmp_path):
    """The command line end to end on the real corrector base: a llama-architecture
    file, whose Q and K rows llama.cpp stores permuted: the adapter must be too."""
    import transformers

    rows = [{"input": r["input"], "target": r["target"], "candidates": [r["input"], r["input"].upper()]}
            for r in ROWS[:6]]
    data = tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = tmp_path / "smol-corrector.gguf"
    # Q and K only: the adapter's whole effect goes through the permuted rows.
    done = _cli("lmcor", "train", "--base", str(smollm2_path), "--data", str(data), "--out", str(adapter),
                "--rank", "4", "--epochs", "2", "--lr", "1e-2", "--threads", "2", "--target-modules",
                "q_proj,k_proj", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 6 and report["steps"] >= 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                           dtype=torch.float32)
    with slot_cpp.Model(smollm2_path, n_ctx=512, n_parallel=1) as base, \
            slot_cpp.Model(smollm2_path, n_ctx=512, n_parallel=1, lora=adapter) as tuned:
        corrector = lmcor.Corrector(tuned, max_tokens=16)
        tokens = corrector.input_tokens(rows[0]["input"], rows[0]["candidates"])[0]
        tokens += tuned.tokenize(" " + rows[0]["target"], add_special=False)
        plain, adapted = probes.token_logprobs(base, tokens, 1), probes.token_logprobs(tuned, tokens, 1)
    cfg = hf.config
    torch_plain = _torch_logprobs(hf, tokens)
    right = _torch_logprobs(_merged(hf, adapter, (cfg.num_attention_heads, cfg.num_key_value_heads)), tokens)
    wrong = _torch_logprobs(_merged(hf, adapter), tokens)  # rows left in llama.cpp's order
    effect = adapted - plain
    # llama.cpp multiplies the Q4_1 weights with 8-bit activations, so compare
    # the adapter's effect; it must match the right order far better than the wrong one.
    err_right = np.abs(effect - (right - torch_plain)).mean()
    err_wrong = np.abs(effect - (wrong - torch_plain)).mean()
    assert np.abs(effect).mean() > 0.05
    assert err_right < 0.25 * np.abs(effect).mean() and err_right < 0.5 * err_wrong, (err_right, err_wrong)
