"""The typed Python face of the native core: Model, results, validation."""

from __future__ import annotations

import logging
import json
import math
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from . import options as opts
from ._default_model import default_model_path
from .options import (  # noqa: F401  (AUTO_LR_REFERENCE: re-exported)
    AUTO_LR_REFERENCE, RequestExtras, SamplingOptions, SlotOptions, check_float, check_int)

_LOG = logging.getLogger("slot_cpp")

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]
"""Raw text, or chat messages formatted with the chat template."""
BatchPrompt = Union[str, Sequence[Message], Sequence[int]]
"""A prompt of generate_batch: raw text, chat messages, or token ids."""
TextCallback = Callable[[str], Optional[bool]]
BatchTextCallback = Callable[[int, str], Optional[bool]]
"""Receives (result index, text piece); returning False stops that sequence."""
CancelCheck = Union[threading.Event, Callable[[], bool]]
"""A ``threading.Event`` or a callable: when set (or True), the call stops."""

ROLES = frozenset({"system", "user", "assistant"})
DEFAULT_MEMORY_BUDGET: Optional[int] = SlotOptions.memory_budget  # None: sized from the memory available
DEFAULT_KL_BUDGET: float = SlotOptions.kl_budget


class ModelClosedError(_core.SlotError):
    """The Model was closed; create a new one."""


def _cancel_check(cancel: Optional[CancelCheck]) -> Optional[Callable[[], bool]]:
    if cancel is None:
        return None
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if not callable(cancel):
        raise TypeError("cancel must be a threading.Event or a callable returning bool")
    return lambda: bool(cancel())


def _check_rpc(rpc: Optional[Sequence[str]]) -> list[str]:
    if rpc is None:
        return []
    if isinstance(rpc, str):
        rpc = rpc.split(",")
    out = []
    for endpoint in rpc:
        if not isinstance(endpoint, str):
            raise TypeError("rpc must be a list of 'host:port' strings")
        host, sep, port = endpoint.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"an RPC server must be given as host:port, got {endpoint!r}")
        # llama.cpp's RPC client aborts the process when it cannot connect:
        # make sure something listens first.
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise _core.ModelLoadError(f"no ggml rpc-server answered at {endpoint.strip()} ({exc})") from None
        out.append(endpoint.strip())
    return out


# Written into LoRA adapters by slot_cpp.lmcor.train_corrector: the digest of
# the base model's fingerprint, checked when the adapter is loaded.
ADAPTER_BASE_DIGEST_KEY = "slot_cpp.base_model.digest"

LoraSpec = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], float]]


def _check_loras(lora: Union[LoraSpec, Sequence[LoraSpec], None]) -> list[tuple[str, float]]:
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike)) or (isinstance(lora, tuple) and len(lora) == 2
                                                 and not isinstance(lora[1], (str, os.PathLike))):
        lora = [lora]  # type: ignore[list-item]
    out = []
    for item in lora:  # type: ignore[union-attr]
        path, scale = (item if isinstance(item, tuple) else (item, 1.0))
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("lora must be a path, a (path, scale) pair, or a list of them")
        scale = check_float("LoRA scale", scale, low=-math.inf)
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {path}")
        out.append((str(path), scale))
    return out


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


