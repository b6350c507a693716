"""Generation parity: greedy decoding with the KV cache, judged against the float64 reference.

People judge a checkpoint by what it generates. Per prompt, the subject greedy-decodes N new
tokens with its own KV cache and the float64 reference greedy-decodes N with its cache; the
rounding floor (the reference with every op rounded once to the subject's dtype) says what
difference the dtype itself makes. Without a ground truth a peer can only say "the tokens
differ"; with the floor this check can tell a near-tie that the dtype cannot resolve from a bug.

What runs (B prompts, N new tokens):

  reference  greedy decode with its cache: tokens R (B, N) and the next-token logits of each step;
  subject    one decode of 2B rows with its own cache: rows [0, B) free-running (each fed its own
             arg-max: what the subject generates), rows [B, 2B) teacher-forced (fed R). Until a
             row's first divergence both see the reference's prefix; after it the teacher-forced
             row still does, so error that the cache accumulates with length stays measurable
             beyond the first divergent token;
  floor      one teacher-forced forward of prompt + R in the subject's dtype (no decode loop:
             its logits at every decoded position in one pass).

Figures: tokens compared, exact-match share (free-running tokens equal to the reference's), the
first divergent step per prompt and, at that step, the reference's top-1 margin (top-1 minus
top-2 logit) against what the dtype can resolve: `generation_decisive_margin` x
floor_ratio_fail x the floor's largest logit error over the decoded steps (a subject within
budget moves a logit by about floor_ratio_fail x the floor's error at most, and two logits are
involved; the largest over all steps, not one row's own draw, which is luck). A
divergence beyond that margin is decisive: fail. Within it the dtype cannot decide the token: a
near-tie, warn, with both numbers in the reason. KL(reference || subject) per step (teacher-forced
rows: up to the divergence and the drift after it), judged like the logits of the subject check:
the mean over steps against max(kl_max, floor_ratio_fail^2 x the floor's mean KL), and the logits'
floor ratio over every decoded position against the logits budget. Non-finite subject logits fail,
naming the step.

Decoding is subject-generic: `subject_model(ckpt, subject)` builds whatever `Subject` names
(the fast path, transformers) behind one `forward(inputs, sites=, past=) -> Trace` with `.cache`
in the reference layout; a subject without a cache (OpenAI GPT in transformers) is decoded by
re-running the whole sequence for every token, and the figures say so.

Cost: the reference decode reuses its cache (one token per step after the prompt). Greedy
decoding cannot share one weight pass across steps (token t+1 depends on the whole stack at step
t), so in bounded-memory mode (`bounded=True`, the gate's `--impl fast`) every step streams the
weights once for the reference and once for the subject; the floor is teacher-forced in one pass.
Over LARGE_MODEL_ELEMENTS weights in bounded mode the gate skips this check (and the cache and
batch rows) unless --max-new-tokens is given (`too_costly`; benchmarks/README.md "Generation").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from parity.checkpoints.checkpoint import Checkpoint
from parity.checkpoints.inputs import Inputs
from parity.engine import budgets as B
from parity.engine import metrics as M
from parity.engine.compare import Subject
from parity.engine.reference_runner import ReferenceRunner
from parity.engine.verdicts import Result
from parity.errors import ParityError

DEFAULT_NEW_TOKENS = 16
# weight elements above which, in bounded-memory mode, the gate does not run the checks that
# stream the weights again for each pass (cache, batch, generation) unless --max-new-tokens is
# given: at GPT-J-6B's shape each reference pass costs about 2 minutes on a 2-core CPU and
# these rows need ~20 of them (benchmarks/README.md "Generation"), beyond the gate's 10 minutes
LARGE_MODEL_ELEMENTS = 1_000_000_000
STEP_COLUMNS = ["prompt", "step", "position", "ref_token", "sub_token", "forced_token", "match",
                "phase", "ref_margin", "floor_noise", "resolvable", "kl", "floor_kl",
                "nonfinite"]


class NoRoomToDecode(ParityError):
    """The prompts already fill the model's positions: nothing can be generated (the gate
    skips its generation row; a direct call is bad input)."""


# ----------------------------------------------------------------------------- subjects
class HFModel:
    """transformers as a decoding subject: loaded (or compiled) once, one capture per call.
    `has_cache = False` where the subject takes no past cache: OpenAI GPT (transformers keeps
    none) and a compiled transformers model (`hf_adapter.CompiledHF` refuses a past); those are
    decoded by re-running the whole sequence for each token."""

    def __init__(self, ckpt: Checkpoint, subject: Subject):
        from parity.subjects import hf_adapter
        from reference import family

        self.cfg = ckpt.config
        impl = None if subject.variant in (None, "hf", "transformers") else subject.variant
        spec = getattr(subject, "compile", "off")
        if spec != "off":
            self.runner = hf_adapter.CompiledHF(ckpt, subject.dtype, subject.device, impl, spec)
            self.has_cache = False
            return
        self.runner = None
        self.has_cache = family(self.cfg.family).hf_cache
        self._capture = hf_adapter.capture
        self.model, self.impl = hf_adapter.load(ckpt, dtype=subject.dtype, device=subject.device,
                                                attn_implementation=impl)

    def forward(self, inputs, sites=None, past=None):
        if self.runner is not None:
            return self.runner.capture(inputs, sites=sites, past=past)  # refuses a past
        return self._capture(self.model, self.cfg, inputs, sites=sites, past=past,
                             attn_implementation=self.impl)


def subject_model(ckpt: Checkpoint, subject: Subject, *, bounded: bool = False):
    """The model behind a `Subject`, ready to decode: `forward(inputs, sites=, past=)` returning
    a Trace whose `.cache` is the reference layout, and `has_cache`. The one place a kind of
    subject plugs into generation: the fast path (eager or compiled, `Subject.compile`) and
    transformers (eager or compiled)."""
    if subject.impl == "hf":
        return HFModel(ckpt, subject)
    if subject.impl != "fast":
        raise ParityError(f"generation: no decoding for --impl {subject.impl!r} (fast or hf)")
    from parity.subjects.fast import FastModel

    model = FastModel(ckpt, subject.variant, dtype=subject.dtype, device=subject.device,
                      emulate=subject.emulate, cache_weights=not bounded,
                      compile=subject.compile)
    model.has_cache = True
    return model


def weight_elements(cfg) -> int:
    """About how many weight elements the model holds (blocks and embedding)."""
    return cfg.n_layer * 12 * cfg.d_model ** 2 + cfg.vocab_size * cfg.d_model


def too_costly(cfg, bounded: bool) -> str | None:
    """Why the gate skips its re-streaming rows by default for this model, or None."""
    e = weight_elements(cfg)
    if not bounded or e <= LARGE_MODEL_ELEMENTS:
        return None
    return (f"not run by default: {e:.2g} weights streamed from disk per pass (bounded memory) "
            f"cost more than the gate's 10 minutes for these rows (~30 minutes at GPT-J-6B's "
            f"shape on 2 cores, benchmarks/README.md 'Generation'); --max-new-tokens N runs "
            f"them")


def default_new_tokens(cfg, bounded: bool) -> int:
    """DEFAULT_NEW_TOKENS, or 0 where `too_costly`."""
    return 0 if too_costly(cfg, bounded) else DEFAULT_NEW_TOKENS


# ----------------------------------------------------------------------------- decoding
def _argmax(logits: np.ndarray) -> np.ndarray:
    """Greedy choice per row; a NaN never wins (an all-NaN row picks token 0)."""
    return np.argmax(np.nan_to_num(logits, nan=-np.inf), axis=-1)


@dataclass
class _Run:
    """A decode in progress: what the next step feeds."""

    cache: list | None
    mask: np.ndarray | None  # (B, T_so_far) or None (no padding anywhere)
    last_pos: np.ndarray  # (B,) position of the last token fed
    ids: np.ndarray  # (B, T_so_far): every token fed (for subjects without a cache)
    prompt: Inputs


def greedy_decode(forward, inputs: Inputs, n: int, *, has_cache: bool = True, forced=None,
                  progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy-decode `n` tokens. `forward(Inputs, past)` -> Trace (logits (B, T, V), `.cache`).
    `forced` (B, n) with -1 where the row chooses itself: rows given a token are fed it (teacher
    forcing). Returns (tokens (B, n), next-token logits (B, n, V)): logits[:, t] chose token t."""
    ids = np.asarray(inputs.input_ids)
    b, t = ids.shape
    pos = (np.broadcast_to(np.arange(t), (b, t)) if inputs.position_ids is None
           else np.asarray(inputs.position_ids))
    mask = None if inputs.attention_mask is None else np.asarray(inputs.attention_mask)
    tr = forward(inputs, None)
    run = _Run(tr.cache if has_cache else None, mask, pos[:, -1].copy(), ids, inputs)
    logits = [np.asarray(tr.logits)[:, -1]]
    tokens = []
    for step in range(n):
        tok = _argmax(logits[-1])
        if forced is not None:
            tok = np.where(forced[:, step] >= 0, forced[:, step], tok)
        tokens.append(tok)
        if step == n - 1:
            break
        run.last_pos = run.last_pos + 1
        run.ids = np.concatenate([run.ids, tok[:, None]], axis=1)
        if run.mask is not None:
            run.mask = np.concatenate([run.mask, np.ones((b, 1), run.mask.dtype)], axis=1)
        if has_cache:
            new = Inputs(tok[:, None].astype(np.int64), run.mask, run.last_pos[:, None].copy())
            tr = forward(new, run.cache)
            run.cache = tr.cache
        else:  # no cache: the whole sequence again
            full_pos = np.concatenate([pos, pos[:, -1:] + np.arange(1, run.ids.shape[1] - t + 1)],
                                      axis=1)
            tr = forward(Inputs(run.ids, run.mask, full_pos), None)
        logits.append(np.asarray(tr.logits)[:, -1])
        if progress:
            progress(step + 1)
    return np.stack(tokens, axis=1), np.stack(logits, axis=1)


