"""The corrector: its input format (x and the candidates in one text) and
the corrector model that reads it and writes the final answer."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .._model import Model
from ..options import check_int as _check_int
from .candidates import generate_candidates

# The corrector format an adapter was trained with (JSON), in its GGUF metadata.
ADAPTER_FORMAT_KEY = "slot_cpp.lmcor.format"


class CorrectorInputTooLong(ValueError):
    """x and the candidates do not fit the corrector's context."""


@dataclass(frozen=True)
class CorrectorFormat:
    """How x and the candidates are laid out for the corrector (see :mod:`slot_cpp.lmcor`)."""

    input_prefix: str = "input: "
    candidate_prefix: str = "candidate {i}: "
    output_prefix: str = "output:"
    separator: str = "\n"

    def __post_init__(self) -> None:
        for name in ("input_prefix", "candidate_prefix", "output_prefix", "separator"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"CorrectorFormat.{name} must be a str")
        if "{i}" not in self.candidate_prefix:
            raise ValueError("CorrectorFormat.candidate_prefix must contain '{i}' (the candidate's number)")
        if not self.output_prefix:
            raise ValueError("CorrectorFormat.output_prefix must not be empty")

    def render(self, x: str, candidates: Sequence[str]) -> str:
        """The corrector's input text for x and these candidates."""
        if not isinstance(x, str):
            raise TypeError(f"the input must be a str, got {type(x).__name__}")
        if len(candidates) == 0:
            raise ValueError("at least one candidate is needed")
        parts = [self.input_prefix + x.strip()]
        for i, c in enumerate(candidates, start=1):
            if not isinstance(c, str):
                raise TypeError(f"candidate {i} must be a str, got {type(c).__name__}")
            parts.append(self.candidate_prefix.replace("{i}", str(i)) + c.strip())
        parts.append(self.output_prefix)
        return self.separator.join(parts)

    @staticmethod
    def target_text(target: str) -> str:
        """What the corrector is trained to write after the output prefix."""
        return " " + target.strip()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CorrectorFormat":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a corrector format must be a JSON object")
        return cls(**data)


@dataclass
class Correction:
    """The corrector's answer for one input, with what it read."""

    text: str
    candidates: list[str]
    corrector_input: str
    dropped: int                    # candidates dropped to fit the context (overflow="drop")
    generator_tokens: int
    corrector_tokens: int
    generator_seconds: float
    corrector_seconds: float
    finish_reason: str = "eos"       # the corrector's: "eos", "length" (max_tokens) or "stop"


class Corrector:
    """A corrector model (any GGUF the engine loads, with or without a LoRA adapter).

    ``format`` defaults to the one recorded in the model's LoRA adapter by
    :func:`train_corrector`, else :class:`CorrectorFormat`'s default.
    The corrector decodes greedily up to ``max_tokens`` or the end of
    sequence (and ``stop`` strings, if given).
    """

    def __init__(self, model: Model, *, format: Optional[CorrectorFormat] = None, max_tokens: int = 128,
                 stop: Sequence[str] = (), overflow: str = "error") -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a slot_cpp.Model, got {type(model).__name__}")
        if overflow not in ("error", "drop"):
            raise ValueError(f"overflow must be 'error' or 'drop', got {overflow!r}")
        self.model = model
        self.format = format if format is not None else _adapter_format(model) or CorrectorFormat()
        self.max_tokens = _check_int("max_tokens", max_tokens, 1)
        self.stop = list(stop)
        self.overflow = overflow

    # ---- the corrector's input --------------------------------------------
    def input_tokens(self, x: str, candidates: Sequence[str]) -> tuple[list[int], str, int]:
        """The corrector's input tokens and text for x and the candidates, after
        the overflow policy, and how many candidates were dropped."""
        budget = self.model.n_ctx - self.max_tokens
        cands = list(candidates)
        while True:
            text = self.format.render(x, cands)
            tokens = self.model.tokenize(text)
            if len(tokens) <= budget:
                return tokens, text, len(candidates) - len(cands)
            if self.overflow == "error" or len(cands) == 1:
                raise CorrectorInputTooLong(
                    f"the corrector input has {len(tokens)} tokens with {len(cands)} candidate(s), but the "
                    f"corrector's context holds {self.model.n_ctx} with {self.max_tokens} kept for the answer"
                    + ("" if self.overflow == "error" else " (even with candidate 1 alone)")
                    + "; use fewer or shorter candidates, a larger n_ctx, or overflow='drop'")
            cands.pop()

    # ---- correcting ----------------------------------------------------------
    def rewrite(self, x: str, candidates: Sequence[str]) -> Correction:
        """The corrector's answer for given candidates."""
        return self.rewrite_batch([x], [candidates])[0]

    def rewrite_batch(self, inputs: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[Correction]:
        if len(inputs) != len(candidates):
            raise ValueError(f"{len(inputs)} inputs but {len(candidates)} candidate lists")
        if len(inputs) == 0:
            return []
        built = [self.input_tokens(x, c) for x, c in zip(inputs, candidates)]
        t0 = time.perf_counter()
        results = self.model.generate_batch([b[0] for b in built], temperature=0.0, max_tokens=self.max_tokens,
                                            stop=self.stop)
        seconds = (time.perf_counter() - t0) / len(inputs)
        return [Correction(text=r.text.strip(), candidates=[c.strip() for c in cands], corrector_input=b[1],
                           dropped=b[2], generator_tokens=0, corrector_tokens=len(r.tokens), generator_seconds=0.0,
                           corrector_seconds=seconds, finish_reason=r.finish_reason)
                for r, b, cands in zip(results, built, candidates)]

    def correct(self, generator: Model, x: str, **options: Any) -> Correction:
        """Candidates from the generator (see :func:`generate_candidates` for
        the options: prompt, k, temperature, seed, ...), then the corrector's answer."""
        return self.correct_batch(generator, [x], **options)[0]

    def correct_batch(self, generator: Model, inputs: Sequence[str], **options: Any) -> list[Correction]:
        pools = generate_candidates(generator, inputs, **options)
        out = self.rewrite_batch(list(inputs), [p.texts for p in pools])
        for c, p in zip(out, pools):
            c.generator_tokens = p.generated_tokens
            c.generator_seconds = p.seconds
        return out


def _adapter_format(model: Model) -> Optional[CorrectorFormat]:
    for text in model.adapter_metadata(ADAPTER_FORMAT_KEY):
        if text:
            return CorrectorFormat.from_json(text)
    return None
