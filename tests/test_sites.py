"""The site-naming scheme (DESIGN.md "Sites") is pinned here, family by family.

The expected lists below are written out by hand from DESIGN.md for a 2-layer model (post-LN
OpenAI GPT in its execution order: the LayerNorms follow the residual sums; GPT-J's parallel
block has one LN and no resid_mid). They are the independent check of `reference.sites` and of
what `reference.forward` records. Also: `sites=` globs, the registry of family modules, and that
importing `reference` pulls in neither torch nor transformers.
"""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
from reference.sites import site_names

PRE_LN_2 = [
    "embed",
    "blocks.0.ln_1", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
    "blocks.0.attn.scores", "blocks.0.attn.probs", "blocks.0.attn.context", "blocks.0.attn.out",
    "blocks.0.resid_mid", "blocks.0.ln_2",
    "blocks.0.mlp.fc_in", "blocks.0.mlp.act", "blocks.0.mlp.out", "blocks.0.resid_post",
    "blocks.1.ln_1", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v",
    "blocks.1.attn.scores", "blocks.1.attn.probs", "blocks.1.attn.context", "blocks.1.attn.out",
    "blocks.1.resid_mid", "blocks.1.ln_2",
    "blocks.1.mlp.fc_in", "blocks.1.mlp.act", "blocks.1.mlp.out", "blocks.1.resid_post",
    "ln_f", "logits",
]
POST_LN_2 = [  # OpenAI GPT: n = LN1(h + attn); out = LN2(n + mlp); no ln_f
    "embed",
    "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
    "blocks.0.attn.scores", "blocks.0.attn.probs", "blocks.0.attn.context", "blocks.0.attn.out",
    "blocks.0.resid_mid", "blocks.0.ln_1",
    "blocks.0.mlp.fc_in", "blocks.0.mlp.act", "blocks.0.mlp.out", "blocks.0.resid_post",
    "blocks.0.ln_2",
    "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v",
    "blocks.1.attn.scores", "blocks.1.attn.probs", "blocks.1.attn.context", "blocks.1.attn.out",
    "blocks.1.resid_mid", "blocks.1.ln_1",
    "blocks.1.mlp.fc_in", "blocks.1.mlp.act", "blocks.1.mlp.out", "blocks.1.resid_post",
    "blocks.1.ln_2",
    "logits",
]
PARALLEL_2 = [  # GPT-J: one LN feeds both branches; resid_post = attn + mlp + h
    "embed",
    "blocks.0.ln_1", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
    "blocks.0.attn.scores", "blocks.0.attn.probs", "blocks.0.attn.context", "blocks.0.attn.out",
    "blocks.0.mlp.fc_in", "blocks.0.mlp.act", "blocks.0.mlp.out", "blocks.0.resid_post",
    "blocks.1.ln_1", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v",
    "blocks.1.attn.scores", "blocks.1.attn.probs", "blocks.1.attn.context", "blocks.1.attn.out",
    "blocks.1.mlp.fc_in", "blocks.1.mlp.act", "blocks.1.mlp.out", "blocks.1.resid_post",
    "ln_f", "logits",
]
PARALLEL_TWO_LN_2 = [  # GPT-NeoX: ln_1 feeds attention, ln_2 (of the same h) the MLP;
    # resid_post = mlp + attn + h; no resid_mid (both LNs read the block input)
    "embed",
    "blocks.0.ln_1", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
    "blocks.0.attn.scores", "blocks.0.attn.probs", "blocks.0.attn.context", "blocks.0.attn.out",
    "blocks.0.ln_2", "blocks.0.mlp.fc_in", "blocks.0.mlp.act", "blocks.0.mlp.out",
    "blocks.0.resid_post",
    "blocks.1.ln_1", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v",
    "blocks.1.attn.scores", "blocks.1.attn.probs", "blocks.1.attn.context", "blocks.1.attn.out",
    "blocks.1.ln_2", "blocks.1.mlp.fc_in", "blocks.1.mlp.act", "blocks.1.mlp.out",
    "blocks.1.resid_post",
    "ln_f", "logits",
]
EXPECTED_2_LAYERS = {
    "openai-gpt": POST_LN_2,
    "gpt2": PRE_LN_2,
    "gptmeg": PRE_LN_2,
    "gpt_neo": PRE_LN_2,
    "gptj": PARALLEL_2,
    "gpt_neox": PARALLEL_TWO_LN_2,
}

# 2-layer configs: 3 heads of width 8, inner 40, vocab 50 (shapes below are checked against them)
D, H, F, V = 24, 3, 40, 50
CONFIGS = {
    "openai-gpt": dict(model_type="openai-gpt", vocab_size=V, n_positions=16, n_embd=D,
                       n_layer=2, n_head=H, n_inner=F),
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_positions=16, n_embd=D, n_layer=2, n_head=H,
                 n_inner=F),
    "gptmeg": dict(model_type="gptmeg", vocab_size=V, n_positions=16, n_embd=D, n_layer=2,
                   n_head=H, n_inner=F),
    "gpt_neo": dict(model_type="gpt_neo", vocab_size=V, max_position_embeddings=16,
                    hidden_size=D, num_layers=2, num_heads=H, intermediate_size=F,
                    attention_types=[[["global", "local"], 1]], window_size=2),
    "gptj": dict(model_type="gptj", vocab_size=V, n_positions=16, n_embd=D, n_layer=2,
                 n_head=H, n_inner=F, rotary_dim=4),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=V, max_position_embeddings=16,
                     hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                     intermediate_size=F, rotary_pct=0.5),
}
NON_FAMILY_MODULES = {"config", "dtypes", "families", "model", "ops", "sites", "trace",  # shared machinery
                      "tokenizers", "tokenizer_unicode"}  # the tokenizer reference


