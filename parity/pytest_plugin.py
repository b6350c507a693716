"""gpt-parity's pytest plugin, registered by entry point (`pytest11`): active wherever the package
is installed, no conftest needed.

- fixtures `parity_reference` (a callable: the float64 reference trace of a checkpoint for given
  inputs, cached per session; `parity.testing.reference_trace`) and `parity_golden`
  (`.check(trace_or_arrays, name, reference=...)` against a golden file beside the test;
  `parity/goldens/fixture.py`), with `--parity-update-golden=REASON` to make or remake the
  goldens of the tests that run;
- `pytest --parity-checkpoint DIR [--parity-golden F]... [--parity-policy P] [--parity-impl ...]`:
  the release gate (`parity gate`) runs once per session, at its start, and each of its check
  rows (`GateResult.checks`, whatever rows the gate has) becomes a test item `parity-gate::<check>`:
  a failing check fails with its detail and figures, a skipped one is a skip with its reason, a
  warning passes with a ParityWarning; the figures are the item's user properties (JUnit
  `<property>`). Bad input is a pytest usage error (exit 4) with the gate's one-line message.

It loads in every pytest run of its environment, so importing it costs nothing: pytest and the
standard library only; torch, NumPy and the engine are imported when a fixture or option is used.
"""
from __future__ import annotations

import warnings

import pytest

# the gate's subject and input options, mirrored as --parity-<name> with `parity gate`'s
# defaults (tests/test_pytest_plugin.py pins the mirror against parity/cli.py); --report and
# --junit are not mirrored: pytest's own --junitxml writes one testcase per check
GATE_OPTIONS = {
    "checkpoint": dict(metavar="DIR", default=None,
                       help="run the release gate on this checkpoint: every check a test item"),
    "golden": dict(action="append", default=[], metavar="FILE",
                   help="parity-golden/1 file for the gate (repeat)"),
    "policy": dict(default=None, metavar="FILE", help="budgets/policy TOML (default: built-in)"),
    "impl": dict(default="fast", help="gate subject: fast | hf"),
    "variant": dict(default="hf", help="gate subject's variant (hf, meg, sdpa, ...)"),
    "dtype": dict(default="float16", help="gate subject's dtype"),
    "device": dict(default="auto", help="gate subject's device: auto | cpu | cuda"),
    "emulate": dict(choices=("on", "off"), default=None,
                    help="CPU emulation of CUDA half precision (default on for half on a CPU)"),
    "prompts": dict(default=None, metavar="FILE",
                    help="gate prompts, one per line: 'ids: 46 290 318' or text"),
    "compile": dict(default="off", help="gate subject under torch.compile: off | inductor"),
    "max_new_tokens": dict(type=int, default=None, metavar="N",
                           help="tokens the gate's generation check decodes per prompt "
                                "(default 16; 0 skips it)"),
}
GATE_ITEM_PARENT = "parity-gate"


def pytest_addoption(parser):
    g = parser.getgroup("gpt-parity", "gpt-parity: numerics against the float64 reference")
    for name, kw in GATE_OPTIONS.items():
        g.addoption(f"--parity-{name.replace('_', '-')}", dest=f"parity_{name}", **kw)
    g.addoption("--parity-update-golden", dest="parity_update_golden", default=None,
                metavar="REASON", help="make or remake the golden files of the parity_golden "
                "checks that run, recording REASON in each file")


def pytest_configure(config):
    config._parity_written = []  # goldens written under --parity-update-golden
    config._parity_gate = None
    reason = config.getoption("parity_update_golden", None)
    if reason is not None and not reason.strip():
        raise pytest.UsageError("--parity-update-golden needs a reason: "
                                "--parity-update-golden='why the goldens change'")
    if config.getoption("parity_checkpoint", None) is None:
        given = [f"--parity-{n}" for n, kw in GATE_OPTIONS.items()
                 if n != "checkpoint" and config.getoption(f"parity_{n}") != kw["default"]]
        if given:
            raise pytest.UsageError(f"{', '.join(given)} needs --parity-checkpoint DIR")


def pytest_report_header(config):
    ckpt = config.getoption("parity_checkpoint", None)
    if ckpt is None:
        return None
    o = {n: config.getoption(f"parity_{n}") for n in GATE_OPTIONS}
    return (f"gpt-parity gate: {ckpt} ({o['impl']} {o['variant']} {o['dtype']} on "
            f"{o['device']}; goldens: {', '.join(o['golden']) or 'none'}; policy: "
            f"{o['policy'] or 'built-in'})")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def parity_reference():
    """`parity_reference(checkpoint_dir, input_ids, attention_mask=None, position_ids=None, *,
    sites=None, floor=None)` -> the float64 `reference.Trace` (or its rounding floor), computed
    once per session for the same checkpoint and inputs. Treat it as read-only: it is shared."""
    cache = {}

    def get(checkpoint, input_ids, attention_mask=None, position_ids=None, *, sites=None,
            floor=None):
        import os

        import numpy as np

        from parity.testing import reference_trace

        def key(x):
            if x is None:
                return None
            a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
            return a.shape, a.tobytes()

        path = os.path.realpath(checkpoint)
        stamp = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                             for e in os.scandir(path) if e.is_file())) \
            if os.path.isdir(path) else None
        k = (path, stamp, key(input_ids), key(attention_mask), key(position_ids),
             sites if sites is None or isinstance(sites, str) else tuple(sites), floor)
        if k not in cache:
            cache[k] = reference_trace(checkpoint, input_ids, attention_mask, position_ids,
                                       sites=sites, floor=floor)
        return cache[k]

    return get