def _twice(a):
    return None if a is None else np.concatenate([a, a], axis=0)


def _extended(inputs: Inputs, tokens: np.ndarray) -> Inputs:
    """The prompt followed by `tokens` (B, k), positions and mask continued."""
    ids = np.asarray(inputs.input_ids)
    b, t = ids.shape
    k = tokens.shape[1]
    pos = (np.broadcast_to(np.arange(t), (b, t)) if inputs.position_ids is None
           else np.asarray(inputs.position_ids))
    new_pos = pos[:, -1:] + np.arange(1, k + 1)
    mask = inputs.attention_mask
    if mask is not None:
        mask = np.concatenate([np.asarray(mask), np.ones((b, k), np.asarray(mask).dtype)], axis=1)
    return Inputs(np.concatenate([ids, tokens], axis=1).astype(np.int64), mask,
                  np.concatenate([pos, new_pos], axis=1).astype(np.int64))


# ----------------------------------------------------------------------------- the check
@dataclass
class Generation:
    """The generation check's verdict row (`result`) and its per-step table (`steps`, one row
    per prompt x step: STEP_COLUMNS), plus the tokens of each side."""

    result: Result
    steps: pd.DataFrame
    reference_tokens: np.ndarray
    subject_tokens: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.result.verdict


def _kl_rows(lr: np.ndarray, x: np.ndarray) -> np.ndarray:
    """KL(ref || x) per row, ref given as log-probabilities; inf where x is not finite."""
    out = np.full(len(lr), np.inf)
    fin = np.isfinite(x).all(axis=-1)
    if fin.any():
        lx = M.log_softmax(x[fin])
        out[fin] = np.maximum(np.sum(np.exp(lr[fin]) * (lr[fin] - lx), axis=-1), 0.0)
    return out


