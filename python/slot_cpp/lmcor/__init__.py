"""LMCor: a small corrector model that reads a bigger model's candidates and
writes the final answer (Vernikos et al., arXiv 2305.13514).

1. A generator model, prompted for the task, makes a pool of ``k``
   candidates for an input x: its greedy answer and ``k - 1`` samples at a
   moderate temperature with seeds ``seed + 1 ... seed + k - 1``. All come
   from one prompt evaluation: the candidates' sequences share its KV cells.
   Another method may draw the samples: ``sampler`` (e.g.
   ``slot_cpp.qalign.QAlignSamples``, QAlign chains' last states), which the
   caller passes in; LMCor imports no other method.
2. A corrector, a much smaller model trained for the task, reads x and all
   candidates in one input and generates the final output: it may pick one,
   merge several, or rewrite. It never sees the generator's weights or
   logits, so the generator can be swapped.

The corrector's input (:class:`CorrectorFormat`, the default shown)::

    input: <x>
    candidate 1: <greedy candidate>
    candidate 2: <sample 1>
    ...
    candidate k: <sample k-1>
    output:

Candidates are stripped of surrounding whitespace; the corrector's answer
follows ``output:`` after a space and ends with the end-of-sequence token.
When x and the candidates do not fit the corrector's context (with room for
``max_tokens``), ``overflow="error"`` (the default) raises
:class:`CorrectorInputTooLong`; ``overflow="drop"`` drops whole candidates,
the last first, keeping at least candidate 1 (the greedy one), and reports
how many were dropped. A candidate is never cut in the middle.

Training: :func:`make_corrector_data` runs the generator over a task's
``{"input", "target"}`` rows and writes the candidates (resumable);
:func:`train_corrector` fine-tunes a LoRA adapter on a small GGUF model with
transformers and PEFT (the ``[lmcor]`` extra) and writes it as a GGUF LoRA
adapter that :class:`slot_cpp.Model` loads with ``lora=``. The adapter
records the base model's fingerprint and the corrector format it was
trained with; :class:`Corrector` reads that format back.
"""

from __future__ import annotations

# _import_sacrebleu is imported here too: the command line checks for
# sacrebleu through slot_cpp.lmcor before it loads any model.
from .candidates import CANDIDATE_SAMPLING, Candidates, Sampler, generate_candidates
from .corrector import ADAPTER_FORMAT_KEY, Correction, Corrector, CorrectorFormat, CorrectorInputTooLong
from .data import PathLike, make_corrector_data, read_rows
from .evaluation import EvalReport, PairedDiff, SystemScore, _import_sacrebleu, evaluate
from .train import DEFAULT_TARGET_MODULES, TrainReport, train_corrector

__all__ = [
    "ADAPTER_FORMAT_KEY",
    "CANDIDATE_SAMPLING",
    "Candidates",
    "Correction",
    "Corrector",
    "CorrectorFormat",
    "CorrectorInputTooLong",
    "EvalReport",
    "PairedDiff",
    "Sampler",
    "SystemScore",
    "TrainReport",
    "evaluate",
    "generate_candidates",
    "make_corrector_data",
    "read_rows",
    "train_corrector",
]
