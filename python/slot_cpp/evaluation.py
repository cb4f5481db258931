"""Evaluation harness: SLOT settings and test-time methods on GSM8K, multiple
choice with SLOT and RTD, LMCor's scores; what SLOT's delta does to a prompt.

GSM8K records are appended to a JSONL file a problem at a time, so that an
interrupted run resumes where it stopped; every setting is paired against
the first (accuracy: Wilson interval, fixed, broken, exact McNemar p; NLL:
the paired difference with its t interval). Multiple choice pairs every
setting against the plain model. The functions take plain values and return
results (the tables as Markdown text); ``slot-cpp eval`` and ``slot-cpp
explain`` parse their flags, call these and print.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TextIO, TypeVar, Union

import numpy as np

from . import gsm8k, probes
from ._files import open_append, record_line, sync
from ._model import DEFAULT_KL_BUDGET, Model, Prompt
from ._progress import Progress
from .rtd import DEFAULT_GATE, RTD, ChoiceScores, answer_index, score_choices

__all__ = [
    "METHODS", "GSM8KOptions", "gsm8k_prompt", "setting_name", "method_name", "done_records", "pending",
    "resume_note", "evaluate_settings", "nll_record", "generate_records", "evaluate_methods",
    "method_record", "summarise_file", "summary_table", "ChoiceEval", "choice_prompt_format", "evaluate_choices",
    "choice_summary", "choice_records", "choice_table", "rtd_description", "lmcor_summary", "lmcor_table",
    "token_shifts", "plot_explain",
]

Lr = Union[float, str]
Setting = tuple[int, Lr]  # SLOT's (steps, lr); steps 0: the plain model
METHODS = ("greedy", "mv", "bon", "wmv", "qalign")
T = TypeVar("T")


# ---- GSM8K: prompts, setting names, resuming -------------------------------------
@dataclass(frozen=True)
class GSM8KOptions:
    """How :func:`evaluate_settings` puts and scores the problems."""

    metric: str = "accuracy"          # accuracy: generate, check the final number; nll: of the reference solution
    format: str = "fewshot"           # one of gsm8k.FORMATS
    chat_template: Optional[str] = None
    stop: Sequence[str] = ()          # besides the format's own stop strings
    loss_on: str = "all"              # SLOT's loss: "all" prompt tokens, the "user" message content, the "last" block
    kl_budget: float = DEFAULT_KL_BUDGET
    rtd_path: Optional[str] = None    # the RTD datastore blended in: marked in names ('+rtd') and records
    sampling: Mapping[str, Any] = field(default_factory=dict)  # max_tokens, temperature, top_k, ..., seed
    slot: Mapping[str, Any] = field(default_factory=dict)  # SLOT's other options: loss_window, beta1, ...

    def setting_name(self, steps: int, lr: Lr) -> str:
        window = self.slot.get("loss_window")
        return (setting_name(steps, lr, loss_on=self.loss_on, kl_budget=self.kl_budget, rtd=bool(self.rtd_path))
                + (f",window={window}" if window is not None and steps else ""))


def gsm8k_prompt(question: str, format: str) -> tuple[Prompt, list[str]]:
    """The prompt of a question in a format of gsm8k.FORMATS, and its stop strings."""
    if format == "chat":
        return gsm8k.chat_messages(question), gsm8k.CHAT_STOP
    return gsm8k.fewshot_prompt(question), gsm8k.FEWSHOT_STOP


def setting_name(steps: int, lr: Lr, *, loss_on: str = "all", kl_budget: float = DEFAULT_KL_BUDGET,
                 rtd: bool = False) -> str:
    """The setting's name in records; '+user' or '+last', a KL budget other
    than the default and '+rtd' are marked, so that resuming a file never
    mixes records of different settings."""
    return (gsm8k.setting_name(steps, lr) + (f"+{loss_on}" if loss_on != "all" and steps else "")
            + (f",kl={kl_budget:g}" if lr == "auto" and steps and kl_budget != DEFAULT_KL_BUDGET else "")
            + ("+rtd" if rtd else ""))


def method_name(method: str, budget: int, *, rtd: bool = False) -> str:
    return (f"{method}@{budget}" if method != "greedy" else "greedy") + ("+rtd" if rtd else "")


def done_records(path: Path, metric: str) -> set[tuple[int, str]]:
    """(problem index, setting) of the records already written: they are not redone."""
    done = set()
    for r in gsm8k.read_records(path):
        if r.get("metric") != metric:
            continue
        if not isinstance(r.get("index"), int) or not isinstance(r.get("setting"), str):
            raise ValueError(f"{path}: a {metric} record without an integer index and a setting name: {r}")
        done.add((r["index"], r["setting"]))
    return done


def pending(problems: Sequence[gsm8k.Problem], variants: Sequence[tuple[T, str]],
            done: set[tuple[int, str]]) -> list[tuple[gsm8k.Problem, T, str]]:
    """(problem, variant, name) for every problem and named variant (a
    setting or a method) without a record in ``done``."""
    return [(p, v, name) for p in problems for v, name in variants if (p.index, name) not in done]


def resume_note(done: set[tuple[int, str]], todo: Sequence[Any], path: Path) -> Optional[str]:
    return f"resuming: {len(done)} records already in {path}, {len(todo)} to go" if done else None


def _append(out: TextIO, record: dict) -> None:
    out.write(record_line(record))  # checked by gsm8k.read_records


# ---- GSM8K: SLOT settings ------------------------------------------------------
def evaluate_settings(model: Model, todo: Sequence[tuple[gsm8k.Problem, Setting, str]], out_path: Path,
                      options: GSM8KOptions, *, rtd: Optional[RTD] = None, parallel: int = 1,
                      progress: bool = True) -> None:
    """Appends a record per (problem, setting, name) of ``todo`` (see
    :func:`pending`) to ``out_path``; the accuracy metric decodes ``parallel``
    problems together, flushed a batch at a time."""
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    chunk = parallel if options.metric == "accuracy" else 1  # the NLL metric generates nothing
    bar = Progress(len(todo), f"gsm8k {options.metric}", progress, plain=True)
    with open_append(out_path) as out:  # a record cut off by an interruption is dropped and redone
        for start in range(0, len(todo), chunk):
            items = todo[start:start + chunk]
            if options.metric == "accuracy":
                records = generate_records(model, items, options, rtd)
            else:
                records = [nll_record(model, problem, setting, options) for problem, setting, _ in items]
            for record in records:
                _append(out, record)
                bar.update(1, f"{record['setting']}: " + (
                    ("right" if record["correct"] else "wrong") if options.metric == "accuracy"
                    else f"nll {record['nll']:.3f}"))
            sync(out)
    bar.close()


def _record_base(problem: gsm8k.Problem, setting: Setting, options: GSM8KOptions) -> dict:
    steps, lr = setting
    base = {"metric": options.metric, "index": problem.index, "setting": options.setting_name(steps, lr),
            "steps": steps, "lr": lr, "format": options.format, "loss_on": options.loss_on}
    if options.rtd_path:
        base["rtd"] = options.rtd_path
    return base


def nll_record(model: Model, problem: gsm8k.Problem, setting: Setting, options: GSM8KOptions) -> dict:
    """Teacher-forced NLL per token of the reference solution, under the delta
    SLOT learns on the prompt alone."""
    steps, lr = setting
    prompt, _ = gsm8k_prompt(problem.question, options.format)
    start = time.monotonic()
    prompt_ids = model.prompt_tokens(prompt, chat_template=options.chat_template)
    solution_ids = model.tokenize(" " + problem.answer, add_special=False, parse_special=False)
    if options.loss_on == "user":
        slot = model.generate_with_slot(prompt, chat_template=options.chat_template, steps=steps, lr=lr,
                                        max_tokens=0, loss_on=options.loss_on, kl_budget=options.kl_budget,
                                        **options.slot)
    else:
        slot = model.generate_with_slot("", prompt_token_ids=prompt_ids, steps=steps, lr=lr, max_tokens=0,
                                        loss_on=options.loss_on, kl_budget=options.kl_budget, **options.slot)
    logp = probes.token_logprobs(model, prompt_ids + solution_ids, len(prompt_ids), slot.delta if steps else None)
    return {**_record_base(problem, setting, options), "nll": float(-logp.mean()),
            "solution_tokens": len(solution_ids), "losses": slot.losses, "seconds": time.monotonic() - start,
            "chosen_lr": slot.lr, "optimise_seconds": slot.timings.optimise,
            "calibration": [[c_lr, c_kl] for c_lr, c_kl in slot.calibration],
            "calibration_seconds": slot.calibration_seconds}


def generate_records(model: Model, items: Sequence[tuple[gsm8k.Problem, Setting, str]], options: GSM8KOptions,
                     rtd: Optional[RTD] = None) -> list[dict]:
    """Generates the answers of several (problem, setting, name) items in one batch."""
    prompts, stops = [], []
    for problem, _, _ in items:
        prompt, stop = gsm8k_prompt(problem.question, options.format)
        prompts.append(prompt)
        stops.append(stop + list(options.stop))
    start = time.monotonic()
    results = model.generate_batch(prompts, steps=[s for _, (s, _), _ in items], lr=[lr for _, (_, lr), _ in items],
                                   stop=stops, chat_template=options.chat_template, rtd=rtd, loss_on=options.loss_on,
                                   kl_budget=options.kl_budget, **options.sampling, **options.slot)
    seconds = (time.monotonic() - start) / len(items)
    records = []
    for (problem, setting, _), result in zip(items, results):
        prediction = gsm8k.extract_answer(result.text)
        records.append({
            **_record_base(problem, setting, options), "question": problem.question, "reference": problem.reference,
            "completion": result.text, "prediction": prediction,
            "correct": gsm8k.is_correct(prediction, problem.reference), "losses": result.losses,
            "generated_tokens": result.generated_tokens, "seconds": seconds})
    return records


# ---- GSM8K: test-time methods at one budget ---------------------------------------
def evaluate_methods(model: Model, todo: Sequence[tuple[gsm8k.Problem, str, str]], out_path: Path, *, budget: int,
                     max_tokens: int, seed: int = 0, format: str = "fewshot", stop: Sequence[str] = (),
                     chat_template: Optional[str] = None, reward: Any = None, beta: float = 1.0,
                     rtd: Optional[RTD] = None, rtd_path: Optional[str] = None, progress: bool = True) -> None:
    """Appends a record per (problem, method, name) of ``todo`` (methods of
    METHODS, named by :func:`method_name`) to ``out_path``, each method
    generating ``budget`` tokens per problem (greedy: one answer);
    bon, wmv and qalign need ``reward``."""
    bar = Progress(len(todo), "gsm8k methods", progress, plain=True)
    with open_append(out_path) as out:  # a record cut off by an interruption is dropped and redone
        for problem, method, name in todo:
            record = method_record(model, problem, method, name, budget=budget, max_tokens=max_tokens, seed=seed,
                                   format=format, stop=stop, chat_template=chat_template, reward=reward, beta=beta,
                                   rtd=rtd, rtd_path=rtd_path)
            _append(out, record)
            sync(out)
            bar.update(1, f"{name}: {'right' if record['correct'] else 'wrong'}")
    bar.close()


def method_record(model: Model, problem: gsm8k.Problem, method: str, name: str, *, budget: int, max_tokens: int,
                  seed: int = 0, format: str = "fewshot", stop: Sequence[str] = (),
                  chat_template: Optional[str] = None, reward: Any = None, beta: float = 1.0,
                  rtd: Optional[RTD] = None, rtd_path: Optional[str] = None) -> dict:
    prompt, format_stop = gsm8k_prompt(problem.question, format)
    start = time.monotonic()
    common: dict[str, Any] = dict(max_tokens=max_tokens, seed=seed + problem.index, stop=format_stop + list(stop),
                                  chat_template=chat_template, rtd=rtd)
    prediction, tokens, text = _solve(model, prompt, method, budget=budget, reward=reward, beta=beta, **common)
    record = {"metric": "accuracy", "index": problem.index, "setting": name, "method": method, "budget": budget,
              "question": problem.question, "reference": problem.reference, "completion": text,
              "prediction": prediction, "correct": gsm8k.is_correct(prediction, problem.reference), "losses": [],
              "generated_tokens": tokens, "seconds": time.monotonic() - start}
    if rtd_path:
        record["rtd"] = rtd_path
    return record


def _solve(model: Model, prompt: Prompt, method: str, *, budget: int, reward: Any, beta: float,
           **common: Any) -> tuple[Optional[str], int, str]:
    """One method's (answer, generated tokens, a completion shown in the record)."""
    from . import qalign as qa

    if method == "greedy":
        r = model.generate(prompt, **common)
        return gsm8k.extract_answer(r.text), r.generated_tokens, r.text
    if reward is None and method in ("bon", "wmv", "qalign"):
        raise ValueError(f"{method} needs a reward")
    if method == "qalign":
        q = qa.qalign(model, prompt, reward=reward, beta=beta, steps=10**6, budget=budget,
                      extract=gsm8k.extract_answer, **common)
        return q.answer, q.generated_tokens, q.answer_state.text if q.answer_state is not None else ""
    fn = {"mv": qa.majority_vote, "bon": qa.best_of_n, "wmv": qa.weighted_majority_vote}[method]
    # samples until they reach the budget
    kwargs: dict[str, Any] = dict(budget=budget, extract=gsm8k.extract_answer, **common)
    if method != "mv":
        kwargs["reward"] = reward
    b = fn(model, prompt, **kwargs)
    return b.answer, b.generated_tokens, b.samples[0].text


