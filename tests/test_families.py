"""The family registry (`reference.families`) is complete and is the only place that names families.

- every family has one entry, every entry one reference module, recipe presets and the pieces
  built from it (fast path, HF adapter taps, knob presets), and the other way round;
- each entry's facts are well-formed and agree with what its reference module independently says
  (the checkpoint names and shapes of `param_shapes`);
- no source file in parity/ or reference/ (outside the registry and the per-family modules)
  compares a value with a family-name literal or keeps a per-family table of its own: behaviour
  that differs between families branches on a registry fact.
"""
from __future__ import annotations

import ast
import dataclasses
import pkgutil
from pathlib import Path

import numpy as np
import pytest

import reference
from parity.subjects import knobs
from parity.checkpoints import recipes
from parity.checkpoints.checkpoint import load_checkpoint
from parity.errors import ParityError
from parity.subjects.fast import SCALES, FastModel
from reference import families
from reference.families import FAMILIES, REGISTRY, Family, UnknownFamily, family
from reference.ops import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]
# fields that may be None for a family (no learned positions, no rotary, a class of its own)
OPTIONAL = {"pos", "rotary", "hf_stand_in"}
# per-family tables allowed outside the registry: the recipe presets (a new family = a reference
# module + a registry entry + its recipe)
TABLES_ALLOWED = {"parity/checkpoints/recipes.py"}


def _tiny_cfg(name):
    return reference.parse_config(recipes.make_config(name, "tiny"))


# ----------------------------------------------------------------------------- completeness
def test_registry_lists_every_family_once_in_order():
    assert FAMILIES == reference.FAMILIES == tuple(REGISTRY)
    assert len(set(FAMILIES)) == len(FAMILIES)
    for name, fam in REGISTRY.items():
        assert fam.name == name


def test_every_reference_module_has_an_entry_and_every_entry_a_module():
    pkg = Path(reference.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(pkg)])}
    named = {family(f).module for f in FAMILIES}
    shared = {"config", "dtypes", "families", "model", "ops", "sites", "trace", "tokenizers",
              "tokenizer_unicode"}
    assert modules - shared == named, (
        f"modules without an entry: {sorted(modules - shared - named)}, "
        f"entries without a module: {sorted(named - modules)}")
    for f in FAMILIES:
        assert reference.family_module(f).__name__ == f"reference.{family(f).module}"


@pytest.mark.parametrize("name", FAMILIES)
def test_every_field_is_stated(name):
    """No entry leaves a fact empty: only the fields in OPTIONAL may be None."""
    fam = family(name)
    for f in dataclasses.fields(Family):
        v = getattr(fam, f.name)
        if f.name not in OPTIONAL:
            assert v is not None and v != "", f"{name}: {f.name} is not stated"
    assert set(fam.defaults) == {"vocab_size", "n_positions", "d_model", "n_layer", "n_head"}, name
    assert set(fam.config_keys) == set(families.GPT2_CONFIG_KEYS), name


def test_entries_are_built_by_keyword():
    with pytest.raises(TypeError):
        Family("x", "x", "XLMHeadModel", ("eager",))  # noqa - positional on purpose


def test_unknown_family_is_a_clear_error():
    with pytest.raises(UnknownFamily, match=r"unknown family 'gpt5' \(known: openai-gpt, gpt2"):
        family("gpt5")
    with pytest.raises(ParityError, match="gpt5"):
        knobs.resolve("hf", "gpt5")