def test_every_family_has_an_expected_list():
    assert set(EXPECTED_2_LAYERS) == set(reference.FAMILIES)


def _model(family, seed=0):
    cfg = reference.parse_config(CONFIGS[family])
    rng = np.random.default_rng(seed)
    weights = {k: rng.normal(size=s) * 0.3 for k, s in reference.param_shapes(cfg).items()}
    return cfg, weights


def _batch(seed=1, b=2, t=5):
    ids = np.random.default_rng(seed).integers(0, V, size=(b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_site_names_pinned(family):
    assert site_names(family, 2) == EXPECTED_2_LAYERS[family]


def test_neox_sequential_residual_uses_the_pre_ln_list():
    """use_parallel_residual false: GPT-NeoX's block is GPT-2's pre-LN block, and so are its sites."""
    raw = dict(CONFIGS["gpt_neox"], use_parallel_residual=False)
    cfg = reference.parse_config(raw)
    assert site_names("gpt_neox", 2, cfg.block) == PRE_LN_2
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=s) * 0.3 for k, s in reference.param_shapes(cfg).items()}
    ids, mask = _batch()
    assert list(reference.forward(cfg, w, ids, mask).sites) == PRE_LN_2


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_forward_records_exactly_the_pinned_sites_in_order(family):
    cfg, w = _model(family)
    ids, mask = _batch()
    trace = reference.forward(cfg, w, ids, mask)
    assert list(trace.sites) == EXPECTED_2_LAYERS[family]
    assert list(trace.dtypes) == EXPECTED_2_LAYERS[family]
    assert set(trace.dtypes.values()) == {"float64"}


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_site_shapes_follow_the_design(family):
    """hidden (B,T,d); attn.q/k/v (B,H,T,hd); scores/probs (B,H,T,Tk); context (B,T,d);
    mlp.fc_in/act (B,T,d_inner); logits (B,T,V)."""
    cfg, w = _model(family)
    ids, mask = _batch(b=2, t=5)
    trace = reference.forward(cfg, w, ids, mask)
    for site, a in trace.sites.items():
        kind = reference.sites.site_kind(site)
        if kind in ("attn.q", "attn.k", "attn.v"):
            want = (2, H, 5, D // H)
        elif kind in ("attn.scores", "attn.probs"):
            want = (2, H, 5, 5)
        elif kind in ("mlp.fc_in", "mlp.act"):
            want = (2, 5, F)
        elif kind == "logits":
            want = (2, 5, V)
        else:
            want = (2, 5, D)
        assert a.shape == want, f"{site}: {a.shape} != {want}"


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_site_glob_selects_a_subset_with_the_same_values(family):
    cfg, w = _model(family)
    ids, mask = _batch()
    full = reference.forward(cfg, w, ids, mask)
    part = reference.forward(cfg, w, ids, mask, sites="blocks.*.resid_post")
    # logits are always kept, last
    assert list(part.sites) == ["blocks.0.resid_post", "blocks.1.resid_post", "logits"]
    for site, a in part.sites.items():
        assert np.array_equal(a, full[site])
    several = reference.forward(cfg, w, ids, mask, sites=["embed", "blocks.1.attn.*"])
    assert list(several.sites) == ["embed"] + [
        s for s in EXPECTED_2_LAYERS[family] if s.startswith("blocks.1.attn.")] + ["logits"]
    comma = reference.forward(cfg, w, ids, mask, sites="embed,blocks.1.attn.*")
    assert list(comma.sites) == list(several.sites)
    none = reference.forward(cfg, w, ids, mask, sites="no.such.site")
    assert list(none.sites) == ["logits"]
    assert np.array_equal(none.logits, full.logits)


def test_family_modules_and_registry_agree():
    """A module in reference/ named after a family is registered, and every registered family
    has its module; a new module is either a family (registered) or listed as shared machinery."""
    pkg = Path(reference.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(pkg)])}
    family_modules = modules - NON_FAMILY_MODULES
    registered = {f.replace("-", "_"): mod for f, mod in reference.MODULES.items()}
    assert family_modules == set(registered), (
        f"unregistered: {sorted(family_modules - set(registered))}, "
        f"registered without a module: {sorted(set(registered) - family_modules)}")
    for name, mod in registered.items():
        assert mod.__name__ == f"reference.{name}"
    assert set(reference.MODULES) == set(reference.FAMILIES)
    for family, mod in reference.MODULES.items():
        for fn in ("param_shapes", "embed", "block", "head"):
            assert callable(getattr(mod, fn, None)), f"{family}: no {fn}()"


def test_importing_reference_pulls_in_neither_torch_nor_transformers():
    code = ("import reference, sys; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:5]")
    root = Path(reference.__file__).parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