class Model:
    """A GGUF model loaded through llama.cpp, ready for SLOT generation.

    Use it as a context manager or call :meth:`close`. One Model may be shared
    by threads: generate calls made at the same time decode together, up to
    ``n_parallel`` sequences (continuous batching); later samples wait for a
    free sequence. ``max_waiting`` > 0 bounds the calls waiting: one more
    raises :class:`QueueFullError` at once.

    ``lora=path`` (or ``(path, scale)``, or a list of them) applies GGUF LoRA
    adapters made for this model (``slot-cpp lmcor train`` writes one), so one
    base file serves several tasks; an adapter for another base is refused.

    ``rpc=["host:port", ...]`` offloads the layers (all of them unless
    ``n_gpu_layers`` says otherwise) to ggml rpc-server processes
    (``slot-cpp rpc-server``) with llama.cpp's RPC backend; SLOT's head
    products stay on the local CPU.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str], None] = None,
        *,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        n_parallel: int = 4,
        seed: int = 0,
        use_mmap: bool = True,
        max_waiting: int = 0,
        rpc: Optional[Sequence[str]] = None,
        lora: Union[LoraSpec, Sequence[LoraSpec], None] = None,
    ) -> None:
        n_ctx = check_int("n_ctx", n_ctx, 0)
        max_waiting = check_int("max_waiting", max_waiting, 0)
        n_batch = check_int("n_batch", n_batch, 1)
        n_parallel = check_int("n_parallel", n_parallel, 1)
        if n_parallel > min(n_batch, 256):
            raise ValueError(f"n_parallel must be <= min(n_batch, 256) = {min(n_batch, 256)}, got {n_parallel}")
        threads = 0 if n_threads is None else check_int("n_threads", n_threads, 1)
        n_gpu_layers = check_int("n_gpu_layers", n_gpu_layers, -1)
        self._seed = check_int("seed", seed, 0)
        self._fingerprint: Optional[dict[str, Any]] = None
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self._path = str(Path(path))
        self._session: Optional[_core.Session] = None
        self._fallback_said = False  # the log names a fallback chat template once
        self._templates: dict[str, Any] = {}  # llama.cpp's common/chat templates, by override text
        loras = _check_loras(lora)
        rpc_servers = _check_rpc(rpc)
        self._session = _core.Session(self._path, n_ctx, n_batch, threads, n_gpu_layers, n_parallel,
                                      bool(use_mmap), rpc_servers, loras)
        self._loras = loras
        # Fixed for the model's life: read once, so that argument checks never
        # wait for a call running in another thread.
        self._n_vocab = self._session.n_vocab
        self._n_embd = self._session.n_embd
        self._n_ctx = self._session.n_ctx
        self._n_parallel = self._session.n_parallel
        self._session.set_max_waiting(max_waiting)
        try:
            self._check_adapter_bases()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle -------------------------------------------------------
    def close(self) -> None:
        """Free the model and its context. Safe to call more than once."""
        session, self._session = self._session, None
        if session is not None:
            session.close()

    @property
    def closed(self) -> bool:
        return self._session is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Model({self._path!r}, {state})"

    def _s(self) -> _core.Session:
        if self._session is None:
            raise ModelClosedError("this Model is closed")
        return self._session

    def native_session(self) -> _core.Session:
        """The native session (``_core.Session``) under this Model, for the
        method modules built on it (RTD makes its search index there). Not a
        stable interface; raises :class:`ModelClosedError` once closed."""
        return self._s()

    def hidden_states(self, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """Final normed hidden states at ``spans[i]`` (start, end) positions of
        each token row, stacked (sum of span lengths, n_embd), float32."""
        lists = [self.check_tokens(r) for r in rows]
        return self._s().hidden_states(lists, [(int(a), int(b)) for a, b in spans])

    def embed(self, texts: Union[str, Sequence[Union[str, Sequence[int]]]], *, pooling: str = "mean",
              normalize: bool = True) -> np.ndarray:
        """Sentence embeddings: the final normed hidden states of each text
        (or token list), pooled over its tokens (``"mean"``) or taken at its
        last token (``"last"``), L2-normalised unless told otherwise.
        Returns float32 (len(texts), n_embd); a single str gives one row."""
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise ValueError("texts is empty")
        rows = [self.tokenize(item) if isinstance(item, str) else list(item) for item in items]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"text {i} has no tokens")  # hidden_states checks the token ids
        spans = [(0, len(r)) if pooling == "mean" else (len(r) - 1, len(r)) for r in rows]
        states = self.hidden_states(rows, spans).astype(np.float64)
        out = np.empty((len(rows), self.n_embd), dtype=np.float64)
        at = 0
        for i, (a, b) in enumerate(spans):
            out[i] = states[at:at + b - a].mean(axis=0)
            at += b - a
        if normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.where(norms > 0, norms, 1.0)
        return out.astype(np.float32)

    def token_piece(self, token: int) -> bytes:
        """The bytes one token spells (special tokens included)."""
        return self._s().token_piece(check_int("token", token, 0, self.n_vocab - 1))

    def adapter_metadata(self, key: str) -> list[str]:
        """The value of a GGUF metadata key in each loaded LoRA adapter ('' where absent)."""
        s = self._s()
        return [s.adapter_meta(i, key) for i in range(s.n_adapters)]

    def _check_adapter_bases(self) -> None:
        s = self._s()
        for i, (path, _) in enumerate(self._loras):
            expected = s.adapter_meta(i, ADAPTER_BASE_DIGEST_KEY)
            if expected and expected != model_fingerprint(self)["digest"]:
                raise _core.ModelLoadError(
                    f"the LoRA adapter {path} was trained on another base model (its base digest {expected} "
                    f"is not this model's {model_fingerprint(self)['digest']}): {self._path}")

    # ---- facts -----------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def eos_token(self) -> Optional[int]:
        """The vocabulary's end-of-sequence token, or None when it has none."""
        t = self._s().eos_token
        return None if t < 0 else int(t)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The LoRA adapters applied, as (path, scale)."""
        return list(self._loras)

    @property
    def n_vocab(self) -> int:
        self._s()
        return self._n_vocab

    @property
    def n_embd(self) -> int:
        self._s()
        return self._n_embd

    @property
    def n_ctx(self) -> int:
        """KV cells of the context, shared by all its sequences."""
        self._s()
        return self._n_ctx

    @property
    def n_parallel(self) -> int:
        """Sequences decoded together (generate_batch's batch size)."""
        self._s()
        return self._n_parallel

    @property
    def decoded_tokens(self) -> int:
        """Tokens llama.cpp has evaluated in this Model so far (prompts and generated)."""
        return self._s().decoded_tokens

    @property
    def logit_rows(self) -> int:
        """Rows of logits llama.cpp has computed in this Model so far: how
        often the output head ran (prompt positions that needed outputs, and
        one per generated token)."""
        return self._s().logit_rows

    def stats(self) -> BatchStats:
        """Counters of the shared token loop: waiting calls, live sequences, tokens."""
        return BatchStats(**{k: int(v) for k, v in self._s().stats().items()})

    def clear_cache(self) -> None:
        """Drop the prompt cache (the KV cells earlier calls left behind)."""
        self._s().clear_cache()

    def drop_cached(self, prefix: Sequence[int]) -> int:
        """Drop the cached sequences whose tokens start with ``prefix`` (a
        branch that will not be continued); returns how many were dropped."""
        toks = self.check_tokens(prefix)
        if not toks:
            raise ValueError("prefix is empty")
        return int(self._s().drop_cached(toks))

    @property
    def slot_backend(self) -> str:
        """Where SLOT's output-head products run: the model's GPU when layers
        are offloaded to one (with ggml's portable ops and a transposed copy
        of the head), else the CPU. Loads the head on first use."""
        return self._s().slot_backend()

    @property
    def info(self) -> ModelInfo:
        s = self._s()
        raw = s.file_info()
        reason = raw["slot_unsupported_reason"]
        cpu = _core.cpu_backend()
        return ModelInfo(
            path=raw["path"], architecture=raw["architecture"], name=raw["name"],
            n_embd=self._n_embd, n_vocab=self._n_vocab, n_ctx=self._n_ctx, head_tensor=raw["head_tensor"],
            head_type=raw["head_type"], tied_embeddings=raw["tied_embeddings"], head_bias=raw["head_bias"],
            final_logit_softcapping=raw["final_logit_softcapping"], logit_scale=raw["logit_scale"],
            has_chat_template=s.has_chat_template, file_size=raw["file_size"],
            slot_supported=not reason, slot_unsupported_reason=reason,
            cpu_variant=cpu["variant"], backend=", ".join(cpu["backends"]),
        )

    # ---- text ------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._s().tokenize(text, add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._s().detokenize(self.check_tokens(tokens)).decode("utf-8", "replace")

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                            template: Optional[str] = None) -> str:
        """Format messages with the model's chat template (or a built-in one by name)."""
        pairs = self._check_messages(messages)
        if template is not None and not isinstance(template, str):
            raise TypeError("template must be a str or None")
        if template is None and not self.info.has_chat_template:
            template = self._fallback_template()
        out = self._s().apply_chat_template(pairs, add_generation_prompt, template or "")
        return out.decode("utf-8", "replace")

    def _chat_templates(self, source: Optional[str]) -> Any:
        """llama.cpp's chat templates (common/chat, Jinja) of this model, or
        ``source``'s; each parsed once (ValueError when it cannot be)."""
        if source is not None and not isinstance(source, str):
            raise TypeError("chat_template must be Jinja text (a str) or None")
        key = source or ""
        templates = self._templates.get(key)
        if templates is None:
            templates = self._templates[key] = self._s().chat_templates(key)
        return templates

    def _fallback_template(self) -> str:
        """A GGUF without a chat template: llama.cpp's built-in for the architecture
        (Gemma's turn markers for gemma*, else ChatML, as llama.cpp falls back), said once in the log."""
        arch = self.info.architecture
        name = "gemma" if arch.startswith("gemma") else "phi3" if arch == "phi3" else "chatml"
        if not self._fallback_said:
            self._fallback_said = True
            _LOG.warning("%s has no chat template; formatting chats with llama.cpp's built-in %r template "
                         "(pass chat_template to choose another)", Path(self.path).name, name)
        return name

    def _check_messages(self, messages: Any) -> list[tuple[str, str]]:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} mappings")
        if len(messages) == 0:
            raise ValueError("messages is empty")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise TypeError(f"message {i} must be a mapping with 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise ValueError(f"message {i} has unknown role {role!r}; expected one of {sorted(ROLES)}")
            if not isinstance(content, str):
                raise TypeError(f"message {i} content must be a str")
            pairs.append((role, content))
        return pairs

    def check_tokens(self, tokens: Any) -> list[int]:
        """Token ids as a list of ints inside this model's vocabulary (TypeError/ValueError otherwise)."""
        return opts.check_tokens(tokens, self.n_vocab)

    def prompt_tokens(self, prompt: Prompt, *, chat_template: Optional[str] = None,
                      system: Optional[str] = None) -> list[int]:
        """Token ids of a prompt: raw text, or chat messages formatted with the template."""
        return self._prompt_text_and_tokens(prompt, chat_template, system)[1]

    def _prompt_text_and_tokens(self, prompt: Prompt, chat_template: Optional[str],
                                system: Optional[str]) -> tuple[str, list[int], Optional[list[Message]]]:
        messages: Optional[list[Message]] = None
        if isinstance(prompt, str):
            if system is not None:
                messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            elif chat_template is not None:
                messages = [{"role": "user", "content": prompt}]
            text = prompt if messages is None else self.apply_chat_template(messages, template=chat_template)
        else:
            text = self.apply_chat_template(prompt, template=chat_template)
            messages = list(prompt)
        if text == "":
            raise ValueError("the prompt is empty")
        tokens = self.tokenize(text)
        if not tokens:
            raise ValueError("the prompt produced no tokens")
        return text, tokens, messages

    def user_loss_mask(self, prompt: Prompt, *, chat_template: Optional[str] = None,
                       system: Optional[str] = None) -> tuple[list[int], list[bool]]:
        """Token ids of a chat prompt and SLOT's loss mask for ``loss_on="user"``:
        entry t is True when tokens t and t+1 both lie inside one user
        message's content. Template tokens are out, and so is each message's
        first content token: it is predicted from the template's turn header,
        the context the answer starts from, and learning it teaches the model
        to answer by repeating the user."""
        text, tokens, messages = self._prompt_text_and_tokens(prompt, chat_template, system)
        if messages is None:
            raise ValueError("loss_on='user' needs chat messages (or a chat_template or system prompt)")
        data = text.encode("utf-8")
        pieces = self._token_pieces(tokens)
        joined = b"".join(pieces)
        if joined == data or joined.endswith(data):
            shift = len(joined) - len(data)
        else:
            raise ValueError("the prompt's tokens do not spell out its formatted text; loss_on='user' cannot "
                             "locate the user's messages")
        spans = []
        cursor = 0
        for i, m in enumerate(messages):
            content = m["content"].encode("utf-8")
            if m["role"] != "user" or not content:
                continue
            at = data.find(content, cursor)
            if at < 0:
                raise ValueError(f"message {i}'s content does not appear verbatim in the formatted prompt; "
                                 "loss_on='user' cannot locate it")
            spans.append((at + shift, at + shift + len(content)))
            cursor = at + len(content)
        return tokens, self._span_mask(pieces, spans)

    def last_block_loss_mask(self, tokens: Sequence[int]) -> list[bool]:
        """SLOT's loss mask for ``loss_on="last"``: entry t is True when
        tokens t and t+1 both lie in the prompt's last block, the text after
        its last blank line (all of it when it has none). In a few-shot
        prompt that block is the question: learning the exemplars too pulls
        the answer towards their style (extra steps, their length) rather
        than towards the question."""
        pieces = self._token_pieces(self.check_tokens(tokens))
        data = b"".join(pieces)
        start = data.rfind(b"\n\n")
        mask = self._span_mask(pieces, [(0 if start < 0 else start + 2, len(data))])
        if sum(mask) < 2:
            raise ValueError("the prompt's last block (the text after its last blank line) holds fewer than three "
                             "tokens; loss_on='last' has nothing to learn from")
        return mask

    def _token_pieces(self, tokens: list[int]) -> list[bytes]:
        return [self._s().token_piece(t) for t in tokens]

    @staticmethod
    def _span_mask(pieces: list[bytes], spans: list[tuple[int, int]]) -> list[bool]:
        # Byte spans of the joined pieces -> entry t True when tokens t and
        # t+1 both lie inside one span.
        inside = []
        offset = 0
        for piece in pieces:
            start, end = offset, offset + len(piece)
            offset = end
            span = next((k for k, (a, b) in enumerate(spans) if a <= start and end <= b and end > start), -1)
            inside.append(span)
        return [inside[t] >= 0 and inside[t] == inside[t + 1] for t in range(len(pieces) - 1)]

    # ---- generation --------------------------------------------------------
    def generate_with_slot(
        self,
        prompt: Prompt,
        *,
        chat_template: Optional[str] = None,
        system: Optional[str] = None,
        prompt_token_ids: Optional[Sequence[int]] = None,
        on_text: Optional[TextCallback] = None,
        cancel: Optional[CancelCheck] = None,
        sampling: Optional[SamplingOptions] = None,
        slot: Optional[SlotOptions] = None,
        **options: Any,
    ) -> GenerationResult:
        """Learn delta on the prompt with ``steps`` AdamW steps, then generate with it.

        ``prompt`` is raw text or a list of chat messages (formatted with the
        model's chat template, or ``chat_template``); ``prompt_token_ids``
        gives the tokens instead. ``steps=0`` is plain generation. A given
        ``delta`` is applied without optimisation. ``on_text`` receives text
        pieces as they are generated; returning False stops generation.

        The options (every field of :class:`~slot_cpp.options.SamplingOptions`,
        :class:`~slot_cpp.options.SlotOptions` and
        :class:`~slot_cpp.options.RequestExtras`, listed below) are keyword
        arguments; ``sampling=`` and ``slot=`` take whole groups, which the
        keyword arguments then override.

        ``response_prefix`` (token ids) continues a response already begun:
        the prompt's and the prefix's KV cells are reused from the prompt
        cache where they are still held, and only new tokens are returned.
        ``score_tokens`` and ``return_hidden`` with ``max_tokens=0`` score
        without generating. ``rtd`` (a :class:`slot_cpp.rtd.Datastore`, or
        :class:`slot_cpp.rtd.RTD`) blends retrieval into every next-token
        distribution, after SLOT's bias; logprobs and score_tokens then
        report the blended distribution. ``loss_on="user"`` restricts SLOT's
        loss to the user's message content (see :meth:`user_loss_mask`), and
        ``loss_on="last"`` to the prompt's last block, the question of a
        few-shot prompt (see :meth:`last_block_loss_mask`).
        ``lr="auto"`` chooses the step size per prompt by a trust region of
        ``kl_budget`` (``result.lr`` and ``result.calibration`` report it).

        ``cancel`` (a ``threading.Event`` or a callable returning True to
        stop), polled every 20 ms on the calling thread, ends the call with
        :class:`GenerationCancelled`; its sequence is freed at once.
        Calls from several threads on one Model decode together.
        """
        s = self._s()
        cancel_check = _cancel_check(cancel)
        if on_text is not None and not callable(on_text):
            raise TypeError("on_text must be callable")
        groups = self._groups(options, sampling, slot, where="generate_with_slot()")
        if prompt_token_ids is not None:
            if groups[1].loss_on == "user":
                raise ValueError("loss_on='user' needs chat messages, not prompt_token_ids")
            tokens = self.check_tokens(prompt_token_ids)
            if not tokens:
                raise ValueError("the prompt is empty")
            loss_mask = self._tokens_loss_mask(tokens, groups[1])
        else:
            tokens, loss_mask = self._tokens_and_mask(prompt, groups[1], chat_template, system)
        request = self._build_request(tokens, 1, groups, loss_mask)
        callback = None
        if on_text is not None:
            user_callback = on_text

            def callback(index: int, piece: bytes) -> bool:
                keep = user_callback(piece.decode("utf-8", "replace"))
                return keep is None or bool(keep)

        return _result(s.generate_batch([request], callback, cancel_check)[0], request)

    def generate_batch(
        self,
        prompts: Sequence[BatchPrompt],
        n: int = 1,
        *,
        chat_template: Optional[str] = None,
        system: Optional[str] = None,
        on_text: Optional[BatchTextCallback] = None,
        cancel: Optional[CancelCheck] = None,
        sampling: Optional[SamplingOptions] = None,
        slot: Optional[SlotOptions] = None,
        **options: Any,
    ) -> list[GenerationResult]:
        """Generate for many prompts at once, ``n`` samples each.

        Returns ``len(prompts) * n`` results in input order, the n samples of
        a prompt adjacent: result ``i * n + j`` is sample j of prompt i. Up to
        ``n_parallel`` sequences decode together, one llama_decode per token
        step; the rest wait for a free sequence. Each prompt is evaluated
        once and its samples share its KV cells. SLOT (``steps`` > 0; here
        the default is 0, plain generation) learns one delta per prompt, used
        by all its samples. Sample j draws with ``seed + j``, so it equals a
        single call with that seed.

        The options are those of :meth:`generate_with_slot`. Any of them may
        be given per prompt as a list of ``len(prompts)`` values (``stop`` as
        a list of lists, ``delta`` as a list of arrays or None or a 2-D
        array, ``response_prefix`` as a list of token lists). Prompts are
        text, chat messages, or lists of token ids. ``on_text`` receives
        (result index, text piece). ``cancel`` is as in :meth:`generate_with_slot`.
        """
        s = self._s()
        cancel_check = _cancel_check(cancel)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of prompts (text, chat messages or token ids)")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        n = check_int("n", n, 1)
        if on_text is not None and not callable(on_text):
            raise TypeError("on_text must be callable")
        opts.split_options(options, where="generate_batch()")  # unknown names fail before anything runs
        if slot is None and "steps" not in options:
            options = {**options, "steps": 0}
        per_prompt: list[dict[str, Any]] = [dict() for _ in prompts]
        for key, value in options.items():
            for one, v in zip(per_prompt, _split_per_prompt(key, value, len(prompts))):
                one[key] = v
        requests = []
        for i, (prompt, one) in enumerate(zip(prompts, per_prompt)):
            try:
                groups = self._groups(one, sampling, slot, where="generate_batch()")
                if groups[1].loss_on == "user":
                    tokens, loss_mask = self._tokens_and_mask(prompt, groups[1], chat_template, system)
                else:
                    tokens = self._batch_prompt_tokens(prompt, i, chat_template, system)
                    loss_mask = self._tokens_loss_mask(tokens, groups[1])
                requests.append(self._build_request(tokens, n, groups, loss_mask))
            except (TypeError, ValueError) as exc:
                message = str(exc)
                raise type(exc)(message if message.startswith(f"prompt {i}") else f"prompt {i}: {message}") from None
        callback = None
        if on_text is not None:
            user_callback = on_text

            def callback(index: int, piece: bytes) -> bool:
                keep = user_callback(index, piece.decode("utf-8", "replace"))
                return keep is None or bool(keep)

        raws = s.generate_batch(requests, callback, cancel_check)
        return [_result(raw, requests[k // n]) for k, raw in enumerate(raws)]

    def _groups(self, options: Mapping[str, Any], sampling: Optional[SamplingOptions], slot: Optional[SlotOptions],
                *, where: str) -> tuple[SamplingOptions, SlotOptions, RequestExtras]:
        """Keyword options over the given groups, checked once by the groups themselves."""
        split = opts.split_options(options, where=where)
        out = []
        for group_type, given in ((SamplingOptions, sampling), (SlotOptions, slot), (RequestExtras, None)):
            if given is not None and not isinstance(given, group_type):
                raise TypeError(f"expected a {group_type.__name__}, got {type(given).__name__}")
            values = split[group_type]
            out.append(given.replace(**values) if given is not None and values else given or group_type(**values))
        return out[0], out[1], out[2]

    def _tokens_and_mask(self, prompt: Prompt, slot: SlotOptions, chat_template: Optional[str],
                         system: Optional[str]) -> tuple[list[int], Optional[list[bool]]]:
        if slot.loss_on == "user":
            return self.user_loss_mask(prompt, chat_template=chat_template, system=system)
        tokens = self.prompt_tokens(prompt, chat_template=chat_template, system=system)
        return tokens, self._tokens_loss_mask(tokens, slot)

    def _tokens_loss_mask(self, tokens: list[int], slot: SlotOptions) -> Optional[list[bool]]:
        # The masks that the tokens alone decide ("user" needs the messages).
        return self.last_block_loss_mask(tokens) if slot.loss_on == "last" else None

    def _build_request(self, tokens: list[int], n: int, groups: tuple[SamplingOptions, SlotOptions, RequestExtras],
                       loss_mask: Optional[list[bool]]) -> _core.Request:
        facts = opts.ModelFacts(n_vocab=self.n_vocab, n_embd=self.n_embd, seed=self._seed)
        return opts.native_request(tokens, n, *groups, facts, loss_mask=loss_mask, apply_rtd=self._apply_rtd)

    def _apply_rtd(self, value: Any, request: _core.Request) -> None:
        # A Datastore or an RTD: each knows how to check itself against this
        # model and set the native request's retrieval fields.
        apply = getattr(value, "_apply", None)
        if apply is None:
            raise TypeError(f"rtd must be a Datastore or an RTD, got {type(value).__name__}")
        apply(self, request)

    def _batch_prompt_tokens(self, prompt: Any, index: int, chat_template: Optional[str],
                             system: Optional[str]) -> list[int]:
        if (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
                and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)):
            return self.check_tokens(prompt)
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
            if prompt.size == 0:
                raise ValueError(f"prompt {index} is empty")
            return self.check_tokens(prompt.tolist())
        try:
            return self.prompt_tokens(prompt, chat_template=chat_template, system=system)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"prompt {index}: {exc}") from None

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """Plain generation (``steps=0``), or generation with a given ``delta``."""
        if "steps" in kwargs:
            raise TypeError("generate() takes no 'steps'; use generate_with_slot()")
        return self.generate_with_slot(prompt, steps=0, **kwargs)

    def stream(self, prompt: Prompt, **kwargs: Any) -> "TextStream":
        """Like generate_with_slot, but yields text pieces as they come."""
        if "on_text" in kwargs:
            raise TypeError("stream() takes no 'on_text'")
        return TextStream(self, prompt, kwargs)

    # ---- inspection ----------------------------------------------------------
    def output_matrix(self) -> np.ndarray:
        """The output head W as float32, shape (n_vocab, n_embd)."""
        return self._s().output_matrix()

    def prompt_states(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Final normed hidden states (N, n_embd) and logits (N, n_vocab) of a prompt."""
        toks = self.check_tokens(tokens)
        if not toks:
            raise ValueError("tokens is empty")
        return self._s().prompt_states(toks)

    def slot_loss_and_gradient(self, tokens: Sequence[int], delta: np.ndarray, *, recompute: bool = False,
                               cache_precision: str = SlotOptions.cache_precision,
                               cache_tail_mass: float = SlotOptions.cache_tail_mass) -> tuple[float, np.ndarray]:
        """SLOT's prompt loss at ``delta`` and its analytical gradient, on the
        path a request with these options takes (the memory budget automatic)."""
        loss, grad, _ = self.slot_loss_gradient_bound(tokens, delta, recompute=recompute,
                                                      cache_precision=cache_precision,
                                                      cache_tail_mass=cache_tail_mass)
        return loss, grad

    def slot_loss_gradient_bound(self, tokens: Sequence[int], delta: np.ndarray, *, recompute: bool = False,
                                 cache_precision: str = SlotOptions.cache_precision,
                                 cache_tail_mass: float = SlotOptions.cache_tail_mass
                                 ) -> tuple[float, np.ndarray, float]:
        """As :meth:`slot_loss_and_gradient`, with the bound on |true loss -
        loss| that the bounded cache reports (0 on the exact paths)."""
        toks = self.check_tokens(tokens)
        if len(toks) < 2:
            raise ValueError("the prompt needs at least two tokens for a SLOT loss")
        d = opts.check_delta(delta, self.n_embd)
        SlotOptions(cache_precision=cache_precision, cache_tail_mass=cache_tail_mass)  # checks them
        return self._s().slot_loss_and_gradient(toks, d, bool(recompute), cache_precision, float(cache_tail_mass))

    def logit_bias(self, delta: np.ndarray) -> np.ndarray:
        """b = W delta: the logit bias that delta adds at every position."""
        return self._s().logit_bias(opts.check_delta(delta, self.n_embd))

    def token_logprobs(self, tokens: Sequence[int], first: int,
                       delta: Optional[np.ndarray] = None) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i >= first, under delta's logit bias if given."""
        toks = self.check_tokens(tokens)
        first = check_int("first", first, 1)
        if first >= len(toks):
            raise ValueError(f"first ({first}) must be < the number of tokens ({len(toks)})")
        d = None if delta is None else opts.check_delta(delta, self.n_embd)
        return np.asarray(self._s().token_logprobs(toks, first, d), dtype=np.float64)

    def reference_greedy_batch(self, prompts: Sequence[Sequence[int]], n_new: int) -> tuple[list[list[int]], float]:
        """Greedy tokens for several prompts from llama.cpp's own batched loop
        (one context, one stock greedy sampler per sequence, one llama_decode
        per step): a reference for generate_batch. Returns the tokens and the
        seconds spent in the decode steps."""
        lists = [self.check_tokens(p) for p in prompts]
        if not lists or any(not p for p in lists):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        out, seconds = self._s().reference_greedy_batch(lists, check_int("n_new", n_new, 0))
        return [list(o) for o in out], float(seconds)

    def reference_greedy(self, tokens: Sequence[int], n_new: int) -> tuple[list[int], float]:
        """Greedy tokens from llama.cpp's own decode loop and sampler (a reference)."""
        toks = self.check_tokens(tokens)
        if not toks:
            raise ValueError("tokens is empty")
        out, seconds = self._s().reference_greedy(toks, check_int("n_new", n_new, 0))
        return list(out), float(seconds)


def model_fingerprint(model: Model) -> dict[str, Any]:
    """What stored artefacts (datastores, reward heads) must match: the
    architecture, sizes, a hash of the vocabulary and of one column of the
    output head. Computed once per model."""
    if model._fingerprint is not None:
        return dict(model._fingerprint)
    import hashlib

    s = model._s()
    vocab = hashlib.sha256()
    for t in range(model.n_vocab):
        vocab.update(s.token_piece(t))
        vocab.update(b"\0")
    fp: dict[str, Any] = {"architecture": model.info.architecture, "n_embd": model.n_embd,
                          "n_vocab": model.n_vocab, "vocab": vocab.hexdigest()[:16]}
    try:
        e0 = np.zeros(model.n_embd, dtype=np.float32)
        e0[0] = 1.0
        column = model.logit_bias(e0).astype(np.float32)
        fp["head"] = hashlib.sha256(np.round(column, 4).tobytes()).hexdigest()[:16]
    except _core.UnsupportedModelError:
        fp["head"] = None
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]
    fp["digest"] = digest
    model._fingerprint = dict(fp)
    return fp


def _split_per_prompt(key: str, value: Any, count: int) -> list[Any]:
    """One value per prompt: `value` itself for all, or its items when it is given per prompt."""
    if key == "delta":
        if isinstance(value, np.ndarray) and value.ndim == 2:
            per = list(value)
        elif isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float, np.number)) for v in value):
            per = list(value)
        else:
            return [value] * count
    elif key == "logit_bias":
        # Per prompt: a list of mappings (or None); otherwise one bias for all.
        nested = (isinstance(value, (list, tuple)) and len(value) > 0
                  and all(v is None or isinstance(v, Mapping) for v in value))
        if not nested:
            return [value] * count
        per = list(value)
    elif key in ("stop", "response_prefix", "score_tokens"):
        nested = (isinstance(value, (list, tuple)) and len(value) > 0
                  and all(v is None or (isinstance(v, (list, tuple)) and not isinstance(v, str)) for v in value))
        if not nested:
            return [value] * count
        per = [(() if key == "stop" else None) if v is None else v for v in value]
    elif isinstance(value, (list, tuple)):
        per = list(value)
    else:
        return [value] * count
    if len(per) != count:
        raise ValueError(f"{key} is given per prompt with {len(per)} values for {count} prompts")
    return per