# ---- GSM8K: summary ----------------------------------------------------------
def summarise_file(path: Path, problems: Sequence[gsm8k.Problem], names: Sequence[str], metric: str) -> list[dict]:
    """The records of ``path`` on these problems, a row per setting of
    ``names``, each paired against the first (see gsm8k.summarise)."""
    records = [r for r in gsm8k.read_records(Path(path)) if r.get("metric") == metric]
    indices = {p.index for p in problems}
    return gsm8k.summarise([r for r in records if r["index"] in indices], names, metric)


def summary_table(rows: Sequence[dict], metric: str, path: Union[str, Path]) -> str:
    """The rows of :func:`summarise_file` as a Markdown table, under a heading."""
    lines = [f"\nGSM8K {metric} ({path}):"]
    if metric == "accuracy":
        lines += ["| setting | n | accuracy | 95% CI | fixed | broken | McNemar p |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in rows:
            lo, hi = r["ci95"]
            extra = (f"{r['fixed']} | {r['broken']} | {r['p_value']:.3f}" if "fixed" in r else "- | - | -")
            lines.append(f"| {r['setting']} | {r['n']} | {100 * r['accuracy']:.1f}% | "
                         f"{100 * lo:.1f}-{100 * hi:.1f}% | {extra} |")
    else:
        lines += ["| setting | n | NLL/token | vs first setting (95% CI) | better | worse |",
                  "| --- | ---: | ---: | --- | ---: | ---: |"]
        for r in rows:
            extra = (f"{r['delta_nll']:+.4f} ± {r['delta_ci95']:.4f} | {r['better']} | {r['worse']}"
                     if "delta_nll" in r else "- | - | -")
            lines.append(f"| {r['setting']} | {r['n']} | {r['nll']:.4f} | {extra} |")
    return "\n".join(lines)


# ---- multiple choice -----------------------------------------------------------
@dataclass
class ChoiceEval:
    """Multiple-choice scores of every setting on the same questions."""

    settings: list[Setting]             # the first is the plain model
    names: list[str]
    answers: list[int]                  # the right choice of each question
    scores: list[list[ChoiceScores]]    # per setting, per question
    table: list[dict[str, Any]] = field(default_factory=list)  # per setting (and +rtd), paired against plain


def choice_prompt_format(rtd: Optional[RTD],
                         shots: Sequence[Mapping[str, Any]]) -> tuple[int, Optional[str], Optional[int]]:
    """(the prompt's solved examples, the template to score with, the number
    of the datastore's stored shots that ``shots`` replace, or None). A choice
    datastore keeps the prompt format its keys were taken with; without
    ``shots`` it is used as it is, with them its template is kept."""
    prompt_shots, template, replaced = len(shots), None, None
    if rtd is not None and rtd.datastore.mode == "choice":
        stored = list(rtd.datastore.params.get("shots", ()))
        if not shots:
            prompt_shots = len(stored)  # score_choices takes the datastore's own prompt format
        else:
            template = rtd.datastore.params.get("template")  # its template, with these shots
        if shots and stored != list(shots):
            replaced = len(stored)
    return prompt_shots, template, replaced


def evaluate_choices(model: Model, questions: Sequence[Mapping[str, Any]], settings: Sequence[Setting], *,
                     shots: Sequence[Mapping[str, Any]] = (), template: Optional[str] = None,
                     rtd: Optional[RTD] = None, batch_size: int = 32, kl_budget: float = DEFAULT_KL_BUDGET,
                     progress: bool = True) -> ChoiceEval:
    """``{"question", "choices", "answer"}`` questions scored under every
    (steps, lr) setting (the first the plain model: steps 0), with and, given
    ``rtd``, without the blend; :attr:`ChoiceEval.table` pairs each against plain."""
    answers = [answer_index(q) for q in questions]
    names = ["plain"] + [gsm8k.setting_name(steps, lr) for steps, lr in settings[1:]]
    n = len(questions)
    bar = Progress(n * len(settings), "mc", progress, plain=True)
    scores: list[list[ChoiceScores]] = []
    for (steps, lr), name in zip(settings, names):
        got: list[ChoiceScores] = []
        for start in range(0, n, batch_size):
            chunk = questions[start:start + batch_size]
            got.extend(score_choices(model, chunk, rtd=rtd, shots=shots, template=template, steps=steps, lr=lr,
                                     kl_budget=kl_budget))
            right = sum(sc.plain_choice == answers[i] for i, sc in enumerate(got))
            bar.update(len(chunk), f"{name} {right / len(got):.3f}")
        scores.append(got)
    bar.close()
    result = ChoiceEval(list(settings), names, answers, scores)
    result.table = _choice_table_rows(result, with_rtd=rtd is not None)
    return result


def _choice_table_rows(result: ChoiceEval, *, with_rtd: bool) -> list[dict[str, Any]]:
    """One row per setting, and per setting with RTD; each paired against plain."""
    n = len(result.answers)
    plain_ok = [sc.plain_choice == a for sc, a in zip(result.scores[0], result.answers)]
    table: list[dict[str, Any]] = []
    for (steps, lr), setting, got in zip(result.settings, result.names, result.scores):
        variants = [("", [sc.plain_choice == a for sc, a in zip(got, result.answers)])]
        if with_rtd:
            variants.append(("+rtd", [sc.rtd_choice == a for sc, a in zip(got, result.answers)]))
        for suffix, ok in variants:
            name = setting + suffix
            fixed = sum(o and not p for p, o in zip(plain_ok, ok))
            broken = sum(p and not o for p, o in zip(plain_ok, ok))
            lo, hi = gsm8k.wilson_interval(sum(ok), n)
            row: dict[str, Any] = {"setting": name, "steps": steps, "lr": lr, "rtd": bool(suffix),
                                   "correct": sum(ok), "accuracy": sum(ok) / n, "ci95": [lo, hi]}
            if name != "plain":
                row.update({"fixed": fixed, "broken": broken, "mcnemar_p": gsm8k.mcnemar_p(fixed, broken)})
            if steps > 0 and lr == "auto":
                # The trust region's step sizes are continuous: their spread, not a count per value.
                chosen = np.array([sc.lr for sc in got])
                row["lr_chosen"] = {"median": float(np.median(chosen)), "min": float(chosen.min()),
                                    "max": float(chosen.max())}
            table.append(row)
    return table


def rtd_description(option: RTD) -> dict[str, Any]:
    """The datastore and the settings an RTD option resolves to."""
    r = option.resolved()
    return {"datastore": str(r.datastore.path) if r.datastore.path else None, "mode": r.datastore.mode,
            "keys": len(r.datastore), "k": r.k, "temperature": r.temperature, "lam": r.lam, "nprobe": r.nprobe,
            "gate": r.datastore.defaults.get("gate") or DEFAULT_GATE if r.gate else None}


def choice_summary(result: ChoiceEval, *, data: str, shots: int, rtd: Optional[RTD] = None) -> dict[str, Any]:
    """The summary (what ``slot-cpp eval mc --json`` prints): the table, and
    plain's (and with ``rtd``, the blend's) accuracy up front."""
    table = result.table
    summary: dict[str, Any] = {"data": data, "n": len(result.answers), "shots": shots, "settings": table}
    base = table[0]
    summary.update({"plain_correct": base["correct"], "plain_accuracy": base["accuracy"],
                    "plain_ci95": base["ci95"]})
    if rtd is not None:
        with_rtd = table[1]
        summary.update({"rtd_correct": with_rtd["correct"], "rtd_accuracy": with_rtd["accuracy"],
                        "rtd_ci95": with_rtd["ci95"], "fixed": with_rtd["fixed"], "broken": with_rtd["broken"],
                        "mcnemar_p": with_rtd["mcnemar_p"], "rtd": rtd_description(rtd)})
    return summary


def choice_records(result: ChoiceEval, questions: Sequence[Mapping[str, Any]], *, first: int = 0,
                   lines: Optional[Sequence[int]] = None) -> Iterator[dict[str, Any]]:
    """A record per question (probabilities, choices, correctness under each
    setting); ``first``: the index of the first question in its file, whose
    line numbers are ``lines``."""
    plain_ok = [sc.plain_choice == a for sc, a in zip(result.scores[0], result.answers)]
    for i, (q, a) in enumerate(zip(questions, result.answers)):
        sc = result.scores[0][i]
        record: dict[str, Any] = {
            "index": first + i, "line": lines[first + i] if lines is not None else None, "question": q["question"],
            "choices": q["choices"], "answer": a, "plain_probs": [float(x) for x in sc.plain],
            "plain_choice": sc.plain_choice, "plain_correct": plain_ok[i]}
        if sc.rtd is not None:
            record.update({"rtd_probs": [float(x) for x in sc.rtd], "rtd_choice": sc.rtd_choice,
                           "rtd_correct": sc.rtd_choice == a})
        for setting, got in zip(result.names[1:], result.scores[1:]):
            g = got[i]
            entry: dict[str, Any] = {"probs": [float(x) for x in g.plain], "choice": g.plain_choice,
                                     "correct": g.plain_choice == a, "lr": g.lr}
            if g.rtd is not None:
                entry.update({"rtd_probs": [float(x) for x in g.rtd], "rtd_choice": g.rtd_choice})
            record.setdefault("slot", {})[setting] = entry
        yield record


def choice_table(summary: Mapping[str, Any]) -> str:
    """A :func:`choice_summary` as a Markdown table under a heading, with the
    step sizes lr=auto chose."""
    n = summary["n"]
    lines = [f"\nMultiple choice ({summary['data']}, {summary['shots']} shot(s)):",
             "| setting | n | accuracy | 95% CI | fixed | broken | McNemar p |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in summary["settings"]:
        name = row["setting"]
        if row["rtd"] and "rtd" in summary:
            d = summary["rtd"]
            name += f" (k={d['k']} T={d['temperature']:.4g} lambda={d['lam']:g})"
        lo, hi = row["ci95"]
        paired = (f"{row['fixed']} | {row['broken']} | {row['mcnemar_p']:.3f}" if "fixed" in row else "- | - | -")
        lines.append(f"| {name} | {n} | {100 * row['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | {paired} |")
    for row in summary["settings"]:
        if row.get("lr_chosen") and not row["rtd"]:
            c = row["lr_chosen"]
            lines.append(f"{row['setting']}: step sizes chosen: median {c['median']:.4g} "
                         f"(range {c['min']:.4g}-{c['max']:.4g})")
    return "\n".join(lines)


# ---- LMCor ---------------------------------------------------------------------
def lmcor_summary(report: Any) -> dict[str, Any]:
    """An lmcor.EvalReport as a dict, without its per-row records."""
    d = dataclasses.asdict(report)
    d.pop("records")
    return d


def lmcor_table(report: Any) -> str:
    """An lmcor.EvalReport as a Markdown table and LMCor's paired differences."""
    lines = [f"{report.rows} rows, k={report.k}", "| system | exact match | chrF | BLEU | sentence chrF |",
             "| --- | --- | ---: | ---: | --- |"]
    for sc in report.systems:
        lines.append(f"| {sc.name} | {100 * sc.exact_match:.1f}% ± {100 * sc.exact_match_ci:.1f} | {sc.chrf:.1f} | "
                     f"{sc.bleu:.1f} | {sc.sentence_chrf:.1f} ± {sc.sentence_chrf_ci:.1f} |")
    for p in report.paired:
        lines.append(f"LMCor - {p.versus}: exact match {100 * p.exact_match:+.1f} pt ± {100 * p.exact_match_ci:.1f}, "
                     f"sentence chrF {p.sentence_chrf:+.2f} ± {p.sentence_chrf_ci:.2f} (better {p.better}, "
                     f"worse {p.worse})")
    lines.append(f"per row: generator {report.generator_seconds:.2f} s, corrector {report.corrector_seconds:.2f} s")
    return "\n".join(lines)


# ---- SLOT's delta explained ----------------------------------------------------
def token_shifts(model: Model, delta: np.ndarray, top: int = 15) -> tuple[list[dict], list[dict]]:
    """The ``top`` tokens whose logits delta raises most and lowers most:
    ``{"token", "piece", "logit_change"}`` (the change is W*delta)."""
    bias = probes.logit_bias(model, delta)
    order = np.argsort(bias)

    def entry(t: int) -> dict[str, Any]:
        return {"token": t, "piece": model.token_piece(t).decode("utf-8", "replace"),
                "logit_change": float(bias[t])}

    return [entry(int(i)) for i in order[::-1][:top]], [entry(int(i)) for i in order[:top]]


def plot_explain(report: Mapping[str, Any], path: Union[str, Path]) -> None:
    """A PNG of what ``slot-cpp explain --json`` reports: with a calibration
    (lr auto), its KL ladder; with losses, the loss per step and the token
    shifts. Needs matplotlib (ImportError without)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'slot_cpp[plot]'") from exc
    calibration = report.get("calibration") or []
    panels = (1 if calibration else 0) + (2 if "losses" in report else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = list(axes[0])
    if calibration:
        _plot_calibration(ax.pop(0), calibration, report["kl_budget"], report["lr"])
    if "losses" in report:
        _plot_losses_and_shifts(ax[0], ax[1], report)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_calibration(cal: Any, calibration: Sequence[Mapping[str, float]], kl_budget: float, lr: float) -> None:
    """lr="auto": the KL ladder of the reference delta, the budget and the step size read off it."""
    shown = [(c["lr"], c["kl"]) for c in calibration if c["kl"] > 0]
    cal.loglog([x for x, _ in shown], [kl for _, kl in shown], marker="o", label="reference delta, scaled")
    cal.axhline(kl_budget, color="tab:grey", linestyle="--", label="KL budget")
    if lr > 0:
        cal.axvline(lr, color="tab:red", label=f"chosen lr {lr:.3g}")
    cal.set_xlabel("step size")
    cal.set_ylabel("mean KL(p0 || p_delta) over the prompt (nats)")
    cal.set_title("lr=auto: trust region")
    cal.legend()


def _plot_losses_and_shifts(ax1: Any, ax2: Any, report: Mapping[str, Any]) -> None:
    ax1.plot(range(1, len(report["losses"]) + 1), report["losses"], marker="o")
    ax1.set_xlabel("step")
    ax1.set_ylabel("prompt loss (nats/token)")
    ax1.set_title("SLOT loss per step")
    items = report["raised"][::-1] + report["lowered"][::-1]
    ax2.barh([repr(r["piece"]) for r in items], [r["logit_change"] for r in items],
             color=["tab:green"] * len(report["raised"]) + ["tab:red"] * len(report["lowered"]))
    ax2.set_xlabel("logit change (W*delta)")
    ax2.set_title("tokens delta raises and lowers most")
