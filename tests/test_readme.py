"""The README's Quick start is a contract: exactly two command lines in one fenced block, the
first runs `parity report`, the second the tests; CI runs that same test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S)
    assert block, "no fenced block under ## Quick start"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_quick_start_has_exactly_two_lines():
    lines = quick_start_lines()
    assert len(lines) == 2, lines
    assert lines[0].rstrip().endswith("parity report")
    assert "pytest" in lines[1]


def test_ci_runs_the_readme_test_command():
    test_cmd = quick_start_lines()[1].split("&& ", 3)[-1]  # after venv creation and activation
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f"{test_cmd!r} not in .ci/run"


def fenced_blocks(after: str) -> list[str]:
    """The fenced code blocks of the README section that starts with `after` (a heading)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(after, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```[a-z]*\n(.*?)```", section, re.S)


def test_the_hidden_states_table_is_the_registry_mapping():
    """The golden recipe's per-family table of transformers' hidden_states (the registry's
    `hf_hidden_state_sites`, itself held against transformers in test_reference_vs_hf)."""
    import reference

    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| ([a-z_0-9, -]+) \| `embed` \| `([^`]+)` \| `([^`]+)` \|$", text, re.M)
    covered = set()
    for names, middle, last in rows:
        for name in names.split(", "):
            covered.add(name)
            n = 4
            want = reference.family(name).hf_hidden_state_sites(n)
            got = (["embed"] + [middle.replace("{i-1}", str(i - 1)) for i in range(1, n)]
                   + [last.replace("{n-1}", str(n - 1))])
            assert got == want, name
    assert covered == set(reference.FAMILIES)


def test_the_synopsis_token_ids_fit_the_checkpoints_that_checkpoint_make_writes():
    from parity.checkpoints import recipes

    vocab = min(c["vocab_size"] for c in recipes.TINY.values())
    text = (ROOT / "README.md").read_text()
    examples = re.findall(r'--tokens "([^"]+)"', text) + re.findall(r"`ids: ([\d ]+)`", text)
    assert examples
    for example in examples:
        ids = [int(t) for t in example.replace("...", "").split()]
        assert ids and max(ids) < vocab, example


def test_the_golden_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's 'Writing a golden from another framework' in order: its Python block (with
    a checkpoint made by `parity checkpoint make` at path/to/ckpt), then every command line of
    the section, each exiting 0."""
    import shlex

    pytest = __import__("pytest")
    pytest.importorskip("transformers", reason="the recipe uses transformers (the [hf] extra)")
    from parity import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["checkpoint", "make", "--family", "gpt2", "--out", "path/to/ckpt"]) == 0
    python, commands = fenced_blocks("### Writing a golden from another framework")[:2]
    exec(compile(python, "README.md", "exec"), {})
    lines = [ln for ln in commands.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "parity"
        rc = cli.main(argv[1:] + (["--device", "cpu"] if argv[1] == "gate" else []))
        out = capsys.readouterr().out
        assert rc == 0, (line, out)


@__import__("pytest").mark.cpu_kernels
def test_the_stress_findings_table_is_what_the_report_finds():
    """Every stress subject that does not pass, as the README's table lists it (family, preset,
    dtype, verdict, first divergent site), and no other: the report's own run, stress half."""
    from parity.reports.analysis import subject_table
    from parity.reports.run import run_report

    text = (ROOT / "README.md").read_text()
    dt = {"fp16": "float16", "bf16": "bfloat16"}
    table = {(f, p, dt[d], v.lower(), site) for f, p, d, v, site in re.findall(
        r"^\| ([a-z_0-9-]+) \| ([a-z-]+) \| (fp16|bf16) \| ([A-Z]+) \| ([a-z0-9_.]+) \|", text,
        re.M)}
    assert table
    div, _, _ = run_report(checkpoints=("stress",), attribution=False)
    subj = subject_table(div, None)
    found = {(r.family, r.variant, r.dtype, r.verdict, r.first_accumulated)
             for r in subj.itertuples() if r.verdict != "pass"}
    assert found == table, (sorted(found - table), sorted(table - found))


def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
    from parity import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["checkpoint", "make", "--family", "gpt2", "--out", "path/to/ckpt"]) == 0
    (block,) = fenced_blocks("### From Python")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    df = scope["df"]
    assert set(df["variant"]) == {"hf", "meg"} and len(df) > 0
