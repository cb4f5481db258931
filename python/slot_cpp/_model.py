"""The typed Python face of the native core: Model (its lifecycle, facts and
tokens, and thin methods over the modules that do the rest: _prompts.py for
chat templates, prompt tokens and loss masks, _generation.py for generation).
The result types are in results.py, the research probes in probes.py."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core, _generation, _prompts
from . import options as opts
from ._default_model import default_model_path
from ._loading import ADAPTER_BASE_DIGEST_KEY, LoraSpec, check_loras, check_rpc, hub_file
from ._prompts import ROLES, Message, Prompt  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .states import SavedState
from .options import (  # noqa: F401  (AUTO_LR_REFERENCE: re-exported)
    AUTO_LR_REFERENCE, RequestExtras, SamplingOptions, SlotOptions, check_int)
from .results import BatchStats, GenerationResult, ModelInfo, Timings  # noqa: F401  (re-exported)
from ._generation import TextStream  # noqa: F401  (re-exported)

BatchPrompt = Union[str, Sequence[Message], Sequence[int]]
"""A prompt of generate_batch: raw text, chat messages, or token ids."""
TextCallback = Callable[[str], Optional[bool]]
BatchTextCallback = Callable[[int, str], Optional[bool]]
"""Receives (result index, text piece); returning False stops that sequence."""
CancelCheck = Union[threading.Event, Callable[[], bool]]
"""A ``threading.Event`` or a callable: when set (or True), the call stops."""

DEFAULT_MEMORY_BUDGET: Optional[int] = SlotOptions.memory_budget  # None: sized from the memory available
DEFAULT_KL_BUDGET: float = SlotOptions.kl_budget


class ModelClosedError(_core.SlotError):
    """The Model was closed; create a new one."""


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

    ``deterministic=True`` makes evaluation batch-invariant: a request's
    tokens and logprobs (and SLOT's delta) are bit-identical whether it runs
    alone or beside others, with its prefix cached or not, in any arrival
    order. Each sequence then holds ``n_ctx / n_parallel`` KV cells of its own
    (:attr:`seq_capacity`); see the manual's "Deterministic mode" page.
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
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        flash_attn: str = "auto",
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        use_mlock: bool = False,
        deterministic: bool = False,
        rope_scaling: Optional[str] = None,
        yarn_orig_ctx: int = 0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = -1.0,
        yarn_beta_fast: float = -1.0,
        yarn_beta_slow: float = -1.0,
        kv_overrides: Any = None,
        draft_model: Union[str, os.PathLike[str], None] = None,
    ) -> None:
        settings = opts.ModelSettings(n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch,
                                      n_parallel=n_parallel, seed=seed, use_mmap=use_mmap, max_waiting=max_waiting,
                                      rpc=rpc, lora=lora, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                      flash_attn=flash_attn, rope_freq_base=rope_freq_base,
                                      rope_freq_scale=rope_freq_scale, use_mlock=use_mlock,
                                      deterministic=deterministic, rope_scaling=rope_scaling,
                                      yarn_orig_ctx=yarn_orig_ctx, yarn_ext_factor=yarn_ext_factor,
                                      yarn_attn_factor=yarn_attn_factor, yarn_beta_fast=yarn_beta_fast,
                                      yarn_beta_slow=yarn_beta_slow, kv_overrides=kv_overrides,
                                      draft_model=os.fspath(draft_model) if isinstance(draft_model, os.PathLike) else draft_model)
        self._seed = settings.seed
        self._settings = settings
        self._weights: Optional[str] = None
        self._fingerprint: Optional[dict[str, Any]] = None
        if path is None:
            path = default_model_path()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self._path = str(Path(path))
        self._session: Optional[_core.Session] = None
        self._chat = _prompts.ChatTemplates(Path(self._path).name)
        loras = check_loras(settings.lora)
        rpc_servers = check_rpc(settings.rpc)
        self._session = _core.Session(self._path, settings.n_ctx, settings.n_batch, settings.n_threads or 0,
                                      settings.n_gpu_layers, settings.n_parallel, settings.use_mmap, rpc_servers,
                                      loras, settings.deterministic, settings.cache_type_k, settings.cache_type_v,
                                      settings.flash_attn, settings.rope_freq_base, settings.rope_freq_scale,
                                      settings.use_mlock, settings.rope_scaling or "", settings.yarn_orig_ctx,
                                      settings.yarn_ext_factor, settings.yarn_attn_factor, settings.yarn_beta_fast,
                                      settings.yarn_beta_slow, list(settings.kv_overrides or ()),
                                      settings.draft_model or "")
        self._loras = loras
        # Fixed for the model's life: read once, so that argument checks never
        # wait for a call running in another thread.
        self._n_vocab = self._session.n_vocab
        self._n_embd = self._session.n_embd
        self._n_ctx = self._session.n_ctx
        self._n_parallel = self._session.n_parallel
        self._seq_capacity = self._session.seq_capacity
        self._deterministic = self._session.deterministic
        self._session.set_max_waiting(settings.max_waiting)
        try:
            self._check_adapter_bases()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str, *, revision: Optional[str] = None,
                        cache_dir: Union[str, os.PathLike[str], None] = None, local_files_only: bool = False,
                        **settings: Any) -> Model:
        """A Model of a GGUF file on the Hugging Face hub, downloaded once
        into the hub's cache: ``Model.from_pretrained("owner/name",
        "*Q4_K_M.gguf", n_ctx=8192)``. ``filename`` may be a glob pattern
        that matches one file; ``settings`` are Model's keyword arguments.
        Needs ``huggingface_hub`` (``pip install 'slot_cpp[hub]'``)."""
        path = hub_file(repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        return cls(path, **settings)

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
                raise ValueError(f"text {i} has no tokens")  # the token ids are checked below
        spans = [(0, len(r)) if pooling == "mean" else (len(r) - 1, len(r)) for r in rows]
        states = self._s().hidden_states([self.check_tokens(r) for r in rows], spans).astype(np.float64)
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
        """The LoRA adapters loaded, as (path, scale): the scale a request
        without ``lora`` of its own applies (see :meth:`set_lora_scales`)."""
        scales = self._s().lora_defaults()
        return [(path, float(scale)) for (path, _), scale in zip(self._loras, scales)]

    @property
    def n_adapters(self) -> int:
        return len(self._loras)

    def set_lora_scales(self, scales: Any) -> None:
        """The adapters' scales for requests that give none: a mapping
        adapter id -> scale, or llama-server's list of {"id", "scale"}
        (adapters not named: 0). Requests that give ``lora`` choose their own."""
        pairs = opts.RequestExtras(lora=scales).lora or ()
        self._s().set_lora_defaults(opts.lora_scales(pairs, self.n_adapters))

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
    def deterministic(self) -> bool:
        """Whether the model evaluates batch-invariantly (``Model(deterministic=True)``)."""
        return self._deterministic

    @property
    def draft_model(self) -> Optional[str]:
        """The path of the model that drafts for speculation (``Model(draft_model=...)``), or None
        when requests with ``draft_max`` draft by prompt lookup."""
        return self._settings.draft_model

    @property
    def seq_capacity(self) -> int:
        """KV cells one sequence may hold: ``n_ctx``, or ``n_ctx / n_parallel`` (padded
        to 256) in deterministic mode."""
        return self._seq_capacity

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

    @property
    def settings(self) -> opts.ModelSettings:
        """The settings the model was loaded with."""
        return self._settings

    def save_state(self, path: Union[str, os.PathLike[str]], prompt: Union[Prompt, Sequence[int]], *,
                   delta: Any = None, chat_template: Optional[str] = None) -> SavedState:
        """Save the KV cells of ``prompt`` (text, chat messages or token ids)
        to ``path``, with ``delta`` (a SLOT delta learned on it) if given.
        The prompt is evaluated first unless the prompt cache holds it. The
        file is checksummed and written crash-safely (see :mod:`slot_cpp.states`)."""
        from .states import write_state

        tokens = self._state_tokens(prompt, chat_template)
        if delta is not None:
            delta = opts.check_delta(delta, self.n_embd)
        data = b""
        for _ in range(3):  # a concurrent call may take the cached sequence in between
            data = self._s().cached_state(tokens)
            if data:
                break
            self.generate(tokens, max_tokens=0)
        if not data:
            raise RuntimeError("the prompt's cells could not be kept in the cache to be saved (every sequence "
                               "is busy); try again")
        return write_state(self._state_identity(), path, tokens, data, delta,
                           [scale for _, scale in self.loras])

    def load_state(self, path: Union[str, os.PathLike[str]]) -> SavedState:
        """Restore a state saved by :meth:`save_state` (by this model, with
        the same KV cache types) into the prompt cache: a prompt that begins
        with its ``tokens`` then skips their evaluation. Returns it, with its
        delta. ValueError for a damaged file or one of another model."""
        from .states import read_state

        state, data = read_state(self._state_identity(), path)
        self._s().restore_state(state.tokens, data, -1, state.lora_scales)
        return state

    def _state_identity(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a saved state's cells belong to: this model (a sample of its
        weights included), and what else shapes them."""
        from .states import weights_sample

        if self._weights is None:
            self._weights = weights_sample(self._path)
        s = self._settings
        layout = {"cache_type_k": s.cache_type_k, "cache_type_v": s.cache_type_v, "deterministic": self.deterministic,
                  "rope": [s.rope_freq_base, s.rope_freq_scale, s.rope_scaling, s.yarn_orig_ctx, s.yarn_ext_factor,
                           s.yarn_attn_factor, s.yarn_beta_fast, s.yarn_beta_slow],
                  "kv_overrides": [list(o) for o in s.kv_overrides or ()],
                  "adapters": [Path(p).name for p, _ in self._loras]}
        return {**model_fingerprint(self), "weights": self._weights}, layout

    def _state_tokens(self, prompt: Any, chat_template: Optional[str]) -> list[int]:
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping)):
            return self.prompt_tokens(prompt, chat_template=chat_template)
        tokens = self.check_tokens(prompt)
        if not tokens:
            raise ValueError("the prompt is empty")
        return tokens

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
                            template: Optional[str] = None, **chat: Any) -> str:
        """Format OpenAI-shaped messages with the model's own chat template
        (rendered by llama.cpp's Jinja engine), or ``template``: Jinja text or
        a built-in template's name (``slot_cpp.chat_templates()``). ``chat``:
        the fields of :class:`slot_cpp.options.ChatOptions`
        (``enable_thinking``, ``chat_template_kwargs``)."""
        return self._chat.apply(self._s, messages, add_generation_prompt, template,
                                opts.ChatOptions(**chat) if chat else None)

    def _chat_templates(self, source: Optional[str]) -> Any:
        """llama.cpp's chat templates (common/chat) of this model, or ``source``'s, parsed once."""
        return self._chat.parsed(self._s, source)

    def check_tokens(self, tokens: Any) -> list[int]:
        """Token ids as a list of ints inside this model's vocabulary (TypeError/ValueError otherwise)."""
        return opts.check_tokens(tokens, self.n_vocab)

    def prompt_tokens(self, prompt: Prompt, *, chat_template: Optional[str] = None,
                      system: Optional[str] = None) -> list[int]:
        """Token ids of a prompt: raw text, or chat messages formatted with the template."""
        return _prompts.prompt_text_and_tokens(self, prompt, chat_template, system)[1]

    def user_loss_mask(self, prompt: Prompt, *, chat_template: Optional[str] = None,
                       system: Optional[str] = None) -> tuple[list[int], list[bool]]:
        """Token ids of a chat prompt and SLOT's loss mask for ``loss_on="user"``:
        entry t is True when tokens t and t+1 both lie inside one user
        message's content. Template tokens are out, and so is each message's
        first content token: it is predicted from the template's turn header,
        the context the answer starts from, and learning it teaches the model
        to answer by repeating the user."""
        return _prompts.user_loss_mask(self, prompt, chat_template, system)

    def last_block_loss_mask(self, tokens: Sequence[int]) -> list[bool]:
        """SLOT's loss mask for ``loss_on="last"``: entry t is True when
        tokens t and t+1 both lie in the prompt's last block, the text after
        its last blank line (all of it when it has none). In a few-shot
        prompt that block is the question: learning the exemplars too pulls
        the answer towards their style (extra steps, their length) rather
        than towards the question."""
        return _prompts.last_block_loss_mask(self, tokens)

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
        extras: Optional[RequestExtras] = None,
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
        arguments; ``sampling=``, ``slot=`` and ``extras=`` take whole groups,
        which the keyword arguments then override.

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
        return _generation.generate_one(
            self, prompt, chat_template=chat_template, system=system, prompt_token_ids=prompt_token_ids,
            on_text=on_text, cancel=cancel, sampling=sampling, slot=slot, extras=extras, options=options)

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
        extras: Optional[RequestExtras] = None,
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

        The options are those of :meth:`generate_with_slot` (``sampling=``,
        ``slot=`` and ``extras=`` whole groups, for every prompt). Any keyword
        option may be given per prompt as a list of ``len(prompts)`` values
        (``stop`` as a list of lists, ``delta`` as a list of arrays or None
        or a 2-D array, ``response_prefix`` as a list of token lists).
        Prompts are text, chat messages, or lists of token ids. ``on_text``
        receives (result index, text piece). ``cancel`` is as in
        :meth:`generate_with_slot`.
        """
        return _generation.generate_batch(
            self, prompts, n, chat_template=chat_template, system=system, on_text=on_text, cancel=cancel,
            sampling=sampling, slot=slot, extras=extras, options=options)

    def generate(self, prompt: Prompt, **kwargs: Any) -> GenerationResult:
        """Plain generation (``steps=0``), or generation with a given ``delta``."""
        if "steps" in kwargs:
            raise TypeError("generate() takes no 'steps'; use generate_with_slot()")
        return self.generate_with_slot(prompt, steps=0, **kwargs)

    def stream(self, prompt: Prompt, **kwargs: Any) -> "TextStream":
        """Like generate_with_slot (``sampling=``, ``slot=``, ``extras=`` and
        the keyword options alike), but yields text pieces as they come."""
        if "on_text" in kwargs:
            raise TypeError("stream() takes no 'on_text'")
        return TextStream(self, prompt, kwargs)


def model_fingerprint(model: Model) -> dict[str, Any]:
    """What stored artefacts (datastores, reward heads, LoRA adapters) must
    match: the architecture, sizes, a hash of the vocabulary and of one
    column of the output head. Computed once per model."""
    if model._fingerprint is not None:
        return dict(model._fingerprint)
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
        column = s.logit_bias(opts.check_delta(e0, model.n_embd)).astype(np.float32)
        fp["head"] = hashlib.sha256(np.round(column, 4).tobytes()).hexdigest()[:16]
    except _core.UnsupportedModelError:
        fp["head"] = None
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]
    fp["digest"] = digest
    model._fingerprint = dict(fp)
    return fp


def generate_with_slot(model_path: Union[str, os.PathLike[str], None], prompt: Prompt,
                       **kwargs: Any) -> GenerationResult:
    """One-off: load the model, run SLOT generation, free the model."""
    # Model(...)'s settings (the seed included: the Model's default seed) go to the Model.
    model_keys = {name for name, _, _ in opts.specs(opts.ModelSettings)}
    model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in model_keys}
    with Model(model_path, **model_kwargs) as model:
        return model.generate_with_slot(prompt, **kwargs)


if Model.generate_with_slot.__doc__:
    Model.generate_with_slot.__doc__ += _generation.options_section()
