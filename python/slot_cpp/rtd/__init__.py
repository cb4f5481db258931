"""RTD, Reference Trustable Decoding (arXiv 2409.20181): a datastore of the
model's final normed hidden states and what followed them, blended into the
next-token distribution.

A datastore holds (key, value) pairs: key = the final hidden state after the
final norm at a position (the vector SLOT shifts), value = the token that
came next (generation) or the answer's label token (multiple choice). At a
decode step the current hidden state h queries it:

* the K nearest keys by squared L2 distance d_i;
* weights w = softmax(-d / T) over them (shifted by the smallest distance,
  so large d / T cannot underflow every weight);
* the reference distribution r(v) = sum of w_i over neighbours with value v;
* p = lam * r + (1 - lam) * p_LM. lam = 0 is the plain model, exactly.

With the gate (a datastore's default once built or tuned), lam is scaled
per query: lam(q) = lam * sigmoid(bias + distance * nearest(q) / scale +
top_mass * max_v r(v)), nearest(q) the distance to the nearest key and scale
the datastore's typical distance from a key to its nearest other key; where
the datastore does not reach, the gate closes and p is the model's.

With ``heads=H`` the keys and h are split into H equal slices, each searched
on its own with softmax(-H * d / T), and the H distributions averaged.

The blend runs natively in the batched token loop (a logit stage after
SLOT's bias and before the sampler): ``model.generate(..., rtd=store)``. The
query is always the model's own h, also when SLOT is on: the keys were taken
from the unshifted model, so h is what they can be compared with; SLOT acts
through p_LM.

Search is exact (a matrix product over every key on the model's ggml
backend, then a top-K), or, after :meth:`Datastore.build_ivf`, an inverted
file: the keys are grouped by their nearest of ``nlist`` centroids (k-means
by faiss, the ``[ann]`` extra) and only the ``nprobe`` nearest lists are
searched.

A datastore file holds the keys (float16), the values, the build parameters
and the model's fingerprint; it is memory-mapped when loaded, and loading it
with another model raises :class:`DatastoreMismatchError`.
"""

from __future__ import annotations

# The names outside __all__ (constants, _label_tokens, _reference_mass, as_rtd)
# are imported here too: callers and tests reach them as slot_cpp.rtd.<name>.
from .choices import ChoiceScores, score_choices
from .errors import DatastoreError, DatastoreMismatchError
from .fileformat import FORMAT_VERSION, MAGIC
from .prompts import CHOICE_LABELS, DEFAULT_CHOICE_TEMPLATE, _label_tokens, answer_index, format_choice_prompt
from .request import DEFAULT_GATE, GATE_FEATURES, RTD
from .store import Datastore, RtdOption, as_rtd
from .tuning import TuneResult, _reference_mass, gate_lambda, generation_nll, tune

__all__ = [
    "CHOICE_LABELS",
    "DEFAULT_GATE",
    "GATE_FEATURES",
    "ChoiceScores",
    "Datastore",
    "DatastoreError",
    "DatastoreMismatchError",
    "RTD",
    "TuneResult",
    "answer_index",
    "format_choice_prompt",
    "gate_lambda",
    "generation_nll",
    "score_choices",
    "tune",
]
