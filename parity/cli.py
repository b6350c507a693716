"""`parity`: the command line (DESIGN.md "Command line").

Exit codes for every command: 0 pass / done; 1 a verdict of divergence over budget; 2 bad input,
usage error or internal error (one line `error: ...`, a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from parity.devices import resolve_device
from parity.errors import ParityError
from parity.files import run_folder_name

EXIT_OK, EXIT_DIVERGED, EXIT_ERROR = 0, 1, 2
# parity.subjects.compiled.SPECS (not imported here: it would load torch for `parity --help`;
# tests/test_compiled.py pins the two equal)
COMPILE_CHOICES = ("off", "inductor", "inductor+emulate_precision_casts")
COMPILE_HELP = ("off | inductor: run the subject under torch.compile (Inductor, its real dtype; "
                "inductor+emulate_precision_casts keeps the half roundings between fused ops)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        raise ParityError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="parity", description="numerical parity of GPT-family checkpoints")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser("trace", help="run one implementation and write a parity-golden/1 file")
    t.add_argument("checkpoint")
    t.add_argument("--impl", default="reference", help="reference | fast | hf")
    t.add_argument("--variant", default=None, help="fast-path preset (hf, meg, sdpa, ...)")
    t.add_argument("--dtype", default=None, help="float64 | float32 | float16 | bfloat16")
    t.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    t.add_argument("--emulate", choices=("on", "off"), default=None,
                   help="CPU emulation of CUDA half precision (default on for half on a CPU)")
    t.add_argument("--compile", default="off", choices=COMPILE_CHOICES, metavar="MODE",
                   help=COMPILE_HELP)
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help='token ids, e.g. "464 3290 318"; rows separated by ";"')
    src.add_argument("--text", help="text, tokenized with the checkpoint's tokenizer files")
    src.add_argument("--inputs", help="safetensors file with input_ids [, attention_mask, position_ids]")
    t.add_argument("--sites", default=None, help="glob(s) of sites to keep, comma separated")
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    r = sub.add_parser("report", help="every family x preset x dtype on the embedded checkpoints")
    r.add_argument("--families", nargs="+", default=None)
    r.add_argument("--variants", nargs="+", default=None)
    r.add_argument("--dtypes", nargs="+", default=None)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument("--compile", default="off", choices=COMPILE_CHOICES, metavar="MODE",
                   help="inductor: compiled subjects beside the eager ones (default off)")
    r.add_argument("--out", default=None, help="report folder (default reports/<run-id>)")
    r.add_argument("--no-attribution", action="store_true", help="skip the per-knob attribution")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    g = sub.add_parser("gate", help="release gate: may this checkpoint ship, run the fast way?")
    g.add_argument("checkpoint")
    g.add_argument("--golden", action="append", default=[], help="parity-golden/1 file (repeat)")
    g.add_argument("--policy", default=None, help="budgets/policy TOML (default: built-in)")
    g.add_argument("--impl", default="fast", help="fast | hf")
    g.add_argument("--variant", default="hf")
    g.add_argument("--dtype", default="float16")
    g.add_argument("--device", default="auto")
    g.add_argument("--emulate", choices=("on", "off"), default=None)
    g.add_argument("--compile", default="off", choices=COMPILE_CHOICES, metavar="MODE",
                   help=COMPILE_HELP)
    g.add_argument("--prompts", default=None, help="one prompt per line: text or token ids")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens the generation check greedy-decodes per prompt (default 16; "
                        "0 skips the check; models over 1e9 weights with --impl fast skip the "
                        "cache, batch and generation rows unless it is given)")
    g.add_argument("--report", default=None, help="report folder (default reports/gate-<time>)")
    g.add_argument("--junit", default=None, help="write a JUnit XML file for CI dashboards")
    g.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    _add_golden(sub)
    _add_search(sub)
    _add_detection(sub)

    k = sub.add_parser("tokenizer", help="the reference tokenizer against the checkpoint's "
                                         "tokenizer files (or regenerate the Unicode pins)")
    k.add_argument("checkpoint", nargs="?", help="checkpoint folder with tokenizer files")
    k.add_argument("--texts", help="a UTF-8 file, one text per line (default: built-in set)")
    k.add_argument("--write-unicode-pins", action="store_true",
                   help="regenerate reference/tokenizer_unicode.py from the installed tokenizers")
    k.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    c = sub.add_parser("checkpoint", help="checkpoint utilities")
    csub = c.add_subparsers(dest="checkpoint_command", parser_class=_Parser)
    m = csub.add_parser("make", help="write a seeded random checkpoint in HF layout")
    m.add_argument("--family", required=True)
    m.add_argument("--preset", default="tiny")
    m.add_argument("--layers", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default=None, help="storage dtype (default fp32 tiny, fp16 full-width)")
    m.add_argument("--out", required=True)
    m.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _add_golden(subparsers) -> argparse.ArgumentParser:
    """`parity golden check|update` on the CLI's subparsers."""
    g = subparsers.add_parser("golden", help="check or regenerate the golden activation files")
    g.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    gs = g.add_subparsers(dest="golden_command", parser_class=type(g))
    c = gs.add_parser("check", help="regenerate every golden in memory and compare")
    c.add_argument("--families", nargs="+", default=None)
    c.add_argument("--dir", default=None, help="golden folder (default: golden/ of the source checkout)")
    c.add_argument("--show-drift", action="store_true",
                   help="per-site drift of every golden (shown anyway when the torch (fast path) "
                        "or numpy (reference) version differs from the golden's)")
    c.add_argument("--file", action="append", default=None, metavar="FILE",
                   help="check a parity-golden/1 file (from any system) against the float64 "
                        "reference on --checkpoint instead of the golden folder (repeatable)")
    c.add_argument("--checkpoint", default=None, help="checkpoint directory for --file")
    c.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    u = gs.add_parser("update", help="regenerate the goldens (atomic; manifest last)")
    u.add_argument("--families", nargs="+", default=None)
    u.add_argument("--classes", nargs="+", default=None,
                   help="device classes to generate (default: every class of this machine)")
    u.add_argument("--reason", default="", help="why (kept in MANIFEST.json's history)")
    u.add_argument("--dir", default=None, help="golden folder (default: golden/ of the source checkout)")
    u.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return g


