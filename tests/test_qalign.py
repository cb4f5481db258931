"""QAlign: the chain samples its exact target, reuses the prefix's cells, and
fails clearly; the baselines."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

import slot_cpp
from slot_cpp import gsm8k, probes
from slot_cpp import qalign as qa
from slot_cpp.options import QAlignOptions, SamplingOptions
from slot_cpp.qalign import baselines
from slot_cpp.qalign import chain as qa_chain

PROMPT = "One two three four"


@pytest.fixture(scope="module")
def model(tiny_path):
    with slot_cpp.Model(tiny_path, n_ctx=1024, n_threads=2, n_parallel=16) as m:
        yield m


@pytest.fixture(scope="module")
def eos_delta(model, tiny_path):
    """A delta whose logit bias lifts end-of-sequence into the top two, so
    that responses of 2 and 3 tokens compete (the length factor matters)."""
    import gguf

    eos = int(gguf.GGUFReader(str(tiny_path)).fields["tokenizer.ggml.eos_token_id"].contents())
    w = probes.output_matrix(model)[eos]
    return eos, (7.0 * w / (w @ w)).astype(np.float32)


def whole(text: str) -> str:
    """An answer extractor: the whole text (the task's, in these tests)."""
    return text


def crc_reward(prompt: str, response: str) -> float:
    return (zlib.crc32(response.encode()) % 97) / 40.0


def enumerate_support(model, eos, delta, top_k, max_tokens, rtd=None, grammar=None):
    """Every response the top-k proposal can produce, with its exact log p
    (under the proposal's stages: delta's bias, then RTD's blend; with a
    grammar, the masked, renormalised distribution its logprobs report)."""
    x = model.tokenize(PROMPT)
    out = []

    def walk(prefix: list[int], logp: float) -> None:
        step = model.generate("", prompt_token_ids=x, response_prefix=prefix, max_tokens=1, ignore_eos=True,
                              top_logprobs=top_k, delta=delta, rtd=rtd, grammar=grammar).top_logprobs[0]
        norm = np.logaddexp.reduce([lp for _, lp in step])  # the top-k-truncated distribution
        for token, lp in step:
            total = logp + lp - norm
            if token == eos:
                out.append(((tuple(prefix), True), total))
            elif len(prefix) + 1 == max_tokens:
                out.append(((tuple(prefix + [token]), False), total))
            else:
                walk(prefix + [token], total)

    walk([], 0.0)
    return out


def exact_target(model, support, beta):
    keys = [k for k, _ in support]
    log_target = np.array([lp + crc_reward("", model.detokenize(list(k[0]))) / beta for k, lp in support])
    return keys, np.exp(log_target - np.logaddexp.reduce(log_target))


def chain_states(result, burn_in: int = 20, thin: int = 4):
    # 8 x 800 = 6400 steps; every 4th state after 20 (the chain's correlation
    # is short on six states) for the chi-square's independent draws: 1560.
    return [(tuple(s.tokens), s.ended) for chain in result.chains for s in chain[burn_in::thin]]


def chi_square_p(states, keys, target) -> float:
    from scipy import stats

    counts = np.array([states.count(k) for k in keys], dtype=float)
    assert target.min() * len(states) > 15  # every expected count well above the chi-square's 5
    return float(stats.chisquare(counts, target * len(states)).pvalue)


# The wrong variants' p-values: at 1560 states the chi-square's expected
# excess over a right chain is 60 (no length factor) to 180 (beta doubled
# under the grammar), against 26 for p = 1e-4 (computed from the exact
# targets); a right chain passes p > 0.01.
WRONG_P = 1e-4


def chain_p_value(model, eos_delta, beta_run: float, beta_target: float = 1.0, steps: int = 800, rtd=None,
                  grammar=None):
    eos, delta = eos_delta
    support = enumerate_support(model, eos, delta, top_k=2, max_tokens=3, rtd=rtd, grammar=grammar)
    keys, target = exact_target(model, support, beta_target)
    result = qa.qalign(model, PROMPT, reward=crc_reward, beta=beta_run, steps=steps, max_tokens=3, chains=8,
                       top_k=2, delta=delta, rtd=rtd, seed=11, answer="mbr", grammar=grammar)
    states = chain_states(result)
    assert set(states) <= set(keys)  # the chain never leaves the support
    return chi_square_p(states, keys, target), result, support


@pytest.mark.slow
def test_chain_samples_the_exact_target_and_a_wrong_rule_is_rejected(model, eos_delta, monkeypatch):
    lengths = {len(k[0]) + k[1] for k, _ in enumerate_support(model, *eos_delta, top_k=2, max_tokens=3)}
    assert lengths == {2, 3}  # responses of different lengths: the |y|/|y'| factor is tested
    p_right, result, support = chain_p_value(model, eos_delta, beta_run=1.0)
    assert p_right > 0.01
    assert 0.05 < result.accept_rate < 0.95
    # The same states against the target of another beta: the test tells them
    # apart. (A chain run with beta doubled, rejected against the beta = 1
    # target: test_under_a_grammar_the_chain_samples_the_constrained_target.)
    keys, wrong_target = exact_target(model, support, beta=2.0)
    assert chi_square_p(chain_states(result), keys, wrong_target) < WRONG_P
    # the acceptance rule without the length factor
    monkeypatch.setattr(qa_chain, "log_acceptance", lambda r1, r0, n1, n0, beta: min(0.0, (r1 - r0) / beta))
    p_length, _, _ = chain_p_value(model, eos_delta, beta_run=1.0)
    assert p_length < WRONG_P


@pytest.mark.slow
def test_under_a_grammar_the_chain_samples_the_constrained_target(model, eos_delta):
    # A grammar that refuses the first character of the proposal's favourite
    # first token: the support and its probabilities change, and the chain
    # targets p_c(y) exp(r/beta) with p_c the masked, renormalised proposal.
    eos, delta = eos_delta
    x = model.tokenize(PROMPT)
    free = model.generate("", prompt_token_ids=x, max_tokens=1, ignore_eos=True, top_logprobs=2,
                          delta=delta).top_logprobs[0]
    banned = next(t for t, _ in free if t != eos)
    char = model.token_piece(banned).decode("utf-8", "replace")[0]
    grammar = "root ::= [^" + ("\\" + char if char in "]\\^-" else char) + "]*"
    support = enumerate_support(model, eos, delta, top_k=2, max_tokens=3, grammar=grammar)
    free_support = enumerate_support(model, eos, delta, top_k=2, max_tokens=3)
    assert all(char not in model.detokenize(list(k[0])) for k, _ in support)
    assert {k for k, _ in support} != {k for k, _ in free_support}
    p_right, result, _ = chain_p_value(model, eos_delta, beta_run=1.0, grammar=grammar)
    assert p_right > 0.01
    assert all(char not in s.text for chain in result.chains for s in chain)
    # beta doubled in the chain: its samples no longer match the beta = 1 target
    p_beta, _, _ = chain_p_value(model, eos_delta, beta_run=2.0, grammar=grammar)
    assert p_beta < WRONG_P


@pytest.mark.slow
def test_an_rtd_shaped_proposal_samples_the_shaped_target(model, eos_delta):
    """With RTD blended into the proposal, the chain's target is
    p_rtd(y) exp(r(y)/beta): it passes against that target and fails against
    the one of the unshaped proposal."""
    from slot_cpp import rtd as rtd_module

    eos, delta = eos_delta
    # The reference continues the prompt with the proposal's least likely
    # three-token response; lambda = 0.01 moves masses by a few times.
    plain_support = enumerate_support(model, eos, delta, top_k=2, max_tokens=3)
    unlikely = min((item for item in plain_support if len(item[0][0]) == 3), key=lambda item: item[1])
    continuation = model.detokenize(list(unlikely[0][0]))
    store = rtd_module.Datastore.build(model, [{"prompt": PROMPT, "completion": continuation}], progress=False)
    shaping = rtd_module.RTD(store, k=1, temperature=1.0, lam=0.01, gate=False)
    p_shaped, result, support = chain_p_value(model, eos_delta, beta_run=1.0, rtd=shaping)
    assert p_shaped > 0.01
    # The same chain against the target of the proposal without RTD, on the
    # responses both proposals can produce.
    plain_keys, plain_target = exact_target(model, plain_support, beta=1.0)
    shared = [k for k in plain_keys if k in {key for key, _ in support}]
    assert len(shared) >= 3
    mask = np.array([k in shared for k in plain_keys])
    states = [s for s in chain_states(result) if s in shared]
    p_plain = chi_square_p(states, shared, plain_target[mask] / plain_target[mask].sum())
    assert p_plain < WRONG_P


def test_steps_evaluate_only_the_new_suffix(model):
    x = model.tokenize(PROMPT)
    model.clear_cache()  # so that the prompt is evaluated once, here
    result = qa.qalign(model, PROMPT, reward=crc_reward, steps=25, max_tokens=12, seed=3, top_k=20, chains=2,
                       extract=whole)
    # The prompt once (its last token evaluated on its own); then each step's
    # fork evaluates the last kept token again and the suffix's tokens but the
    # last one drawn: exactly as many tokens as the suffix has, EOS counted.
    assert result.decoded_tokens == len(x) - 1 + result.generated_tokens
    assert len(result.chain) == 26 and result.chain[0].step == 0
    for prev, cur in zip(result.chain, result.chain[1:]):
        if not cur.accepted:
            assert cur.tokens == prev.tokens and cur.reward == prev.reward


def test_kv_cells_do_not_grow_over_many_steps(tiny_path):
    # 150 steps of up to 8 tokens in a 128-cell context (their tokens fill it
    # several times over): the chain holds only its state and one proposal,
    # and still never evaluates its prefix again.
    with slot_cpp.Model(tiny_path, n_ctx=128, n_threads=2, n_parallel=2) as small:
        x = small.tokenize(PROMPT)
        result = qa.qalign(small, PROMPT, reward=crc_reward, steps=150, max_tokens=8, seed=2, top_k=20,
                           extract=whole)
    assert len(result.chain) == 151 and result.generated_tokens > 2 * 128
    assert result.decoded_tokens == len(x) - 1 + result.generated_tokens


def test_same_seed_same_chain(model):
    # From the same cache state (README: Rounding), the same seed gives the same chain.
    model.clear_cache()
    a = qa.qalign(model, PROMPT, reward=crc_reward, steps=20, max_tokens=6, seed=9, chains=2, extract=whole)
    model.clear_cache()
    b = qa.qalign(model, PROMPT, reward=crc_reward, steps=20, max_tokens=6, seed=9, chains=2, extract=whole)
    assert [[s.tokens for s in c] for c in a.chains] == [[s.tokens for s in c] for c in b.chains]
    c = qa.qalign(model, PROMPT, reward=crc_reward, steps=20, max_tokens=6, seed=10, chains=2, extract=whole)
    assert [[s.tokens for s in ch] for ch in a.chains] != [[s.tokens for s in ch] for ch in c.chains]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_a_bad_reward_is_named_and_the_chain_kept(model, bad):
    calls = []

    def flaky(prompt: str, response: str) -> float:
        calls.append(response)
        return bad if len(calls) > 5 else 1.0

    with pytest.raises(qa.RewardError, match="flaky") as info:
        qa.qalign(model, PROMPT, reward=flaky, steps=10, max_tokens=4, seed=0, extract=whole)
    chain = info.value.chains[0]
    assert len(chain) == 5 and all(math.isfinite(s.reward) for s in chain)


def test_a_raising_reward_is_named(model):
    def broken(prompt: str, response: str) -> float:
        raise KeyError("missing")

    with pytest.raises(qa.RewardError, match="broken.*KeyError"):
        qa.qalign(model, PROMPT, reward=broken, steps=3, max_tokens=4, extract=whole)
    assert model.generate(PROMPT, max_tokens=2, ignore_eos=True).generated_tokens == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(steps=0), "steps"), (dict(max_tokens=0), "max_tokens"), (dict(chains=9), "n_parallel"),
    (dict(answer="best"), "answer"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qa.qalign(model, PROMPT, reward=crc_reward, **{"extract": whole, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        qa.qalign(model, "", reward=crc_reward, extract=whole)
    with pytest.raises(TypeError, match="callable"):
        qa.qalign(model, PROMPT, reward=42, extract=whole)


def test_option_groups_are_the_keywords(model):
    # The groups and their fields as keywords give the same chain; the
    # proposal's fixed options are refused, and a vote needs the task's extractor.
    flat = qa.qalign(model, PROMPT, reward=crc_reward, steps=4, beta=0.5, max_tokens=5, seed=3, top_k=4,
                     answer="mbr")
    grouped = qa.qalign(model, PROMPT, reward=crc_reward, options=QAlignOptions(steps=4, beta=0.5),
                        sampling=qa.PROPOSAL.replace(max_tokens=5, seed=3, top_k=4), answer="mbr")
    assert [[s.tokens for s in c] for c in flat.chains] == [[s.tokens for s in c] for c in grouped.chains]
    assert qa.QAlignSamples(reward=crc_reward).steps == QAlignOptions().steps
    with pytest.raises(ValueError, match="temperature"):
        qa.qalign(model, PROMPT, reward=crc_reward, temperature=0.7, answer="mbr")
    with pytest.raises(ValueError, match="top_p"):
        qa.majority_vote(model, PROMPT, n=2, sampling=SamplingOptions(temperature=1.0), extract=whole)
    with pytest.raises(ValueError, match="extract"):
        qa.qalign(model, PROMPT, reward=crc_reward, steps=2)
    with pytest.raises(TypeError, match="unexpected"):
        qa.qalign(model, PROMPT, reward=crc_reward, answer="mbr", chain=2)


def test_answers_vote_and_mbr(model):
    digits = qa.qalign(model, PROMPT, reward=crc_reward, steps=30, max_tokens=6, seed=4,
                       extract=lambda text: str(len(text) % 3))
    assert digits.answer in digits.votes and digits.votes[digits.answer] == max(digits.votes.values())
    assert sum(digits.votes.values()) == 31
    mbr = qa.qalign(model, PROMPT, reward=crc_reward, steps=10, max_tokens=6, seed=4, answer="mbr")
    assert mbr.answer_state is not None and mbr.answer == mbr.answer_state.text
    assert qa.rouge1_f1("a b c", "a b c") == 1.0 and qa.rouge1_f1("a b", "c d") == 0.0
    assert qa.rouge1_f1("a b c d", "a b") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_baselines(model):
    def length_reward(prompt: str, response: str) -> float:
        return float(len(response))

    bon = qa.best_of_n(model, PROMPT, reward=length_reward, n=6, max_tokens=6, seed=2,
                       extract=lambda t: t)
    assert len(bon.samples) == 6 and bon.answer == max((s.text for s in bon.samples), key=len)
    mv = qa.majority_vote(model, PROMPT, n=6, max_tokens=6, seed=2, extract=lambda t: str(len(t) % 2))
    assert mv.votes[mv.answer] == max(mv.votes.values()) and sum(mv.votes.values()) == 6
    wmv = qa.weighted_majority_vote(model, PROMPT, reward=length_reward, n=6, max_tokens=6, seed=2,
                                    extract=lambda t: str(len(t) % 2))
    assert sum(wmv.votes.values()) == pytest.approx(1.0)
    assert wmv.answer == max(wmv.votes, key=wmv.votes.get)


def test_rewards_score_candidates_with_their_token_ids(model):
    # A linear head on the policy itself reads the policy's token ids: the
    # score of a fresh sample costs one evaluated token (the rest is cached).
    head = qa.LinearReward(model, np.random.default_rng(0).normal(size=model.n_embd), 0.5)
    sample = model.generate(PROMPT, max_tokens=6, ignore_eos=True)
    x = tuple(model.tokenize(PROMPT))
    before = model.decoded_tokens
    score = head.score([qa.Candidate(PROMPT, sample.text, x, tuple(sample.tokens), model)])[0]
    assert model.decoded_tokens - before == 1
    # The same hidden state from a full prefill, within the rounding of
    # another batch shape and cell layout (README: Rounding).
    hidden = probes.prompt_states(model, list(x) + sample.tokens)[0][-1]
    assert score == pytest.approx(float(hidden @ head.weight) + 0.5, rel=5e-3)


def test_linear_reward_head_file_checks_the_model(model, tmp_path, gemma):
    head = qa.LinearReward(model, np.ones(model.n_embd), -1.0)
    head.save(str(tmp_path / "head.npz"))
    again = qa.LinearReward.load(str(tmp_path / "head.npz"), model)
    np.testing.assert_array_equal(again.weight, head.weight) and again.bias == -1.0
    with pytest.raises(ValueError, match="hidden size|another model"):
        qa.LinearReward.load(str(tmp_path / "head.npz"), gemma)
    (tmp_path / "junk.npz").write_bytes(b"not a head")
    with pytest.raises(ValueError, match="not a slot_cpp reward head"):
        qa.LinearReward.load(str(tmp_path / "junk.npz"), model)


def test_fit_logistic_recovers_a_separating_direction():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    true = np.array([2.0, -1.0, 0.0, 0.5, 0.0])
    y = (rng.random(400) < 1 / (1 + np.exp(-(X @ true - 0.3)))).astype(float)
    w, b = qa.fit_logistic(X, y, l2=1e-3)
    assert np.corrcoef(w, true)[0, 1] > 0.95 and abs(b + 0.3) < 0.4


FACTS = [("2 + 2 =", "4", "7"), ("The capital of France is", "Paris", "Berlin"), ("10 * 3 =", "30", "13"),
         ("A dog has this many legs:", "4", "9"), ("9 - 4 =", "5", "3"),
         ("The largest planet in the solar system is", "Jupiter", "Mars"),
         ("Water freezes at this many degrees Celsius:", "0", "50"), ("The number of days in a week is", "7", "11")]


@pytest.mark.slow
def test_judge_reward_on_gemma(gemma):
    template = "Statement: {prompt} {response}\nThis statement is"
    judge = qa.JudgeReward(gemma, template, yes=" true", no=" false")
    flipped = qa.JudgeReward(gemma, template, yes=" false", no=" true")
    # From an empty cache, whatever ran before on this shared model.
    gemma.clear_cache()
    right = judge.score([qa.Candidate(q, good) for q, good, _ in FACTS])
    wrong = judge.score([qa.Candidate(q, bad) for q, _, bad in FACTS])
    # The score is log p(yes) - log p(no), nothing else: compared from the
    # same (empty) cache, so that the numbers are computed alike.
    q, good, _ = FACTS[0]
    t_yes, t_no = (gemma.tokenize(w, add_special=False)[0] for w in (" true", " false"))
    gemma.clear_cache()
    direct = gemma.generate(template.format(prompt=q, response=good), max_tokens=0, score_tokens=[t_yes, t_no],
                            cache_prompt=False).score_logprobs
    gemma.clear_cache()
    one = judge.score([qa.Candidate(q, good)])[0]
    gemma.clear_cache()
    assert one == pytest.approx(direct[0] - direct[1], abs=1e-6)
    assert flipped.score([qa.Candidate(q, good)])[0] == pytest.approx(-one, abs=1e-6)
    # The judge reads the response: a right and a wrong one score apart. (How
    # well a 270M base model judges is no property of JudgeReward: on these
    # facts it is near chance, README: QAlign.)
    assert all(np.isfinite(right + wrong)) and all(r != w for r, w in zip(right, wrong))
    with pytest.raises(ValueError, match="one token"):
        qa.JudgeReward(gemma, template, yes=" absolutely true")


@pytest.mark.slow
def test_trained_reward_head_beats_chance_on_held_out_answers(gemma):
    import random

    rng = random.Random(0)

    def problems(count: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(count):
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            out.append((f"12 + 5 = 17\n8 + 9 = 17\n21 + 4 = 25\n{a} + {b} =", str(a + b)))
        return out

    def first_word(text: str):
        words = text.strip().split()
        return words[0] if words else None

    train, held = problems(120), problems(40)
    head, stats = qa.train_linear_reward(gemma, train, extract=first_word, is_correct=gsm8k.is_correct,
                                         samples=4, max_tokens=3, stop=["\n"], l2=100.0)
    assert 0 < stats["right"] < stats["answers"] == 480
    scores, labels = [], []
    for k, (prompt, reference) in enumerate(held):
        drawn = gemma.generate_batch([prompt], n=4, max_tokens=3, temperature=1.0, top_k=0, top_p=1.0,
                                     min_p=0.0, seed=5000 + k, stop=["\n"])
        x = tuple(gemma.prompt_tokens(prompt))
        scores += head.score([qa.Candidate("", d.text, x, tuple(d.tokens), gemma) for d in drawn])
        labels += [first_word(d.text) == reference for d in drawn]
    scores_arr, labels_arr = np.array(scores), np.array(labels)
    pos, neg = scores_arr[labels_arr], scores_arr[~labels_arr]
    assert len(pos) >= 10 and len(neg) >= 10
    # Area under the ROC curve on answers to problems the head never saw:
    # 0.5 is chance (measured 0.83).
    auc = float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    assert auc > 0.7, auc


def test_budget_stops_the_chain_at_equal_compute(model):
    r = qa.qalign(model, PROMPT, reward=crc_reward, steps=1000, max_tokens=8, seed=6, budget=40,
                  extract=whole)
    before_last = r.generated_tokens - (r.chain[-1].length if r.chain[-1].accepted else 0)
    assert r.generated_tokens >= 40 and len(r.chain) < 1000
    assert before_last < 40 + 8  # it stopped at the first step that reached the budget
    with pytest.raises(ValueError, match="budget"):
        qa.qalign(model, PROMPT, reward=crc_reward, budget=0, extract=whole)


def test_reward_tokens_are_counted_apart_from_the_chain(model):
    x = model.tokenize(PROMPT)
    head = qa.LinearReward(model, np.random.default_rng(1).normal(size=model.n_embd), 0.0)
    model.clear_cache()
    r = qa.qalign(model, PROMPT, reward=head, steps=30, max_tokens=10, seed=8, top_k=20, extract=whole)
    # Each proposal is scored from the cells its sampling left: one token.
    assert r.reward_tokens == r.reward_calls == 31
    assert r.decoded_tokens == len(x) - 1 + r.generated_tokens
    plain = qa.qalign(model, PROMPT, reward=crc_reward, steps=5, max_tokens=10, seed=8, extract=whole)
    assert plain.reward_tokens == 0


def test_baselines_at_a_budget_sample_until_they_reach_it(model, eos_delta):
    """Equal compute: a baseline's samples reach the budget and overshoot it
    by less than one answer; a smaller budget's pool is a prefix of a larger
    one's (sample i draws with seed + i)."""
    max_tokens = 8
    # end-of-sequence lifted into the top two: answers of different lengths
    shape = dict(max_tokens=max_tokens, seed=5, top_k=2, delta=eos_delta[1])
    model.clear_cache()
    largest = qa.sample_pool(model, PROMPT, budget=150, **shape)
    costs = [qa.sample_cost(s) for s in largest]
    assert sum(costs) >= 150 and len(set(costs)) > 2
    for budget in (1, 9, 40, 150):
        model.clear_cache()  # the same cells as the largest run: the same rounding
        pool = qa.sample_pool(model, PROMPT, budget=budget, **shape)
        used = sum(qa.sample_cost(s) for s in pool)
        assert budget <= used < budget + max_tokens
        assert used - qa.sample_cost(pool[-1]) < budget  # the shortest prefix that reaches it
        assert len(pool) == qa.pool_prefix(costs, budget)
        assert [s.tokens for s in pool] == [s.tokens for s in largest[:len(pool)]]
    # the old rule, budget // max_tokens samples, falls short by more than an answer
    short = baselines._samples(model, PROMPT, 150 // max_tokens,
                               qa.PROPOSAL.replace(max_tokens=max_tokens, seed=5, top_k=2), eos_delta[1])
    assert sum(qa.sample_cost(s) for s in short) < 150 - max_tokens
    for fn, extra in ((qa.majority_vote, {}), (qa.best_of_n, {"reward": crc_reward}),
                      (qa.weighted_majority_vote, {"reward": crc_reward})):
        b = fn(model, PROMPT, budget=60, extract=lambda t: t[:3], **shape, **extra)
        assert 60 <= b.generated_tokens < 60 + max_tokens
        assert b.generated_tokens == sum(qa.sample_cost(s) for s in b.samples)
        with pytest.raises(ValueError, match="not both"):
            fn(model, PROMPT, n=4, budget=60, max_tokens=max_tokens, extract=whole, **extra)
    with pytest.raises(ValueError, match="budget"):
        qa.sample_pool(model, PROMPT, budget=0)


def test_a_chain_at_a_smaller_budget_is_a_prefix_of_a_larger_one(model, eos_delta):
    shape = dict(reward=crc_reward, steps=10**6, max_tokens=8, seed=6, top_k=2, delta=eos_delta[1],
                 extract=lambda t: t[:2])
    model.clear_cache()  # each run from the same cache: the same cells, the same rounding
    largest = qa.qalign(model, PROMPT, budget=120, **shape)
    generated = [s.generated for s in largest.chain]
    assert generated == sorted(generated) and generated[-1] == largest.generated_tokens >= 120
    for budget in (1, 20, 70):
        model.clear_cache()
        run = qa.qalign(model, PROMPT, budget=budget, **shape)
        prefix = qa.chain_prefix(largest.chains, budget)[0]
        assert len(prefix) < len(largest.chain)
        assert [(s.tokens, s.accepted, s.generated) for s in run.chain] == \
            [(s.tokens, s.accepted, s.generated) for s in prefix]
        assert run.answer == qa.chain_answer(prefix, "vote", lambda t: t[:2])[0]


def test_answer_choosers():
    assert qa.vote(["3", None, "4", "4", "3"]) == ("3", {"3": 2.0, "4": 2.0})  # ties: the earliest
    assert qa.vote([None]) == (None, {})
    assert qa.best_answer(["1", "2", "3"], [0.5, 2.0, 2.0]) == ("2", 1)
    chosen, mass = qa.weighted_vote(["a", "b", "b"], [3.0, 1.0, 1.0])
    w = np.exp([3.0, 1.0, 1.0]) / np.exp([3.0, 1.0, 1.0]).sum()
    assert chosen == "a" and mass == pytest.approx({"a": w[0], "b": w[1] + w[2]})
    assert qa.pool_prefix([5, 5, 5], 10) == 2 and qa.pool_prefix([5, 5, 5], 11) == 3
    assert qa.pool_prefix([5], 100) == 1