# ----------------------------------------------------------------------------- well-formed facts
@pytest.mark.parametrize("name", FAMILIES)
def test_facts_are_well_formed(name):
    fam = family(name)
    assert fam.block in families.BLOCK_KINDS
    assert fam.block_sites == {"pre": families.PRE_LN, "post": families.POST_LN,
                               "parallel": families.PARALLEL_2LN if len(fam.ln) == 2
                               else families.PARALLEL}[fam.block]
    assert fam.qkv_layout in families.QKV_LAYOUTS
    assert fam.rotary_config in families.ROTARY_CONFIGS
    if fam.block_switch:  # (config key, default): false switches to the pre-LN block
        key, default = fam.block_switch
        assert isinstance(key, str) and isinstance(default, bool) and len(fam.ln) == 2
        assert fam.sites_for("pre") == families.PRE_LN
    for canonical, stored in fam.hf_names.items():  # the renaming round-trips
        assert fam.canonical_key(fam.hf_key(f"h.0.{canonical}.weight")) == f"h.0.{canonical}.weight"
    assert fam.scale in families.SCALE_RULES and fam.scale in SCALES
    assert fam.rotary in families.ROTARY_STYLES
    assert len(fam.qkv) in (1, 3)
    assert set(fam.ln) <= set(fam.block_sites)
    assert fam.activation in ACTIVATIONS
    assert set(fam.activation_aliases.values()) <= set(ACTIVATIONS)
    assert "eager" in fam.hf_attn_implementations
    assert fam.hf_scale_op in knobs.CHOICES["scale_op"]
    assert fam.hf_mask_fill in knobs.CHOICES["mask_fill"]
    assert fam.tokenizer in ("byte-level", "bert-bpe")
    for a, b in fam.report_pairs:
        knobs.parse_variant(a, name), knobs.parse_variant(b, name)
    if fam.hf_stand_in is not None:
        assert len(fam.hf_stand_in) == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_names_agree_with_the_reference_module(name):
    """The registry's checkpoint names, biases and weight layout against the shapes the family's
    reference module declares (two independent statements of the same facts)."""
    cfg = _tiny_cfg(name)
    fam = family(name)
    shapes = reference.param_shapes(cfg)
    d, f, V = cfg.d_model, cfg.d_inner, cfg.vocab_size
    assert shapes[fam.tok + ".weight"] == (V, d)
    if fam.pos is not None:
        assert shapes[fam.pos + ".weight"] == (cfg.n_positions, d)
    outside = {k for k in shapes if not k.startswith(("h.", "ln_f.", fam.lm_head + "."))}
    assert outside == set(fam.embeddings)

    def io(n_in, n_out):  # Conv1D [in, out], nn.Linear [out, in]
        return (n_in, n_out) if fam.conv1d else (n_out, n_in)

    p = "h.0."
    for ln in fam.ln:
        assert shapes[p + ln + ".weight"] == (d,)
    assert {k.split(".")[2] for k in shapes
            if k.startswith(p) and k.split(".")[2].startswith("ln_")} == set(fam.ln)
    if fam.fused_qkv:
        assert shapes[p + fam.qkv[0] + ".weight"] == io(d, 3 * d)
    else:
        for q in fam.qkv:
            assert shapes[p + q + ".weight"] == io(d, d)
    for q in fam.qkv:
        assert (p + q + ".bias" in shapes) == fam.qkv_bias
    assert shapes[p + fam.out_proj + ".weight"] == io(d, d)
    assert (p + fam.out_proj + ".bias" in shapes) == fam.out_bias
    assert shapes[p + fam.fc_in + ".weight"] == io(d, f)
    assert shapes[p + fam.fc_out + ".weight"] == io(f, d)
    assert ("ln_f.weight" in shapes) == fam.ln_f
    assert (fam.lm_head + ".bias" in shapes) == fam.lm_head_bias
    assert cfg.tie_word_embeddings == fam.tie_default  # the tiny recipes keep the default
    assert (fam.lm_head + ".weight" in shapes) == (not fam.tie_default)
    for buf in fam.legacy_buffers:
        assert p + buf not in shapes


