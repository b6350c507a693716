"""`parity gate`: may this checkpoint ship, run the fast way?

The checks, each a named row with its figures and verdict:
  structure     config readable and supported; every expected weight present, none unexpected
                (legacy buffers aside); shapes agree with the config; all values finite; storage
                dtypes; vocabulary: embedding rows against the tokenizer (GPT-J's 143
                <|extratoken_N|> padding rows recognised as such);
  golden:<file> the float64 reference on the golden's own inputs against its logits and sites,
                at the tolerance its `dtype` metadata implies (catches conversion bugs);
  subject       the subject against the float64 reference on the prompts, per site, in both
                modes, with the budgets of the policy (lockstep, flat memory for --impl fast);
  determinism   two subject runs agree bitwise;
  cache         tokens decoded with the subject's own KV cache against the reference's full
                forward and its floor (parity.engine.consistency, accumulated mode);
  batch         each prompt in the padded batch against itself alone (same module);
  generation    greedy decoding, --max-new-tokens per prompt, with the subject's KV cache
                against the float64 reference's (parity.engine.generation): the first divergent
                step, decisive (fail) or a near-tie the dtype cannot resolve (warn), KL per step
                and teacher-forced drift after it.
Verdicts: pass / warn / fail. Exit 0 pass (warn included), 1 fail, 2 bad input. Fails closed:
an error anywhere is never a pass.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import reference

from parity.engine import budgets as B
from parity.checkpoints.checkpoint import Checkpoint, open_checkpoint
from parity.engine.compare import FAILING, Subject, overall, token_rows, wide_sites
from parity.engine.verdicts import Result
from parity.errors import ParityError, TokenizerMissing
from parity.files import atomic_write
from parity.subjects.compiled import check_emulate, variant_label
from parity.subjects.compiled import parse as parse_compile
from parity.goldens.io import read_golden
from parity.checkpoints.inputs import Inputs, gate_batch, validate_inputs
from parity.checkpoints.tokenizer_check import load_tokenizer

GPTJ_PADDING = re.compile(r"^<\|extratoken_(\d+)\|>$")


@dataclass
class GateResult:
    checks: list[Result]
    divergence: pd.DataFrame
    meta: dict
    generation: pd.DataFrame | None = None  # the generation check's per-step table

    @property
    def verdict(self) -> str:
        vs = {c.verdict for c in self.checks}
        return "fail" if "fail" in vs else "warn" if "warn" in vs else "pass"

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict == "fail" else 0

    @property
    def unchecked(self) -> list[str]:
        """What was not checked, one phrase each ("tokenizer not checked: no tokenizer files")."""
        return [c.not_checked for c in self.checks if c.verdict == "skip"]

    @property
    def verdict_line(self) -> str:
        """'PASS', or 'PASS - tokenizer not checked: no tokenizer files ...': a bare verdict only
        when every check ran."""
        return " - ".join([self.verdict.upper(), *self.unchecked])


# ----------------------------------------------------------------------------- structure
def structure_check(ckpt: Checkpoint, progress=None) -> Result:
    """A readable checkpoint that does not match its config (missing, unexpected or mis-shaped
    weights, a stored head that a tied config would ignore) or holds non-finite values fails
    here, with the report and JUnit file still written; only unreadable input is an error."""
    figures = {"family": ckpt.config.family, "layers": ckpt.config.n_layer,
               "hidden": ckpt.config.d_model, "heads": ckpt.config.n_head,
               "vocab_size": ckpt.config.vocab_size, "tensors": len(ckpt.entries),
               "storage_dtypes": ckpt.storage_dtypes(), "ignored_keys": len(ckpt.ignored),
               "format": ckpt.fmt}
    problems = ckpt.structure_problems()
    if problems:
        figures["structure_problems"] = len(problems)
        return Result(name="structure", verdict="fail", detail="; ".join(problems),
                      figures=figures)
    bad = []
    for n, name in enumerate(reference.param_shapes(ckpt.config)):
        t = ckpt.tensor(name)
        nonfinite = int((~np.isfinite(t.float().numpy())).sum()) if t.numel() else 0
        if nonfinite:
            bad.append(f"{name} ({nonfinite} non-finite)")
        if progress and n % 16 == 0:
            progress(f"structure: {name}")
    notes = []
    if bad:
        problems.append(f"non-finite weights: {', '.join(bad[:4])}"
                        + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    vocab = vocabulary_check(ckpt)
    figures.update(vocab["figures"])
    problems += vocab["problems"]
    notes += vocab["notes"]
    verdict = "fail" if problems else ("warn" if vocab["warn"] else "pass")
    return Result(name="structure", verdict=verdict, figures=figures,
                  detail="; ".join(problems + notes)
                  or "all weights present, shaped as the config says, finite")


def vocabulary_check(ckpt: Checkpoint) -> dict:
    """Embedding rows against the tokenizer's size; GPT-J's padding rows recognised."""
    out = {"figures": {}, "problems": [], "notes": [], "warn": False}
    rows = ckpt.config.vocab_size
    try:
        tok = load_tokenizer(ckpt.path)
    except TokenizerMissing:
        out["notes"].append("no tokenizer files: vocabulary not checked")
        return out
    except ParityError as e:
        out["problems"].append(str(e))
        return out
    vocab = tok.get_vocab(with_added_tokens=True)
    n = len(vocab)
    out["figures"].update(tokenizer_size=n, embedding_rows=rows)
    if max(vocab.values(), default=-1) >= rows:
        out["problems"].append(f"tokenizer ids reach {max(vocab.values())} but the embedding has "
                               f"{rows} rows")
    elif n < rows:
        unused = rows - n
        out["notes"].append(f"{unused} embedding rows beyond the tokenizer are never looked up")
        # a padded vocabulary (GPT-J: 143 TPU rows) is expected to have rows no token uses
        out["warn"] = not reference.family(ckpt.config.family).unused_embedding_rows
    else:
        pad = sorted(i for t, i in vocab.items() if GPTJ_PADDING.match(t))
        if pad:
            out["figures"]["padding_rows"] = len(pad)
            out["notes"].append(f"{len(pad)} TPU padding rows <|extratoken_N|> (ids {pad[0]}.."
                                f"{pad[-1]}) recognised as unused padding")
    return out


# ----------------------------------------------------------------------------- goldens
def golden_check(ckpt: Checkpoint, path: str) -> Result:
    """One row per golden file, with `goldens.summarize_foreign`'s verdict (the same one
    `parity golden check --file` gives: a golden with no comparable site fails). A stored site
    whose shape does not fit the checkpoint is bad input (a golden of another model), not a
    verdict."""
    from parity.goldens.foreign import check_foreign_golden, summarize_foreign

    rows = check_foreign_golden(path, ckpt)
    misfit = [r for r in rows if r.get("misfit")]
    if misfit:
        r = misfit[0]
        raise ParityError(f"{path}: {r['site']} has shape {r['shape']}, the checkpoint gives "
                          f"{r['misfit']} (a golden of another model?)")
    s = summarize_foreign(rows, name=f"golden:{Path(path).name}")
    s.figures = {k: (_f(v) if isinstance(v, float) else v) for k, v in s.figures.items()}
    s.detail = f"{path}: {s.detail}"
    return s


# ----------------------------------------------------------------------------- subject
def subject_check(ckpt: Checkpoint, inputs: Inputs, subject: Subject, policy: dict,
                  impl: str, progress=None) -> tuple[Result, pd.DataFrame, dict]:
    if impl == "fast":
        from parity.subjects.fast import FastModel
        from parity.engine.lockstep import lockstep

        model = FastModel(ckpt, subject.variant, dtype=subject.dtype, device=subject.device,
                          emulate=subject.emulate, cache_weights=False, compile=subject.compile)
        df, kept = lockstep(ckpt, inputs, model, policy=policy, label=ckpt.path.name,
                            variant=subject.name, keep=_determinism_site,
                            progress=(lambda i: progress(f"subject: layer {i + 1}/"
                                                         f"{ckpt.config.n_layer}"))
                            if progress else None)
        meta = dict(model.meta(), first_run=kept)
        if subject.compile != "off":  # the determinism rerun calls the same compiled graphs
            meta["_rerun"] = lambda: model.forward(inputs)
    else:
        from parity.engine.compare import make_records, to_frame
        from parity.subjects import run

        ref = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                                inputs.attention_mask, inputs.position_ids)
        if subject.compile != "off":  # compiled once; the determinism rerun reuses it
            from parity.subjects.hf_adapter import CompiledHF

            runner = CompiledHF(ckpt, subject.dtype, subject.device,
                                None if subject.variant in (None, "hf") else subject.variant,
                                subject.compile)
            sub = runner.capture(inputs)
        else:
            sub = run("hf", ckpt, inputs, dtype=subject.dtype, device=subject.device,
                      variant=subject.variant)
        floor = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                                  inputs.attention_mask, inputs.position_ids,
                                  floor=subject.dtype if subject.dtype != "float64" else None,
                                  floor_sites=wide_sites(sub.dtypes, subject.dtype))
        df = to_frame(make_records(
            ref.sites, sub.sites, floor.sites if subject.dtype != "float64" else None,
            sub.dtypes, token_rows(inputs), policy, mode="accumulated",
            family=ckpt.config.family, label=ckpt.path.name,
            variant=variant_label("transformers", subject.compile),
            dtype=subject.dtype, subject_dtype=subject.dtype, device=subject.device,
            emulate=False))
        meta = dict(sub.meta, memory="--impl hf loads the whole model (not bounded)")
        if subject.compile != "off":
            meta["_rerun"] = lambda: runner.capture(inputs, sites=DETERMINISM_SITES)
    v = overall(df)
    acc = df[df["mode"] == "accumulated"]
    logits = acc[acc["site"] == "logits"].iloc[0]
    bad = df[~df["verdict"].isin(["pass", "not_exposed"])]
    first = bad.iloc[0] if len(bad) else None
    hidden = sorted(set(df.loc[df["verdict"] == "not_exposed", "site"]))
    figures = {"logits_floor_ratio": _f(logits["floor_ratio"]),
               "top1": (_f(logits["top1"]) if not pd.isna(logits["top1"])
                        else "n/a: no decisive rows"),
               "kl": _f(logits["kl"]), "worst_floor_ratio": _f(df["floor_ratio"].max()),
               "nonfinite": int(df["nonfinite"].sum()),
               "min_headroom": _f(df["headroom"].min()),
               "sites_compared": int((df["verdict"] != "not_exposed").sum()),
               "sites_over_budget": int(df["verdict"].isin(FAILING).sum()),
               "sites_not_exposed": len(hidden)}
    if hidden:
        figures["not_exposed"] = ", ".join(_kinds(hidden))
    what = (f"fast {subject.variant}" if impl == "fast" else
            f"transformers ({meta.get('attn_implementation', 'eager')})")
    if subject.compile != "off":
        what += f", compiled ({subject.compile}, {meta.get('compile_codegen', '')} kernels)"
    detail = (f"{what} {meta.get('dtype', subject.dtype)} on {subject.device}: "
              + ("every site within budget" if first is None else
                 f"first divergent site {first['site']} ({first['mode']}, {first['verdict']}: "
                 f"{first['reason']})")
              + (f"; not exposed by the subject: {figures['not_exposed']}" if hidden else "")
              + ("; top-1 not measured (no decisive rows)" if pd.isna(logits["top1"]) else ""))
    verdict = {"pass": "pass", "warn": "warn"}.get(v, "fail")
    return Result(name="subject", verdict=verdict, detail=detail, figures=figures), df, meta


DETERMINISM_SITES = "embed,blocks.*.resid_post,blocks.*.ln_2,logits"


def _determinism_site(site: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(site, p) for p in DETERMINISM_SITES.split(","))


def determinism_check(ckpt: Checkpoint, inputs: Inputs, subject: Subject, impl: str,
                      first: dict | None = None, rerun=None) -> Result:
    """Two subject runs, block outputs and logits compared bitwise (`first`: the sites kept from
    the subject check's own run, so only one more run is made). The fast path reads its weights
    layer by layer again (no cache), so memory stays flat here too. `rerun`: a compiled
    subject's own callable (the same compiled graphs, never a recompile)."""
    sites = DETERMINISM_SITES
    if rerun is not None:
        def once():
            t = rerun()
            t.sites = {k: v for k, v in t.sites.items() if _determinism_site(k)}
            return t
    elif impl == "fast":
        from parity.subjects.fast import FastModel

        def once():
            return FastModel(ckpt, subject.variant, dtype=subject.dtype, device=subject.device,
                             emulate=subject.emulate, cache_weights=False).forward(
                                 inputs, sites=sites)
    else:
        from parity.subjects import run

        def once():  # exactly the subject that was judged (its attention implementation too)
            return run(impl, ckpt, inputs, variant=subject.variant, dtype=subject.dtype,
                       device=subject.device, sites=sites)
    a = once()
    if first:
        b, a = a, type(a)(family=a.family, sites=first)
    else:
        b = once()
    diff = [s for s in a.sites if s not in b.sites
            or not np.array_equal(a.sites[s], b.sites[s], equal_nan=True)]
    if diff:
        return Result(name="determinism", verdict="fail",
                      detail=f"two runs differ at {len(diff)} sites, first {diff[0]}",
                      figures={"sites_checked": len(a.sites), "sites_differing": len(diff)})
    return Result(name="determinism", verdict="pass",
                  detail=f"two runs bitwise identical at {len(a.sites)} sites",
                  figures={"sites_checked": len(a.sites), "sites_differing": 0})


def _kinds(sites: list[str]) -> list[str]:
    """'blocks.0.attn.probs', 'blocks.1.attn.probs' -> 'blocks.*.attn.probs' (short lists)."""
    return sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", s) for s in sites})


def _f(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str, ckpt: Checkpoint) -> Inputs:
    """A prompts file (`inputs.read_prompts`: `ids: 464 3290 318` lines are token ids, other
    lines text, tokenized with the checkpoint's tokenizer files). Rows are left-padded, with
    position ids counted from the first real token."""
    from parity.checkpoints.inputs import left_pad, read_prompts, tokenize

    prompts = read_prompts(path)
    texts = [t for t in prompts if isinstance(t, str)]
    if texts:
        try:
            encoded = iter(tokenize(ckpt.path, texts).rows())
        except ParityError as e:  # name the prompts file, not only the checkpoint
            raise ParityError(f"{path}: text prompts cannot be tokenized: {e}") from None
        prompts = [next(encoded) if isinstance(t, str) else t for t in prompts]
    inp = left_pad(prompts)
    if inp.attention_mask is not None:
        inp.position_ids = np.maximum(np.cumsum(inp.attention_mask, axis=1) - 1, 0)
    validate_inputs(inp, ckpt.config, str(path))
    return inp


# ----------------------------------------------------------------------------- the gate
def enforce_requirements(checks: list[Result], require: list[str], source: str) -> None:
    """A check the policy requires (`[gate] require`) may not be skipped: its skip becomes a
    fail that says so. `golden` requires at least one --golden file."""
    for name in require:
        mine = [c for c in checks if c.name == name or c.name.startswith(name + ":")]
        if not mine:
            checks.append(Result(name=name, verdict="fail",
                                 detail=f"required by the policy ({source}: [gate] require) "
                                        f"but not run: no --{name} given"))
        for c in mine:
            if c.verdict == "skip":
                c.verdict = "fail"
                c.detail = (f"required by the policy ({source}: [gate] require) but skipped: "
                            f"{c.detail}")


def run_gate(ckpt_dir: str, goldens=(), policy_path: str | None = None, impl: str = "fast",
             variant: str = "hf", dtype: str = "float16", device: str = "cpu",
             emulate=None, prompts: str | None = None, progress=None,
             max_new_tokens: int | None = None, compile: str = "off") -> GateResult:
    """`max_new_tokens`: tokens the generation check decodes per prompt (None: 16, except that
    a model over `generation.LARGE_MODEL_ELEMENTS` weights checked in bounded memory (--impl
    fast) skips the cache, batch and generation rows by default; 0: generation is skipped)."""
    t0 = time.perf_counter()
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ParityError(f"--max-new-tokens must be 0 (no generation check) or more, got "
                          f"{max_new_tokens}")
    policy = B.load_policy(policy_path)
    if impl not in ("fast", "hf"):
        raise ParityError(f"--impl must be fast or hf for the gate, got {impl!r}")
    compile = parse_compile(compile)
    check_emulate(compile, emulate)
    ckpt = open_checkpoint(ckpt_dir)
    ckpt.keep_open = impl != "fast"  # bounded memory: no memory map outlives its read
    checks = [structure_check(ckpt, progress)]
    from parity.checkpoints import tokenizer_check
    from parity.checkpoints.inputs import prompt_texts

    checks.append(tokenizer_check.gate_check(ckpt.path, prompt_texts(prompts)))
    inputs = load_prompts(prompts, ckpt) if prompts else gate_batch(ckpt.config, seed=0)
    for g in goldens:
        if progress:
            progress(f"golden {g}")
        if checks[0].verdict == "fail":  # structure  # the reference cannot run on non-finite weights
            read_golden(g)  # a bad golden is still bad input
            checks.append(Result(name=f"golden:{Path(g).name}", verdict="skip",
                                 detail="not run: the structure check failed"))
        else:
            checks.append(golden_check(ckpt, g))
    subject = Subject(variant=variant, dtype=dtype, device=device, emulate=emulate, impl=impl,
                      compile=compile)
    div = pd.DataFrame()
    meta = {}
    gen = None
    if checks[0].verdict == "fail":  # structure
        for name in ("subject", "determinism", "cache", "batch", "generation"):
            checks.append(Result(name=name, verdict="skip",
                                 detail="not run: the structure check failed"))
    else:
        c, div, meta = subject_check(ckpt, inputs, subject, policy, impl, progress)
        checks.append(c)
        if progress:
            progress("determinism")
        checks.append(determinism_check(ckpt, inputs, subject, impl, meta.pop("first_run", None),
                                        meta.pop("_rerun", None)))
        from parity.engine.generation import too_costly

        costly = too_costly(ckpt.config, impl == "fast") if max_new_tokens is None else None
        if costly:  # a large model streamed from disk: these rows only when asked for
            checks += [Result(name=n, verdict="skip", detail=costly)
                       for n in ("cache", "batch", "generation")]
        else:
            checks += consistency_rows(ckpt, inputs, subject, policy, impl, progress)
            c, gen = generation_row(ckpt, inputs, subject, policy, impl, max_new_tokens,
                                    progress)
            checks.append(c)
    enforce_requirements(checks, B.gate_requirements(policy)["require"],
                         policy_path or str(B.DEFAULT_FILE))
    meta.update(wall_time_s=round(time.perf_counter() - t0, 1), checkpoint=str(ckpt.path),
                impl=impl, variant=variant, dtype=dtype, device=device, compile=compile,
                prompts=prompts or "built-in batch ({} x {} tokens: full, left-padded by a "
                "quarter and a half, a repeated motif)".format(*inputs.input_ids.shape),
                policy=policy_path or str(B.DEFAULT_FILE))
    return GateResult(checks, div, meta, gen)


def consistency_rows(ckpt: Checkpoint, inputs: Inputs, subject: Subject, policy: dict,
                     impl: str, progress=None) -> list[Result]:
    """The `cache` and `batch` rows (bounded memory for --impl fast, like the lockstep)."""
    from parity.engine.consistency import gate_rows

    return gate_rows(ckpt, inputs, subject, policy, bounded=impl == "fast",
                     label=ckpt.path.name, progress=progress)


def generation_row(ckpt: Checkpoint, inputs: Inputs, subject: Subject, policy: dict, impl: str,
                   max_new_tokens: int | None, progress=None) -> tuple[Result, pd.DataFrame | None]:
    """The `generation` row and its per-step table (skipped with --max-new-tokens 0)."""
    from parity.engine import generation as G

    if max_new_tokens == 0:
        return G.skipped("--max-new-tokens 0"), None
    try:
        g = G.generation_check(ckpt, inputs, subject, max_new_tokens=max_new_tokens,
                               policy=policy, bounded=impl == "fast", progress=progress)
    except G.NoRoomToDecode as e:
        return G.skipped(str(e).removeprefix("generation: ")), None
    return g.result, g.steps


def write_error_artifacts(report_dir: Path, junit: str | None, message: str) -> None:
    """After an error: no report file is left in the report folder (an earlier run's files
    there are removed) and the JUnit file holds one error testcase, so nothing an earlier run
    left can be read as this run's verdict. Best effort: a failing write here must not hide the
    original error."""
    from parity.reports.render import FILES

    def attempt(fn):
        try:
            fn()
        except OSError:
            pass

    for name in FILES:
        attempt(lambda: (Path(report_dir) / name).unlink(missing_ok=True))
    if junit:
        import xml.etree.ElementTree as ET

        suite = ET.Element("testsuite", name="parity gate", tests="1", failures="0",
                           errors="1", skipped="0")
        case = ET.SubElement(suite, "testcase", classname="parity.gate", name="gate")
        ET.SubElement(case, "error", message=message[:500]).text = message
        attempt(lambda: _write_xml(Path(junit), suite))


def _write_xml(p: Path, root) -> None:
    import io
    import xml.etree.ElementTree as ET

    buf = io.BytesIO()
    ET.ElementTree(root).write(buf, encoding="utf-8", xml_declaration=True)
    atomic_write(p, buf.getvalue())


def write_junit(path: str, result: GateResult) -> None:
    """JUnit XML: one testcase per check, for CI dashboards."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name="parity gate", tests=str(len(result.checks)),
                       failures=str(sum(c.verdict == "fail" for c in result.checks)),
                       skipped=str(sum(c.verdict == "skip" for c in result.checks)),
                       time=str(result.meta.get("wall_time_s", 0)))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname="parity.gate", name=c.name)
        if c.verdict == "fail":
            ET.SubElement(case, "failure", message=c.detail[:500]).text = c.detail
        elif c.verdict == "skip":
            ET.SubElement(case, "skipped", message=c.detail)
        ET.SubElement(case, "system-out").text = "\n".join(
            f"{k}: {v}" for k, v in c.figures.items())
    p = Path(path)
    try:
        _write_xml(p, suite)
    except OSError as e:
        raise ParityError(f"{p}: cannot write JUnit file ({e.strerror or e})") from None