def _result(raw: _core.RawResult, request: _core.Request) -> GenerationResult:
    logprobs = [float(x) for x in raw.token_logprobs] if request.logprobs else None
    top = ([[(int(t), float(lp)) for t, lp in step] for step in raw.top_logprobs]
           if request.top_logprobs > 0 else None)
    return GenerationResult(
        text=raw.text_bytes.decode("utf-8", "replace"),
        tokens=list(raw.tokens),
        finish_reason=raw.finish_reason,
        delta=raw.delta,
        losses=list(raw.losses),
        steps_done=raw.steps_done,
        slot_status=raw.slot_status,
        slot_path=raw.slot_path,
        slot_cache_bytes=raw.slot_cache_bytes,
        prompt_tokens=raw.prompt_tokens,
        timings=Timings(raw.prefill_seconds, raw.optimise_seconds, raw.generate_seconds),
        slot_profile=dict(raw.slot_profile),
        cached_tokens=raw.cached_tokens,
        lr=float(raw.slot_lr),
        calibration=[(float(a), float(b)) for a, b in zip(raw.calibration_lrs, raw.calibration_kls)],
        calibration_seconds=float(raw.calibration_seconds),
        slot_loss_bound=float(raw.slot_loss_bound),
        slot_cache_mean_k=float(raw.slot_cache_mean_k),
        seed=raw.seed,
        token_logprobs=logprobs,
        top_logprobs=top,
        score_logprobs=[float(x) for x in raw.score_logprobs] if request.score_tokens else None,
        prompt_logprobs=[float(x) for x in raw.prompt_logprobs] if request.prompt_logprobs else None,
        hidden=raw.hidden,
    )