@pytest.mark.parametrize("name", FAMILIES)
def test_config_facts_reach_the_parsed_config(name):
    fam = family(name)
    cfg = reference.parse_config({"model_type": name, **(
        {"attention_types": [[["global", "local"], 12]]} if fam.windowed else {})})
    assert cfg.vocab_size == fam.defaults["vocab_size"]
    assert cfg.n_positions == fam.defaults["n_positions"]
    assert (cfg.d_model, cfg.n_layer, cfg.n_head) == tuple(
        fam.defaults[k] for k in ("d_model", "n_layer", "n_head"))
    assert cfg.activation == fam.activation
    assert cfg.tie_word_embeddings == fam.tie_default
    assert (cfg.rotary_dim is not None) == bool(fam.rotary)
    assert bool(cfg.attention_layers) == fam.windowed


# ----------------------------------------------------------------------------- consumers
@pytest.mark.parametrize("name", FAMILIES)
def test_every_recipe_preset_exists(name, tmp_path):
    assert set(recipes.TINY) == set(recipes.FULL_WIDTH) == set(FAMILIES)
    for preset in recipes.PRESETS:
        raw = recipes.make_config(name, preset, layers=3)
        assert raw["model_type"] == name
        assert reference.parse_config(raw).n_layer == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_path_and_knob_presets_build(name, tiny_checkpoints):
    ckpt = load_checkpoint(tiny_checkpoints[name])
    for preset in knobs.PRESETS:
        knobs.resolve(preset, name, ckpt.config)
    model = FastModel(ckpt, "hf", dtype="float32")
    assert model.fam is family(name)
    trace = model.forward(np.arange(6)[None, :])
    assert list(trace.sites) == reference.site_names(name, ckpt.config.n_layer)


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_adapter_taps_cover_the_family(name, tiny_checkpoints):
    pytest.importorskip("transformers")
    from parity.subjects import hf_adapter

    taps = hf_adapter.taps(family(name))
    missing = set(family(name).block_sites) - set(taps)
    # q after rotary never leaves HF's attention function; everything else is tapped
    assert missing == ({"attn.q"} if family(name).rotary else set()), name
    model, impl = hf_adapter.load(load_checkpoint(tiny_checkpoints[name]), "float32")
    assert impl == "eager"
    _body, layers = hf_adapter.blocks_of(model, family(name))
    for kind, (path, _how) in taps.items():
        if path:
            layers[0].get_submodule(path)  # the module exists in transformers


# ----------------------------------------------------------------------------- no name branches
def _family_literals(node) -> list[str]:
    return [x.value for x in ast.walk(node) if isinstance(x, ast.Constant) and x.value in FAMILIES]


def _family_name_uses(path: Path, rel: str | None = None) -> list[str]:
    """Comparisons with family-name literals (`== "gptj"`, `in ("gpt2", "gptmeg")`, match
    cases) and dict literals keyed by family names, as 'file:line: code'."""
    rel = rel or path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Compare):
            hit = bool(_family_literals(node))
        elif isinstance(node, ast.match_case):
            hit = bool(_family_literals(node.pattern))
        elif isinstance(node, ast.Dict) and rel not in TABLES_ALLOWED:
            hit = any(isinstance(k, ast.Constant) and k.value in FAMILIES for k in node.keys)
        if hit:
            out.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return out


def _sources():
    per_family = {family(f).module + ".py" for f in FAMILIES} | {"families.py"}
    for folder in ("parity", "reference"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if folder == "reference" and p.name in per_family:
                continue
            yield p


def test_no_branch_on_a_family_name_outside_the_registry():
    found = [u for p in _sources() for u in _family_name_uses(p)]
    assert not found, ("branch on a registry fact (reference/families.py) instead of a family "
                       "name:\n" + "\n".join(found))


def test_the_name_scan_can_fail(tmp_path):
    """The scan above catches the forms it looks for."""
    bad = tmp_path / "probe.py"
    bad.write_text('def f(fam):\n    if fam == "gptj":\n        return 1\n'
                   '    return {"gpt2": 1}.get(fam, fam in ("gpt_neo",))\n')
    found = _family_name_uses(bad, "parity/probe.py")
    assert [u.split(":")[1] for u in found] == ["2", "4", "4"]