def _add_detection(subparsers) -> argparse.ArgumentParser:
    """`parity detection` on the CLI's subparsers."""
    p = subparsers.add_parser("detection", help="detection power: the mutant catalogue against "
                                                "the budgets")
    p.add_argument("--families", nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--mutants", nargs="+", default=None, help="catalogue names (default: all)")
    p.add_argument("--out", default="reports/detection", help="folder (default reports/detection)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _add_search(subparsers) -> argparse.ArgumentParser:
    """`parity search` on the CLI's subparsers."""
    p = subparsers.add_parser("search", help="worst-case search: where does a preset diverge most?")
    p.add_argument("--family", required=True)
    p.add_argument("--variant", default="hf", help="fast-path variant (hf, meg, sdpa, ...)")
    p.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32")
    p.add_argument("--preset", default="tiny", help="checkpoint recipe preset: tiny | stress")
    p.add_argument("--layers", type=int, default=None, help="layers of the recipe checkpoint")
    p.add_argument("--max-examples", type=int, default=100, help="examples in this shard")
    p.add_argument("--shard", default="1/1", help="i/n: this shard of n (1-based)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--max-log2-scale", type=int, default=8,
                   help="weight groups are scaled by 2^k, k in [0, this]; 0 = no scaling")
    p.add_argument("--max-len", type=int, default=32, help="longest token batch drawn")
    p.add_argument("--top", type=int, default=3, help="worst cases written as reproducers")
    p.add_argument("--out", default=None, help="output folder (default reports/search/<run>)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def cmd_trace(a) -> int:
    from parity import subjects
    from parity.checkpoints.checkpoint import load_checkpoint
    from parity.goldens.io import write_golden
    from parity.checkpoints.inputs import load_inputs, parse_tokens, tokenize, validate_inputs

    ckpt = load_checkpoint(a.checkpoint, check_values=False)
    if a.tokens is not None:
        inp, source = parse_tokens(a.tokens), "--tokens"
    elif a.inputs is not None:
        inp, source = load_inputs(a.inputs), a.inputs
    else:
        inp, source = tokenize(Path(a.checkpoint), [a.text]), "--text"
    validate_inputs(inp, ckpt.config, source)
    dtype = a.dtype or ("float64" if a.impl == "reference" else "float16")
    emulate = None if a.emulate is None else a.emulate == "on"
    if a.sites is not None:  # a pattern that matches no site is a typo, not an empty request
        from fnmatch import fnmatchcase

        import reference

        names = reference.site_names(ckpt.config.family, ckpt.config.n_layer,
                                     ckpt.config.block)
        dead = [p for p in a.sites.split(",") if p and not any(fnmatchcase(n, p) for n in names)]
        if dead:
            raise ParityError(f"--sites: {', '.join(map(repr, dead))} matches no site of this "
                              f"{ckpt.config.family} model (e.g. {names[1]}, "
                              f"blocks.*.{ckpt.config.block_sites[-1]}, logits)")
    trace = subjects.run(a.impl, ckpt, inp, variant=a.variant, dtype=dtype,
                         device=resolve_device(a.device), emulate=emulate, sites=a.sites,
                         compile=a.compile)
    trace.explicit_positions = inp.position_ids is not None
    meta = {
        "family": ckpt.config.family,
        "producer": trace.meta.get("producer", f"gpt-parity {a.impl}"),
        "dtype": trace.meta.get("dtype", dtype),
        "device": trace.meta.get("device", "cpu"),
        "config_sha256": ckpt.config.sha256(),
        "created": _now(),
        **{k: v for k, v in trace.meta.items() if k not in ("producer", "dtype", "device")},
    }
    out = write_golden(a.out, trace, meta)
    print(f"wrote {out}: {len(trace.sites)} sites, logits {list(trace.logits.shape)}, "
          f"{a.impl} {meta['dtype']}")
    return EXIT_OK


def cmd_report(a) -> int:

    from parity.reports.render import terminal_summary, write_report
    from parity.reports.run import exit_code, run_report
    from parity.subjects import normalize_dtype

    console = _console()
    device = resolve_device(a.device)
    dtypes = [normalize_dtype(d) for d in a.dtypes] if a.dtypes else None
    out = Path(a.out) if a.out else Path("reports") / run_folder_name("report")
    _check_writable(out)
    with console.status("parity report: starting") as status:
        div, attr, run = run_report(a.families, a.variants, dtypes, device,
                                    attribution=not a.no_attribution, compile=a.compile,
                                    progress=lambda msg: status.update(f"parity report: {msg}"))
    files = write_report(out, div, attr, run, title="gpt-parity report")
    console.print(terminal_summary(div, attr))
    console.print(f"report written to {out}/ ({', '.join(sorted(p.name for p in files.values()))})"
                  f" in {run['wall_time_s']} s")
    return exit_code(div)


LOG_WIDTH = 200  # columns when stdout is not a terminal (a CI log): tables are read in full


def _console():
    """A rich Console; on a terminal its own width, elsewhere (CI logs, pipes) LOG_WIDTH, so
    that no table cell is cut to "opena…" at rich's default of 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=LOG_WIDTH)


def _check_writable(out: Path, what: str = "report folder") -> None:
    """Before any work: the folder `what` goes to can be written: an existing folder takes a
    probe file, a new one needs a writable nearest existing parent (nothing is created here, so
    a run that fails leaves no empty folder behind)."""
    if out.exists() and not out.is_dir():
        raise ParityError(f"{out}: the {what} is a file, not a folder")
    at = out
    while not at.exists():
        at = at.parent
    if not at.is_dir():
        raise ParityError(f"{out}: cannot create the {what} ({at} is a file)")
    probe = at / f".parity-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ParityError(f"{out}: the {what} is not writable ({e.strerror or e})") from None


def cmd_gate(a) -> int:
    from parity.subjects import normalize_dtype

    out = Path(a.report) if a.report else Path("reports") / run_folder_name("gate")
    _check_writable(out)
    if a.junit:  # before the run: an unwritable JUnit path must not follow a PASS report
        if Path(a.junit).is_dir():
            raise ParityError(f"{a.junit}: --junit names a folder, not a file")
        _check_writable(Path(a.junit).parent, "folder of the --junit file")
    try:
        device = resolve_device(a.device)
        return _gate(a, out, device, normalize_dtype(a.dtype))
    except BaseException as e:
        # every exit path leaves files that say what happened: never an earlier run's PASS
        from parity.commands.gate import write_error_artifacts

        write_error_artifacts(out, a.junit, f"error: {_one_line(e)}" if isinstance(
            e, ParityError) else f"error: internal error: {type(e).__name__}: {_one_line(e)}")
        raise


def _gate(a, out: Path, device: str, dtype: str) -> int:
    from rich.table import Table

    from parity.commands.gate import run_gate, write_junit
    from parity.reports.render import write_report

    console = _console()
    with console.status("parity gate: starting") as status:
        result = run_gate(a.checkpoint, a.golden, a.policy, a.impl, a.variant, dtype, device,
                          None if a.emulate is None else a.emulate == "on", a.prompts,
                          progress=lambda msg: status.update(f"parity gate: {msg}"),
                          max_new_tokens=a.max_new_tokens, compile=a.compile)
    from parity.reports.run import environment

    run = {"command": "parity " + " ".join(a.argv), "verdict": result.verdict,
           "verdict_line": result.verdict_line, "not_checked": result.unchecked,
           "checks": [c.as_dict() for c in result.checks],
           "subject": {k: str(v) for k, v in result.meta.items()},
           "environment": environment(device)}
    write_report(out, result.divergence if len(result.divergence) else _empty_divergence(),
                 None, run, title=f"gpt-parity gate: {a.checkpoint}",
                 checks=[c.as_dict() for c in result.checks], generation=result.generation)
    if a.junit:
        write_junit(a.junit, result)
    t = Table(title=f"parity gate {a.checkpoint}")
    for col in ("check", "verdict", "detail"):
        t.add_column(col, overflow="fold")
    style = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    for c in result.checks:
        t.add_row(c.name, f"[{style[c.verdict]}]{c.verdict.upper()}[/]", c.detail)
    console.print(t)
    console.print(f"verdict: [{style[result.verdict]}]{result.verdict_line}[/]  "
                  f"(report: {out}/)", markup=True, highlight=False)
    return result.exit_code


def _empty_divergence():
    from parity.engine.compare import to_frame

    return to_frame([])


def cmd_checkpoint(a) -> int:
    from parity.checkpoints.recipes import make_checkpoint

    if a.checkpoint_command != "make":
        raise ParityError("parity checkpoint: expected 'make'")
    out = make_checkpoint(a.family, a.out, preset=a.preset, layers=a.layers, seed=a.seed,
                          dtype=a.dtype)
    print(f"wrote {a.family} ({a.preset}, seed {a.seed}) checkpoint to {out}")
    return EXIT_OK


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_golden(a) -> int:
    from parity.goldens.check import cmd_golden as run

    return run(a)


def cmd_search(a) -> int:
    from parity.commands.search import cmd_search as run

    return run(a)


def cmd_detection(a) -> int:
    from parity.commands.detection import cmd_detection as run

    return run(a)


def cmd_tokenizer(a) -> int:
    from parity.checkpoints.tokenizer_check import cmd_tokenizer as run

    return run(a)


COMMANDS = {"trace": cmd_trace, "report": cmd_report, "gate": cmd_gate, "golden": cmd_golden,
            "search": cmd_search, "detection": cmd_detection, "checkpoint": cmd_checkpoint,
            "tokenizer": cmd_tokenizer}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        a = build_parser().parse_args(argv)
        a.argv = list(argv)
        if not a.command:
            raise ParityError("parity: no command given (try parity --help)")
        return COMMANDS[a.command](a)
    except ParityError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - internal errors: still one line, exit 2
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug)",
              file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    """The message on one line: wrapped library errors (torch, safetensors) may span several."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
