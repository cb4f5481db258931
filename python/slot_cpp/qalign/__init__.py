"""QAlign: test-time alignment by Metropolis-Hastings under a reward
(arXiv 2504.03790, the QUEST sampler), with the language model as proposal.

The chain samples responses y from pi(y | x) proportional to
p(y | x) * exp(r(x, y) / beta):

1. y0 ~ p(. | x), drawn at temperature 1 (no top-p or min-p; ``top_k``
   restricts the proposal, and then p is the top-k-truncated distribution).
2. Each step picks i uniformly in {0, ..., |y| - 1}, keeps y[:i] and draws a
   new suffix from p(. | x, y[:i]): that is y'. The fork reuses the KV cells
   of x + y[:i] from the engine's cache, so only the new suffix is evaluated.
3. y' is accepted with probability min(1, exp((r(y') - r(y)) / beta) * |y| / |y'|),
   computed in log space.

|y| counts tokens, the end-of-sequence token included when the response
ended with one (a response cut by max_tokens has no such token). With stop
strings, a response ends at the token that completes the stop string.

The caller may shape the proposal: with a ``delta`` (SLOT's logit bias
W*delta) or ``rtd`` (the retrieval blend, applied after the bias), p is the
model's distribution with these stages on, and the chain's target is
p_shaped(y | x) * exp(r(x, y) / beta). The acceptance rule needs no change:
the proposal is still the model's own conditional, only a different model.
QAlign imports neither SLOT's nor RTD's code: the caller passes their results.

The answer is a majority vote over the chain's states under the task's
answer extractor (``extract``, e.g. :func:`slot_cpp.gsm8k.extract_answer`)
or, for free text, the state with the highest mean ROUGE-1 F1 to the others
(minimum Bayes risk). Baselines on the same reward interface:
:func:`best_of_n`, :func:`majority_vote`, :func:`weighted_majority_vote`.

Equal compute: with ``budget`` (tokens sampled per problem, an end-of-sequence
token counted as one), the chain stops after the step that reaches it and a
baseline keeps sampling until its samples reach it, so both use the budget to
within one answer. Sample i of a pool draws with ``seed + i`` and a chain's
steps draw from one seeded stream, so a pool or chain at a smaller budget is a
prefix of the one at a larger budget: :func:`pool_prefix` and
:func:`chain_prefix` give every smaller budget's run from one run at the
largest, and :func:`vote`, :func:`best_answer`, :func:`weighted_vote` and
:func:`chain_answer` its answer.

The modules: :mod:`.rewards` (rewards and their training), :mod:`.chain`
(the chain, and :class:`QAlignSamples`, chains as LMCor's sampler),
:mod:`.baselines`, :mod:`.answers` (choosing the answer, budget prefixes)
and :mod:`.proposal` (the proposal's sampling options, :data:`PROPOSAL`).
"""

from __future__ import annotations

from .answers import (ChainState, Extractor, best_answer, chain_answer, chain_prefix, mbr_choice, pool_prefix,
                      rouge1_f1, sample_cost, step_costs, vote, weighted_vote)
from .baselines import BaselineResult, best_of_n, majority_vote, sample_pool, weighted_majority_vote
from .chain import QAlignResult, QAlignSamples, log_acceptance, qalign
from .proposal import PROPOSAL
from .rewards import (DEFAULT_JUDGE_TEMPLATE, CallableReward, Candidate, JudgeReward, LinearReward, Reward,
                      RewardError, RewardLike, as_reward, candidates_of, fit_logistic, model_fingerprint,
                      train_linear_reward)

__all__ = [
    "BaselineResult",
    "CallableReward",
    "Candidate",
    "ChainState",
    "DEFAULT_JUDGE_TEMPLATE",
    "Extractor",
    "JudgeReward",
    "LinearReward",
    "PROPOSAL",
    "QAlignResult",
    "QAlignSamples",
    "Reward",
    "RewardError",
    "RewardLike",
    "as_reward",
    "best_answer",
    "best_of_n",
    "candidates_of",
    "chain_answer",
    "chain_prefix",
    "fit_logistic",
    "log_acceptance",
    "majority_vote",
    "mbr_choice",
    "model_fingerprint",
    "pool_prefix",
    "qalign",
    "rouge1_f1",
    "sample_cost",
    "sample_pool",
    "step_costs",
    "train_linear_reward",
    "vote",
    "weighted_majority_vote",
    "weighted_vote",
]