class TextStream:
    """Iterator over generated text pieces; ``result`` holds the full result after it ends."""

    _DONE = object()

    def __init__(self, model: Model, prompt: Prompt, kwargs: dict[str, Any]) -> None:
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._cancel = threading.Event()
        self.result: Optional[GenerationResult] = None
        self._error: Optional[BaseException] = None

        def on_text(piece: str) -> bool:
            self._queue.put(piece)
            return not self._cancel.is_set()

        def work() -> None:
            try:
                self.result = model.generate_with_slot(prompt, on_text=on_text, **kwargs)
            except BaseException as exc:  # re-raised in the consumer
                self._error = exc
            finally:
                self._queue.put(self._DONE)

        self._thread = threading.Thread(target=work, name="slot_cpp-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    break
                assert isinstance(item, str)
                yield item
        finally:
            self._cancel.set()
            self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()


def generate_with_slot(model_path: Union[str, os.PathLike[str], None], prompt: Prompt,
                       **kwargs: Any) -> GenerationResult:
    """One-off: load the model, run SLOT generation, free the model."""
    model_keys = {"n_ctx", "n_threads", "n_gpu_layers", "n_batch", "n_parallel", "seed", "use_mmap"}
    model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in model_keys}
    with Model(model_path, **model_kwargs) as model:
        return model.generate_with_slot(prompt, **kwargs)


def _options_section() -> str:
    lines = ["", "        Options (keyword arguments; defaults in brackets):", ""]
    for group in opts.GROUPS:
        for name, default, spec in opts.specs(group):
            bound = spec.range_text()
            lines.append(f"        - ``{name}`` [{default!r}]{' ' + bound if bound else ''}: {spec.doc}")
    return "\n".join(lines) + "\n"


if Model.generate_with_slot.__doc__:
    Model.generate_with_slot.__doc__ += _options_section()
