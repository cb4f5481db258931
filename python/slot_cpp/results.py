"""What the engine reports: a call's result and timings, the token loop's
counters, and the facts of a model file. Re-exported from ``slot_cpp``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class BatchStats:
    """Counters of a Model's shared token loop (since it was loaded)."""

    waiting_requests: int
    """Generate calls waiting for a free sequence."""
    live_sequences: int
    """Sequences decoding now."""
    completed_calls: int
    failed_calls: int
    """Calls that ended in an error or were cancelled."""
    generated_tokens: int
    decode_steps: int
    """Token steps: one llama_decode for every live sequence."""
    prompt_tokens: int
    """Context tokens of admitted prompts (per group of samples)."""
    cached_tokens: int
    """Of those, tokens whose KV cells were reused from the prompt cache."""
    slot_requests: int
    """Requests with SLOT steps or a given delta."""
    rtd_requests: int


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of each stage of one call."""

    prefill: float
    optimise: float
    generate: float

    @property
    def total(self) -> float:
        return self.prefill + self.optimise + self.generate


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced, and what SLOT did on the way."""

    text: str
    tokens: list[int]
    finish_reason: str
    """"eos", "length", "stop", "callback" or "context_full"."""
    delta: Optional[np.ndarray]
    """The delta used (float32, n_embd), or None for plain generation."""
    losses: list[float]
    """Prompt loss at the start of each optimisation step."""
    steps_done: int
    slot_status: str
    """Why optimisation ended, or why it did not run."""
    slot_path: str
    """"cached" (the prompt's distributions cached in float32), "cached_bf16"
    (cached in bfloat16), "bounded" (each position's most probable tokens),
    "recompute" (the published algorithm) or ""."""
    slot_cache_bytes: int
    prompt_tokens: int
    timings: Timings
    slot_profile: dict[str, float] = field(default_factory=dict)
    """Optimisation seconds by part: forward (W*delta and normalisers), cache
    (P0^T*r), backward (W^T*g), host (loss, AdamW, transfers)."""
    cached_tokens: int = 0
    """Prompt tokens whose KV cells came from the prompt cache (not evaluated)."""
    drafted_tokens: int = 0
    """Speculation (``draft_max``): tokens drafted by prompt lookup."""
    accepted_tokens: int = 0
    """Speculation: drafted tokens the samples matched (each saved a decode step)."""
    lr: float = 0.0
    """The step size SLOT used: the given one, or the one lr="auto" chose."""
    calibration: list[tuple[float, float]] = field(default_factory=list)
    """lr="auto": (step size, mean KL(p0 || p_delta) over the loss positions)
    along the ladder of step sizes measured, ascending; the chosen step size
    is where this KL meets ``kl_budget``."""
    calibration_seconds: float = 0.0
    slot_loss_bound: float = 0.0
    """On the bounded path: the largest, over the steps, of a bound on
    |true loss - the loss reported in ``losses``| (0 on the exact paths)."""
    slot_cache_mean_k: float = 0.0
    """On the bounded path: tokens kept per loss position, on average."""
    seed: int = 0
    """The sampler's seed (sample j of a prompt draws with seed + j)."""
    token_logprobs: Optional[list[float]] = None
    """With logprobs=True: log p of each generated token under the
    distribution it was drawn from before repetition penalty, temperature
    and truncation (the model's, shifted by delta's logit bias if any)."""
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    """With top_logprobs=N: the N most likely (token id, log p) at each step."""
    prompt_logprobs: Optional[list[float]] = None
    """With prompt_logprobs=True: log p(context[i] | context[:i]) for i >= 1,
    under delta's bias if any."""
    score_logprobs: Optional[list[float]] = None
    """With score_tokens: log p of each of those tokens right after the
    context (prompt and response prefix), under delta's bias if any."""
    hidden: Optional[np.ndarray] = None
    """With return_hidden=True: the final normed hidden state (float32,
    n_embd) at the context's last token."""

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.timings.generate if self.timings.generate > 0 else 0.0

    @property
    def delta_norm(self) -> float:
        return float(np.linalg.norm(self.delta)) if self.delta is not None else 0.0


@dataclass(frozen=True)
class ModelInfo:
    """Facts read from the GGUF file."""

    path: str
    architecture: str
    name: str
    n_embd: int
    n_vocab: int
    n_ctx: int
    head_tensor: str
    head_type: str
    tied_embeddings: bool
    head_bias: bool
    final_logit_softcapping: float
    logit_scale: float
    has_chat_template: bool
    file_size: int
    slot_supported: bool
    slot_unsupported_reason: str
    #: ggml's CPU backend variant running the model ("native" in a static
    #: build; in a portable wheel the one loaded for this CPU, e.g. "zen4").
    cpu_variant: str = ""
    #: the ggml backends loaded, e.g. "CPU" or "RPC, CPU".
    backend: str = ""
