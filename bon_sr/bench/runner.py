"""The Best-of-N benchmark runner: sample once, cache, evaluate every n from the cache.

Protocol. For each problem, N = max(--n) candidates are sampled once (temperature 0.7,
top-p 0.9 by default, a per-problem seed derived from the run seed and the problem id),
plus one greedy decode. Every candidate is scored by the frozen model: with vLLM inside the
sampling pass itself (the hook, ``--scorer hook``: both token sets, log-prob and
self-certainty from the same rows), else in one teacher-forced transformers pass
(``bench.scores``); its answer is extracted and checked, and answers grouped into
equivalence classes for voting. The problem's record is appended to
``DIR/cache/<task>.jsonl`` and flushed before the next problem starts, so an interrupted
run resumes where it stopped and never re-generates a finished problem.

Smaller n are evaluated on subsets of the same N samples, never by sampling again. For
each problem and n: when C(N, n) <= K (``subsets``, default 32) every n-subset is used,
which gives the exact expectation over subsets; otherwise K subsets are drawn uniformly
without replacement from a generator seeded by (run seed, problem id, n), so the numbers
are reproducible. A subset keeps sampling order. A selector's accuracy on a problem is its
mean over that problem's subsets; n = N is the single full set. Averaging over subsets
instead of taking the first n candidates removes most of the variance a single draw adds
at small n; random@n is then exactly the mean correctness of the samples whenever the
subsets are enumerated (always at n = 1 and n = N).

The cache holds no hidden states: prompt and candidate token ids, texts, finish reasons,
extracted answers, correctness, answer groups and the scores. A new selector is evaluated
from it without the model; a new scorer can re-run the frozen model on the token ids.
The hidden-state MBR selectors read a sidecar, ``cache/<task>.consensus.json``: per
problem with mixed correctness, the Gram matrices of the candidates' embeddings
(``bench.consensus``, filled by the embedding pass ``--embeddings``).

This module knows nothing about report formats (``bench.report``) or the CLI.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError, InputError
from ..scoring.hidden_states import HiddenStateConfig
from ..jsonl import JsonlWriter, iter_json_lines, write_text_atomic
from ..models import DEFAULT_MODEL, ProgressFn
from ..sampling.prompts import check_fits, derive_seed
from ..sampling import SamplingConfig
from .checkers import GradingUnavailable, get_checker
from .consensus import ConsensusCache, attach_similarities, hidden_coverage
from .execution import exec_plan
from .scores import score_candidates
from .selectors import BENCH_SELECTORS, GREEDY, Scored, get_bench_selector
from .tasks import Problem, Task, load_task

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
#: generation settings that make cached samples what they are: a mismatch refuses to mix
_IDENTITY_KEYS = ("model", "backend", "scorer", "n_samples", "temperature", "top_p", "max_new_tokens", "seed",
                  "dtype")
#: what a cache written before a key existed was made with
_IDENTITY_DEFAULTS = {"scorer": "hf"}
#: bench scorers: "hf" = one teacher-forced transformers pass after sampling; "hook" = vLLM's
#: sampling pass itself (bon_sr.vllm_hook; both token sets from the same rows); "auto" = the
#: cache's own when resuming, else hook with the vLLM backend and hf with transformers
BENCH_SCORERS = ("auto", "hf", "hook")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run on one task.

    n: the n evaluated; max(n) candidates are sampled once per problem. sampling: the
    ``SamplingConfig`` of ``BestOfN`` (temperature, top_p, the run seed), its ``n`` set to
    max(n) here; its ``max_new_tokens`` is ``max_new_tokens``, or the task's default when
    that is None (``sampling_for``). scoring: ``HiddenStateConfig``, of which the bench uses
    ``max_batch_tokens``: it scores both token sets at the last layer, post-norm, untransformed
    (``bon-sr ablate`` varies those).
    """

    task: str
    model: str = DEFAULT_MODEL
    n: tuple[int, ...] = (1, 2, 4, 8, 16)
    limit: int | None = None
    backend: str = "auto"
    max_new_tokens: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scoring: HiddenStateConfig = field(default_factory=HiddenStateConfig)
    subsets: int = 32
    data_source: str = "package"
    checker: str | None = None
    dtype: str = "auto"
    device: str | None = None
    chunk_size: int | None = None
    scorer: str = "auto"
    selectors: tuple[str, ...] = field(default_factory=lambda: tuple(sorted([*BENCH_SELECTORS, GREEDY])))
    recheck: bool = False
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        n = tuple(sorted(set(int(x) for x in self.n)))
        if not n or n[0] < 1:
            raise ConfigError(f"--n needs positive integers such as 1,2,4,8, got {self.n!r}")
        object.__setattr__(self, "n", n)
        if self.subsets < 1:
            raise ConfigError(f"subsets must be >= 1, got {self.subsets}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.scorer not in BENCH_SCORERS:
            raise ConfigError(f"Unknown bench scorer {self.scorer!r}; use one of {', '.join(BENCH_SCORERS)}.")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap must be >= 100 resamples, got {self.bootstrap}")
        for name in self.selectors:
            if name != GREEDY:
                get_bench_selector(name)
        if replace(self.scoring, max_batch_tokens=HiddenStateConfig.max_batch_tokens) != HiddenStateConfig():
            raise ConfigError("The bench scores both token sets at the last layer, post-norm, untransformed; "
                              "only scoring.max_batch_tokens may change. Compare layers, norms, windows and "
                              "transforms with bon-sr ablate.")
        object.__setattr__(self, "sampling", replace(self.sampling, n=n[-1], **(
            {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {})))

    @property
    def n_max(self) -> int:
        return self.n[-1]

    @property
    def seed(self) -> int:
        """The run seed (``sampling.seed``): per-problem seeds, subsets and bootstrap derive from it."""
        return self.sampling.seed

    def sampling_for(self, task_max_new_tokens: int) -> SamplingConfig:
        """The sampling options of a run on a task whose default budget is ``task_max_new_tokens``."""
        if self.max_new_tokens is not None:
            return self.sampling
        return replace(self.sampling, max_new_tokens=task_max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        """Flat, as the reports have always shown it: the sampling and scoring options inline."""
        flat = {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "seed": self.sampling.seed}
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "sampling":
                out.update(flat)
            elif key == "scoring":
                pass
            else:
                out[key] = value
            if key == "device":
                out["max_batch_tokens"] = self.scoring.max_batch_tokens
        return out


# -- the cache ------------------------------------------------------------------------

def cache_paths(out_dir: Path, task_name: str) -> tuple[Path, Path]:
    base = Path(out_dir) / "cache"
    return base / f"{task_name}.jsonl", base / f"{task_name}.meta.json"


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Records by problem id, read with the one JSONL reader (file:line on a bad line). A
    torn last line (a run killed mid-write) is skipped here, never cut: reading changes
    nothing; the cache's writer (``JsonlWriter`` resume, under its lock) cuts it."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for _, where, rec in iter_json_lines(path, what="a cache record (a JSON object)", file_what="Cache",
                                         torn_tail=True, hint=" Delete that line (or the cache) and rerun."):
        if "id" not in rec:
            raise InputError(f"{where}: a cache record without an 'id'. Delete that line (or the cache) and rerun.")
        records[str(rec["id"])] = rec
    return records


def _identity(config: BenchConfig, max_new_tokens: int, cached: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings that make the samples and scores what they are, resolved. ``cached``:
    the meta of a cache being resumed (``scorer='auto'`` then keeps the cache's scorer)."""
    from ..options import resolve_backend

    # The resolved backend: "auto" samples with vLLM on one machine and HF on another.
    backend = resolve_backend(config.backend)
    scorer = config.scorer
    if scorer == "auto":
        scorer = (cached.get("scorer", _IDENTITY_DEFAULTS["scorer"]) if cached
                  else "hook" if backend == "vllm" else "hf")
    if scorer == "hook" and backend != "vllm":
        raise ConfigError("The hook scores inside vLLM's sampling pass: --scorer hook needs --backend vllm.")
    return {"model": config.model, "backend": backend, "scorer": scorer, "n_samples": config.n_max,
            "temperature": config.sampling.temperature, "top_p": config.sampling.top_p,
            "max_new_tokens": max_new_tokens, "seed": config.seed, "dtype": config.dtype}


def _check_meta(meta_path: Path, identity: Mapping[str, Any], have_records: bool) -> dict[str, Any]:
    if not meta_path.is_file():
        return dict(identity)
    meta = json.loads(meta_path.read_text())
    if not have_records:
        return dict(identity)
    diff = [f"{k}: cache {meta.get(k, _IDENTITY_DEFAULTS.get(k))!r} vs now {identity[k]!r}" for k in _IDENTITY_KEYS
            if k != "n_samples" and meta.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k]]
    if diff:
        raise ConfigError(f"{meta_path.parent} holds samples made with other settings ({'; '.join(diff)}). "
                          "Use another output directory, or the same settings to resume.")
    if identity["n_samples"] > meta["n_samples"]:
        raise ConfigError(f"The cache in {meta_path.parent} has {meta['n_samples']} samples per problem but "
                          f"n up to {identity['n_samples']} was asked for. Use n <= {meta['n_samples']} or "
                          "another output directory.")
    return meta


def _candidate_record(cand: Any, scores: Mapping[str, float], answer: str | None, correct: bool,
                      group: int | None) -> dict[str, Any]:
    rec = {"text": cand.text, "token_ids": list(cand.token_ids), "finish_reason": cand.finish_reason,
           "answer": answer, "correct": bool(correct), "scores": dict(scores)}
    if group is not None:
        rec["group"] = group
    if cand.logprobs is not None:
        rec["sampler_logprobs"] = list(cand.logprobs)
    return rec


def check_record(rec: dict[str, Any]) -> dict[str, Any]:
    """(Re)extract answers, correctness and answer groups of a record from its texts. A checker
    that cannot grade here (``GradingUnavailable``) leaves ``correct`` None and says why in
    ``ungraded``: the record is cached all the same, and reports refuse it until ``--recheck``."""
    checker = get_checker(rec["checker"])
    g = rec["greedy"]
    texts = [c["text"] for c in rec["candidates"]] + [g["text"]]
    try:  # the candidates and the greedy decode together: a checker that runs code, one batch
        answers, correct = checker.grade(texts, rec["gold"])
        rec.pop("ungraded", None)
    except GradingUnavailable as exc:
        answers, correct = [checker.extract(t) for t in texts], [None] * len(texts)
        rec["ungraded"] = str(exc)
    for c, a, ok, grp in zip(rec["candidates"], answers, correct, checker.group(answers[:-1])):
        c.update(answer=a, correct=ok, group=grp)
    g.update(answer=answers[-1], correct=correct[-1])
    return rec


def recheck(records: Mapping[str, dict[str, Any]], chosen: Sequence[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """``check_record`` on each chosen record (in place); the cache file is rewritten (whole,
    atomically) when a record changed, so later report-only runs read the new grades."""
    before = [json.dumps(r, ensure_ascii=False) for r in chosen]
    out = [check_record(r) for r in chosen]
    if [json.dumps(r, ensure_ascii=False) for r in out] != before:
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))
    return out


# -- generation ---------------------------------------------------------------------------

def load_generator(config: BenchConfig, max_new_tokens: int, n_samples: int, scorer: str,
                   progress: ProgressFn | None) -> Any:
    from ..api import BestOfN

    # scorer hf: sampling only, the bench scores every candidate itself (bench.scores: both
    # token sets, log-prob and self-certainty from one HF pass). scorer hook: the sampling
    # pass scores, token set full plus response from the same rows (generate_records).
    hook = scorer == "hook"
    sampling = replace(config.sampling_for(max_new_tokens), n=n_samples)
    return BestOfN(config.model, backend=config.backend, scorer=scorer, selector="first", score=hook,
                   logit_stats=hook, token_set="full" if hook else "response",
                   max_batch_tokens=config.scoring.max_batch_tokens, dtype=config.dtype, device=config.device,
                   progress=progress, **sampling.to_dict())


def _hook_scores(cand: Any) -> dict[str, float]:
    """A hook-scored candidate's scores under the bench's keys (``bench.scores``)."""
    s = cand.scores
    nan = float("nan")
    return {"num_tokens": float(cand.num_tokens), "mean_logprob": s.get("mean_logprob", nan),
            "self_certainty": s.get("self_certainty", nan), "sr_full": s["stable_rank"],
            "sr_response": s["sr_response"] if cand.num_tokens else nan}


def generate_records(
    problems: Sequence[Problem],
    bon: Any,
    config: BenchConfig,
    task_name: str,
    max_new_tokens: int,
    n_samples: int,
    scorer: str = "hf",
) -> Iterable[dict[str, Any]]:
    """Sample, decode greedily, score and check; yield one finished record per problem.
    ``scorer``: "hook" when ``bon`` scores in vLLM's sampling pass, else one HF pass."""
    scoring = config.scoring
    hook = scorer == "hook"
    sampler = bon.make_sampler(also=("response",)) if hook else None
    size = config.chunk_size or (1 if bon.backend == "hf" else 16)
    for start in range(0, len(problems), size):
        chunk = problems[start:start + size]
        prompt_ids = [bon.encode(p.prompt, f"{task_name} problem {p.id}") for p in chunk]
        for ids, p in zip(prompt_ids, chunk):
            check_fits(ids, max_new_tokens, bon.context, f"{task_name} problem {p.id}")
        # Seeds derive from the problem id, not its position: a resumed or re-limited run
        # draws exactly the samples an uninterrupted run would have drawn.
        seeds = [derive_seed(config.seed, f"{task_name}:{p.id}") for p in chunk]
        if hook:
            samples, lone = sampler.sample_and_greedy(prompt_ids, n=n_samples, seeds=seeds)
        else:
            samples, lone = bon.sample(prompt_ids, seeds, greedy=True)
        greedies = [[g] for g in lone]
        flat = [c for group, g in zip(samples, greedies) for c in [*group, g[0]]]
        if hook:
            scores = iter([_hook_scores(c) for c in flat])
        else:
            flat_p = [ids for ids, group in zip(prompt_ids, samples) for _ in range(len(group) + 1)]
            scores = iter(score_candidates(bon.hf_model, flat_p, [c.token_ids for c in flat], config=scoring))
        for p, ids, seed, group, g in zip(chunk, prompt_ids, seeds, samples, greedies):
            cands = [_candidate_record(c, next(scores), None, False, None) for c in group]
            rec = {"version": CACHE_VERSION, "id": p.id, "prompt": p.prompt, "prompt_token_ids": list(ids),
                   "gold": p.answer, "checker": p.checker, "meta": dict(p.meta), "seed": seed,
                   "candidates": cands, "greedy": _candidate_record(g[0], next(scores), None, False, None)}
            yield check_record(rec)


# -- evaluation ------------------------------------------------------------------------

def subsets_for(n_samples: int, n: int, k: int, seed: int, problem_id: str) -> list[tuple[int, ...]]:
    """The n-subsets of range(n_samples) a problem is evaluated on (see module docstring)."""
    if not 1 <= n <= n_samples:
        raise ConfigError(f"n={n} needs 1..{n_samples} samples per problem")
    if math.comb(n_samples, n) <= k:
        return list(itertools.combinations(range(n_samples), n))
    rng = random.Random(derive_seed(seed, f"subsets:{problem_id}:{n}"))
    return [tuple(sorted(rng.sample(range(n_samples), n))) for _ in range(k)]


def is_mixed(rec: Mapping[str, Any]) -> bool:
    """Both right and wrong candidates: the only problems where a selector can matter."""
    right = sum(bool(c["correct"]) for c in rec["candidates"])
    return 0 < right < len(rec["candidates"])


def scored_candidate(c: Mapping[str, Any]) -> Scored:
    # the cache writes an undefined score as null (JSON has no NaN); selectors rank NaN last
    scores = {k: math.nan if v is None else v for k, v in c["scores"].items()}
    return Scored(correct=bool(c["correct"]), group=int(c.get("group", -1)),
                  num_tokens=len(c["token_ids"]), scores=scores, truncated=c.get("finish_reason") == "length")


def evaluate_records(
    records: Sequence[Mapping[str, Any]],
    n_values: Sequence[int],
    selectors: Sequence[str],
    *,
    subsets: int = 32,
    seed: int = 0,
    consensus: Any = None,
    execution: Any = None,
) -> dict[str, Any]:
    """Per-problem accuracy, selected length and truncation of every selector at every n.
    ``consensus``: the task's ``bench.consensus.ConsensusCache`` (similarities for the MBR
    selectors; lexical ones from the texts when None). ``execution``: the problems' runs on
    their prompts' examples for the exec selectors (``bench.execution.ExecRuns``).

    Returns ``{"ids": [...], "n": [...], "accuracy": {sel: {n: [per problem]}},
    "length": {sel: {n: [...]}}, "truncated": {sel: {n: [...]}}, "mixed": {n: count}}``;
    greedy is the same at every n. ``truncated``: the selected response hit the token limit.
    """
    fns = {s: get_bench_selector(s).fn for s in selectors if s != GREEDY}
    pooled = {s for s in fns if get_bench_selector(s).greedy_in_pool}
    acc: dict[str, dict[int, list[float]]] = {s: {n: [] for n in n_values} for s in selectors}
    length: dict[str, dict[int, list[float]]] = {s: {n: [] for n in n_values} for s in selectors}
    cut: dict[str, dict[int, list[float]]] = {s: {n: [] for n in n_values} for s in selectors}
    for rec in records:
        cands = [scored_candidate(c) for c in rec["candidates"]]
        cands = attach_similarities(rec, cands, consensus)
        greedy = replace(scored_candidate(rec["greedy"]), index=len(cands), greedy=True) if pooled else None
        if execution is not None:
            cands, greedy = execution.attach(rec, cands, greedy)
        for n in n_values:
            subs = subsets_for(len(cands), n, subsets, seed, str(rec["id"]))
            for name, fn in fns.items():
                a = ln = tr = 0.0
                for sub in subs:
                    view = [cands[i] for i in sub] + ([greedy] if name in pooled else [])
                    w = fn(view)
                    a += sum(wi * c.correct for wi, c in zip(w, view))
                    ln += sum(wi * c.num_tokens for wi, c in zip(w, view))
                    tr += sum(wi * c.truncated for wi, c in zip(w, view))
                acc[name][n].append(a / len(subs))
                length[name][n].append(ln / len(subs))
                cut[name][n].append(tr / len(subs))
            if GREEDY in acc:
                acc[GREEDY][n].append(float(rec["greedy"]["correct"]))
                length[GREEDY][n].append(float(len(rec["greedy"]["token_ids"])))
                cut[GREEDY][n].append(float(rec["greedy"].get("finish_reason") == "length"))
    mixed = sum(1 for r in records if is_mixed(r))
    return {"ids": [str(r["id"]) for r in records], "n": list(n_values), "accuracy": acc, "length": length,
            "truncated": cut, "mixed_problems": mixed}


# -- the whole run ------------------------------------------------------------------------

def run_bench(config: BenchConfig, out_dir: str | Path, *, progress: ProgressFn | None = None,
              generate: bool = True, task: Task | None = None, embeddings: bool = False) -> dict[str, Any]:
    """Generate what the cache lacks, evaluate, write the reports; return the summary.

    ``generate=False`` evaluates only what is cached (no model is loaded).
    ``embeddings=True`` first runs the embedding pass (``bench.embeddings``) for the cached
    problems the similarity sidecar lacks.
    """
    from .report import summarize, write_bench_report

    out_dir = Path(out_dir)
    report = progress or (lambda msg, done, total: None)
    task = task or load_task(config.task, limit=config.limit, source=config.data_source,
                             checker=config.checker, progress=progress)
    max_new = config.max_new_tokens or task.max_new_tokens
    cache_path, meta_path = cache_paths(out_dir, task.name)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    records = read_cache(cache_path)
    cached_meta = json.loads(meta_path.read_text()) if records and meta_path.is_file() else None
    identity = _identity(config, max_new, cached_meta)
    if generate:
        meta = _check_meta(meta_path, identity, bool(records))
    else:
        # Report-only: the cache's own settings describe the samples, whatever was passed.
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else dict(identity)
    # A cache started with more samples per problem keeps that count for new problems too,
    # so every problem of a task has the same N.
    n_gen = int(meta.get("n_samples", config.n_max))
    todo = [p for p in task.problems if p.id not in records]
    generated = 0
    if todo and generate:
        # The writer first (REVIEW 1.7): it takes the cache's lock and can fail (another
        # run holds it, a read-only disk) before an engine exists that would then leak.
        writer = JsonlWriter(cache_path, mode="resume")
        try:
            write_text_atomic(meta_path, json.dumps({**meta, "task": task.name, "cache_version": CACHE_VERSION},
                                                    indent=2))
            report(f"loading {config.model}", None, None)
            bon = load_generator(config, max_new, n_gen, identity["scorer"], progress)
            try:
                # One fsynced line per problem; a full disk cuts the file back to its last
                # whole line and raises an InputError saying so.
                report(f"{task.name}: sampling {n_gen} + greedy", 0, len(todo))
                for rec in generate_records(todo, bon, config, task.name, max_new, n_gen, identity["scorer"]):
                    writer.write(rec)
                    records[rec["id"]] = rec
                    generated += 1
                    report(f"{task.name}: sampling {n_gen} + greedy", generated, len(todo))
            finally:
                bon.close()  # engines shut down here, not by the interpreter's exit
        finally:
            writer.close()
    chosen = [records[p.id] for p in task.problems if p.id in records]
    if not chosen:
        raise InputError(f"No cached problems for {task.name} in {cache_path}; run without --no-generate first.")
    if config.recheck:
        report("re-checking answers", None, None)
        chosen = recheck(records, chosen, cache_path)
    ungraded = [r for r in chosen if r.get("ungraded")]
    if ungraded:
        raise InputError(f"{len(ungraded)} of the {len(chosen)} cached problems of {task.name} are not graded "
                         f"({ungraded[0]['ungraded']}). Their samples are kept in {cache_path}; grade them with "
                         "--no-generate --recheck once the checker can.")
    n_samples = min(len(r["candidates"]) for r in chosen)
    n_values = [n for n in config.n if n <= n_samples]
    if not n_values:
        raise ConfigError(f"The cache has {n_samples} samples per problem; ask for n <= {n_samples}.")
    consensus = ConsensusCache(cache_path)
    mixed = [r for r in chosen if is_mixed(r)]
    if embeddings:
        from .embeddings import embed_records

        embed_records(mixed, consensus, model=str(meta.get("model", config.model)), dtype=config.dtype,
                      device=config.device, max_batch_tokens=config.scoring.max_batch_tokens, progress=progress)
    coverage = hidden_coverage(consensus, [str(r["id"]) for r in mixed], len(chosen))
    selectors, execution = exec_plan(chosen, coverage.usable(config.selectors))
    report(f"{task.name}: evaluating", None, None)
    evaluation = evaluate_records(chosen, n_values, selectors, subsets=config.subsets, seed=config.seed,
                                  consensus=consensus, execution=execution)
    summary = summarize(evaluation, bootstrap=config.bootstrap, seed=config.seed)
    if execution is not None:
        summary["exec"] = execution.summary(evaluation["ids"])
    summary.update(task=task.name, problems=len(chosen), missing=len(task.problems) - len(chosen),
                   generated_now=generated, n_samples=n_samples, subsets=config.subsets,
                   config={**config.to_dict(), **{k: meta.get(k, v) for k, v in identity.items()}},
                   cache=str(cache_path), consensus=coverage.note)
    write_bench_report(summary, out_dir, task.name)
    return summary