def _wide_sites(dtypes: dict, dtype: str, n_layer: int) -> dict:
    """Sites the subject keeps wider than its dtype (upcast scores, fp32 softmax), read off
    block 0's site dtypes and applied to every block."""
    kinds = {k.removeprefix("blocks.0."): v for k, v in dtypes.items()
             if k.startswith("blocks.0.") and v != dtype}
    return {f"blocks.{i}.{k}": v for i in range(n_layer) for k, v in kinds.items()}


def generation_check(ckpt: Checkpoint, inputs: Inputs, subject: Subject, *,
                     max_new_tokens: int | None = None, policy: dict | None = None,
                     bounded: bool = False, model=None, progress=None) -> Generation:
    """Greedy decoding of `subject` against the float64 reference's (module docstring).
    `model`: an already built subject model (default: `subject_model(ckpt, subject)`)."""
    cfg = ckpt.config
    policy = policy or B.load_policy()
    n = DEFAULT_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens)
    if n < 1:
        raise ParityError(f"--max-new-tokens must be at least 1 to decode, got {n}")
    t = inputs.input_ids.shape[1]
    room = cfg.n_positions - t
    pos = inputs.position_ids
    if pos is not None:
        room = cfg.n_positions - 1 - int(np.max(np.asarray(pos)[:, -1]))
    if room < 1:
        raise NoRoomToDecode(f"generation: the prompts fill all {cfg.n_positions} positions of "
                             f"the model; no room to decode")
    asked, n = n, min(n, room)
    model = model or subject_model(ckpt, subject, bounded=bounded)
    has_cache = getattr(model, "has_cache", True)
    ref = ReferenceRunner(ckpt, bounded=bounded)
    say = (lambda what: (lambda k: progress(f"generation: {what} token {k}/{n}"))) if progress \
        else (lambda what: None)

    # the reference, greedy, with its cache
    r_tok, r_logits = greedy_decode(lambda inp, past: ref.forward(inp, past=past, sites="logits"),
                                    inputs, n, progress=say("reference"))
    # the subject: rows [0, B) free-running, rows [B, 2B) fed the reference's tokens
    b = r_tok.shape[0]
    both = Inputs(_twice(inputs.input_ids), _twice(inputs.attention_mask),
                  _twice(inputs.position_ids))
    forced = np.concatenate([np.full_like(r_tok, -1), r_tok], axis=0)
    first: dict = {}

    def sub_fwd(inp, past):
        """The prompt step also records block 0's sites: their dtypes say which sites the
        subject keeps wide (the floor keeps them wide too)."""
        sites = "logits" if first else "logits,blocks.0.*"
        tr = model.forward(inp, sites=sites, past=past) if has_cache else \
            model.forward(inp, sites=sites)
        first.setdefault("dtypes", dict(tr.dtypes))
        return tr

    s_tok, s_logits = greedy_decode(sub_fwd, both, n, has_cache=has_cache, forced=forced,
                                    progress=say("subject"))
    free_tok, tf_logits = s_tok[:b], s_logits[b:]
    free_logits = s_logits[:b]
    forced_choice = _argmax(tf_logits)
    # the rounding floor, teacher-forced on prompt + R in one pass
    dtype = getattr(model, "dtype", subject.dtype)
    dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    floor = dtype if dtype in ("float16", "bfloat16", "float32") else None
    f_logits = None
    if floor:
        wide = _wide_sites(first["dtypes"], dtype, cfg.n_layer)
        if progress:
            progress("generation: rounding floor")
        ftr = ref.forward(_extended(inputs, r_tok[:, :-1]), sites="logits", floor=floor,
                          floor_sites=wide)
        f_logits = np.asarray(ftr.logits)[:, t - 1:]
    return judge(cfg, subject, dtype, policy, r_tok, r_logits, free_tok, free_logits,
                 forced_choice, tf_logits, f_logits, asked=asked, has_cache=has_cache,
                 label=ckpt.path.name)