@pytest.fixture
def parity_golden(request):
    """`.check(trace_or_arrays, name, reference=None)`: compare with the golden file
    `<test dir>/goldens/<module>/<test>.<name>.safetensors`; under
    `--parity-update-golden=REASON` make it (the tolerance measured against `reference`)."""
    from parity.goldens.fixture import GoldenChecker

    name = ".".join(request.node.nodeid.split("::")[1:])  # `TestClass.test_x[p]`: unique
    return GoldenChecker(test_file=request.node.path, test_name=name,
                         test_id=request.node.nodeid,
                         update_reason=request.config.getoption("parity_update_golden"),
                         written=request.config._parity_written)


# ----------------------------------------------------------------------------- gate items
class GateCheckFailed(Exception):
    """A gate check whose verdict is fail (its text is the failure report)."""


class GateCheckItem(pytest.Item):
    """One row of the gate's result as a test item."""

    def __init__(self, *, check, **kw):
        super().__init__(**kw)
        self.check = check
        self.user_properties.append(("verdict", check.verdict))
        self.user_properties.extend((str(k), str(v)) for k, v in check.figures.items())
        if check.verdict == "skip":  # reported at the item's own location, with the reason
            self.add_marker(pytest.mark.skip(reason=check.detail))

    def runtest(self):
        c = self.check
        if c.verdict == "skip":  # the skip marker normally ends the item before this
            pytest.skip(c.detail)
        if c.verdict == "fail":
            raise GateCheckFailed(self.text())
        if c.verdict == "warn":
            from parity.testing import ParityWarning

            warnings.warn(ParityWarning(f"{c.name}: {c.detail}"))

    def text(self) -> str:
        c = self.check
        lines = [f"parity gate check {c.name}: {c.verdict.upper()}", c.detail]
        lines += [f"  {k}: {v}" for k, v in c.figures.items()]
        return "\n".join(lines)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, GateCheckFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):  # shown as `parity-gate` in the progress line
        return (self.config.invocation_params.dir / GATE_ITEM_PARENT, 0,
                f"{GATE_ITEM_PARENT}::{self.name}")


class GateChecks(pytest.Collector):
    """The gate, run once at collection; one item per check row."""

    def collect(self):
        result = run_gate_once(self.config)
        return [GateCheckItem.from_parent(self, name=c.name, check=c) for c in result.checks]


def run_gate_once(config):
    """The gate's result for the session's options (a pytest usage error on bad input, with
    the gate's one-line message)."""
    if config._parity_gate is None:
        from parity.commands.gate import run_gate
        from parity.devices import normalize_dtype, resolve_device
        from parity.errors import ParityError

        o = {n: config.getoption(f"parity_{n}") for n in GATE_OPTIONS}
        try:
            config._parity_gate = run_gate(
                o["checkpoint"], goldens=o["golden"], policy_path=o["policy"], impl=o["impl"],
                variant=o["variant"], dtype=normalize_dtype(o["dtype"]),
                device=resolve_device(o["device"]),
                emulate=None if o["emulate"] is None else o["emulate"] == "on",
                prompts=o["prompts"], compile=o["compile"],
                max_new_tokens=o["max_new_tokens"])
        except ParityError as e:
            msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
            raise pytest.UsageError(f"parity gate: error: {msg}") from None
    return config._parity_gate


def pytest_sessionstart(session):
    """The gate runs before collection in the main process, so that bad input is a usage error
    (exit 4) and the verdict line is printed there under pytest-xdist too, whose controller
    collects nothing (each worker runs the gate again to make its items)."""
    if session.config.getoption("parity_checkpoint", None) is not None \
            and not hasattr(session.config, "workerinput"):
        run_gate_once(session.config)


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, which then applies to gate items
def pytest_collection_modifyitems(session, config, items):
    if config.getoption("parity_checkpoint", None) is None:
        return
    run_gate_once(config)  # bad input: a usage error here, not a collection error
    collector = GateChecks.from_parent(session, name=GATE_ITEM_PARENT, nodeid=GATE_ITEM_PARENT)
    rep = collector.ihook.pytest_make_collect_report(collector=collector)
    collector.ihook.pytest_collectreport(report=rep)  # counted and shown like collected tests
    items.extend(x for x in rep.result if isinstance(x, pytest.Item))


def pytest_terminal_summary(terminalreporter, config):
    gate = getattr(config, "_parity_gate", None)
    if gate is not None:
        terminalreporter.write_sep("-", "parity gate")
        terminalreporter.write_line(f"verdict: {gate.verdict_line}")
    for path, reason in getattr(config, "_parity_written", []):
        terminalreporter.write_line(f"parity: wrote golden {path} ({reason})")