def judge(cfg, subject: Subject, dtype: str, policy: dict, r_tok, r_logits, free_tok,
          free_logits, forced_choice, tf_logits, f_logits, *, asked: int, has_cache: bool,
          label: str = "") -> Generation:
    """The verdict and figures from the decoded tokens and logits (see the module docstring)."""
    b, n = r_tok.shape
    budget = B.budget_for(policy, dtype=dtype, family=cfg.family, variant=subject.variant,
                          site="logits", mode="accumulated", checkpoint=label)
    k = B.tolerance("generation_decisive_margin") * budget.floor_ratio_fail
    top2 = np.sort(r_logits, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]  # (B, N)
    noise = (np.abs(np.where(np.isfinite(f_logits), f_logits, np.inf) - r_logits).max(axis=-1)
             if f_logits is not None else np.full((b, n), np.nan))
    # the yardstick: the floor's largest logit error over every decoded step. One row's own
    # error is a single draw of the rounding; on models whose attention rows the dtype cannot
    # resolve (OpenAI GPT stress) a healthy subject's row error reaches several times the floor's
    # draw there, and a per-row yardstick called a 16.1x margin "decisive" against a limit of 16
    scale = float(noise.max()) if noise.size else math.nan
    lr = M.log_softmax(r_logits.reshape(-1, r_logits.shape[-1]))
    kl = _kl_rows(lr, tf_logits.reshape(-1, r_logits.shape[-1])).reshape(b, n)
    floor_kl = (_kl_rows(lr, f_logits.reshape(-1, r_logits.shape[-1])).reshape(b, n)
                if f_logits is not None else np.full((b, n), np.nan))
    nonfinite_free = ~np.isfinite(free_logits).all(axis=-1)
    nonfinite_tf = ~np.isfinite(tf_logits).all(axis=-1)
    match = free_tok == r_tok
    first = [int(np.argmax(~match[r])) if not match[r].all() else None for r in range(b)]
    rows = []
    for r in range(b):
        d = first[r]
        for s in range(n):
            phase = "agree" if d is None or s < d else ("divergence" if s == d else "drift")
            rows.append(dict(prompt=r, step=s, position=s, ref_token=int(r_tok[r, s]),
                             sub_token=int(free_tok[r, s]),
                             forced_token=int(forced_choice[r, s]), match=bool(match[r, s]),
                             phase=phase, ref_margin=float(margin[r, s]),
                             floor_noise=float(noise[r, s]), resolvable=float(k * scale),
                             kl=float(kl[r, s]), floor_kl=float(floor_kl[r, s]),
                             nonfinite=bool(nonfinite_free[r, s] or nonfinite_tf[r, s])))
    steps = pd.DataFrame(rows, columns=STEP_COLUMNS)

    # figures
    diverged = [r for r in range(b) if first[r] is not None]
    before = np.zeros((b, n), bool)
    for r in range(b):
        before[r, : (n if first[r] is None else first[r] + 1)] = True
    after = ~before
    fin_kl = np.isfinite(kl)
    mean_kl = float(kl.mean()) if fin_kl.all() else math.inf
    mean_floor_kl = float(np.nanmean(floor_kl)) if f_logits is not None else math.nan
    kl_limit = budget.kl_max if not math.isfinite(mean_floor_kl) else max(
        budget.kl_max, budget.floor_ratio_fail ** 2 * mean_floor_kl)
    valid = np.ones(r_logits.shape, bool)
    fr = math.nan
    if f_logits is not None and np.isfinite(f_logits).all():
        fr = M.floor_ratio(M.rel_l2(tf_logits, r_logits, valid),
                           M.rel_l2(f_logits, r_logits, valid))
    figures = {
        "new_tokens": n, "prompts": b, "tokens_compared": int(b * n),
        "exact_match": float(match.mean()),
        "prompts_diverged": len(diverged),
        "first_divergent_steps": ", ".join("-" if d is None else str(d) for d in first),
        "kl_before_divergence": _mean(kl[before]),
        "kl_after_divergence": _mean(kl[after]) if after.any() else None,
        "kl_last_step": _mean(kl[:, -1]),
        "kl_max_step": float(kl.max()) if kl.size else 0.0,
        "floor_kl": None if not math.isfinite(mean_floor_kl) else mean_floor_kl,
        "floor_logit_error": None if not math.isfinite(scale) else scale,
        "decisive_margin": None if not math.isfinite(scale) else k * scale,
        "logits_floor_ratio": None if math.isnan(fr) else fr,
        "decoding": ("KV cache" if has_cache else
                     "no cache in this subject: the whole sequence re-run per token"),
    }
    if asked != n:
        figures["new_tokens_asked"] = asked

    # verdicts, worst first
    where = "; ".join(_divergence_text(r, first[r], r_tok, free_tok, margin, scale, k, dtype)
                      for r in diverged[:3]) + (f"; and {len(diverged) - 3} more prompts"
                                                if len(diverged) > 3 else "")
    decisive = [r for r in diverged if f_logits is not None
                and margin[r, first[r]] > k * scale]
    fails, warns = [], []
    if (nonfinite_free | nonfinite_tf).any():
        r, s = np.argwhere(nonfinite_free | nonfinite_tf)[0]
        fails.append(f"non-finite subject logits from step {s} of prompt {r}")
    if f_logits is not None and not np.isfinite(f_logits).all():
        r, s = np.argwhere(~np.isfinite(f_logits).all(axis=-1))[0]
        fails.append(f"the {dtype} rounding floor itself is non-finite at step {s} of prompt "
                     f"{r}: the dtype cannot hold this model")
    if decisive:
        fails.append(f"decisive divergence in {len(decisive)} of {b} prompts")
    if diverged and f_logits is None:  # a float64 subject has no floor: exact math diverges not
        fails.append(f"divergence in {len(diverged)} of {b} prompts in {dtype} (no rounding "
                     f"floor: the subject computes the reference's math)")
    if math.isfinite(mean_kl) and not mean_kl <= kl_limit:
        a, lim = M.fmt_pair(mean_kl, kl_limit)
        fails.append(f"mean KL per step {a} > {lim}")
    if not math.isnan(fr):
        for bucket, lim in ((fails, budget.floor_ratio_fail), (warns, budget.floor_ratio_warn)):
            if fr > lim:
                a, lb = M.fmt_pair(fr, lim)
                bucket.append(f"logits floor_ratio over the decoded steps {a} > {lb}")
                break
    if diverged and not decisive and f_logits is not None and not fails:
        warns.append(f"near-tie divergence in {len(diverged)} of {b} prompts")
    verdict = "fail" if fails else "warn" if warns else "pass"
    how = f"{'KV cache' if has_cache else 'no cache: full re-run per token'}"
    head = (f"{b} prompts x {n} greedy tokens ({how}): exact match "
            f"{figures['exact_match']:.3g}")
    if verdict == "pass":
        detail = head + ("; every token equals the reference's" if not diverged else "")
    else:
        detail = f"{head}; " + "; ".join(fails + warns)
    if where:
        detail += f"; {where}"
    if asked != n:
        detail += f" (asked {asked} new tokens; the model's {cfg.n_positions} positions allow {n})"
    result = Result(name="generation", verdict=verdict, detail=detail, figures=figures)
    return Generation(result, steps, r_tok, free_tok,
                      meta={"decisive_factor": k, "kl_limit": kl_limit})


def _mean(a) -> float | None:
    a = np.asarray(a, np.float64)
    if not a.size:
        return None
    return float(a.mean()) if np.isfinite(a).all() else math.inf


def _divergence_text(r, d, r_tok, free_tok, margin, scale, k, dtype) -> str:
    m = float(margin[r, d])
    kind = "decisive" if m > k * scale else "near-tie"
    return (f"prompt {r}: first divergent step {d} (reference token {int(r_tok[r, d])}, subject "
            f"{int(free_tok[r, d])}): reference top-1 margin {m:.3g} vs {k * scale:.3g} that "
            f"{dtype} can resolve ({k:g} x the floor's largest logit error {scale:.3g}): {kind}")


def skipped(reason: str) -> Result:
    """The generation row when it does not run (e.g. --max-new-tokens 0)."""
    return Result(name="generation", verdict="skip", detail=f"not run: {reason}")
