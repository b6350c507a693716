"""The transformers adapter (parity/subjects/hf_adapter.py): transformers' own forward pass, captured by
hooks under the site names of DESIGN.md.

- In float64 every exposed site equals the float64 reference, for all five families, with left
  padding and explicit position ids and with a cache step (so a hook on the wrong tensor, a
  wrong head split, dropped position ids or a mis-converted cache all fail).
- The exposed-site list per family is pinned; hooks are taken off after every capture; a
  missing transformers gives the clear error of the `hf` extra; `parity trace --impl hf` works.
- GPTMeg's overrides (Megatron gelu, fp32 LayerNorm for fp16, baddbmm attention) are checked
  against the reference or an explicit recomputation.
- Issue 3's comparison: the fast path's `hf` preset against this adapter in fp32 (to rounding),
  and in fp16 / bf16 (CPU emulation of CUDA against transformers' native CPU half kernels; the
  per-site agreement is reported, benchmarks/README.md "transformers adapter" explains it).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import reference  # noqa: E402
from parity.subjects import hf_adapter  # noqa: E402
from parity.engine.budgets import cpu_tolerance, tolerance  # noqa: E402
from parity.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from parity.errors import ParityError  # noqa: E402
from parity.checkpoints.inputs import Inputs  # noqa: E402
from reference.ops import round_to  # noqa: E402

pytestmark = pytest.mark.hf

FAMILIES = reference.FAMILIES
# float64 agreement per family with eager attention (reasons in budgets.toml)
FLOAT64_TOL = {"gpt2": "float64_exact", "gptmeg": "float64_exact", "openai-gpt": "float64_exact",
               "gpt_neo": "reference_vs_hf_gpt_neo", "gptj": "hf_adapter_gptj_float64",
               "gpt_neox": "hf_adapter_gpt_neox_float64"}
# every (family, attention implementation) the adapter offers, run in float64
# FlexAttention on a CPU runs fp32/fp16/bf16 only (torch refuses float64): it is checked in
# bf16 against the budgets in tests/test_compiled.py
IMPLS = [(f, a) for f in FAMILIES for a in reference.family(f).hf_attn_implementations
         if a != "flex_attention"]
IMPL_TOL = {("gptj", "sdpa"): "hf_adapter_gptj_float64"}


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoints):
    return {f: load_checkpoint(p) for f, p in tiny_checkpoints.items()}


def padded_inputs(cfg, t: int = 12, seed: int = 0) -> Inputs:
    """Two rows, the second left-padded by 5; explicit positions count real tokens from an offset
    (0 and 3), so a subject that ignored position_ids or derived its own would disagree. t=12
    exceeds the tiny GPT-Neo window (8), so local layers really cut keys off."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :5] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + np.array([[0], [3]])
    return Inputs(ids, mask, pos)


def valid(site: str, ref: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Elements that count: real query rows; for scores, visible keys only (masked entries hold
    -inf in the reference and HF's fill value in the adapter)."""
    kind = site.split(".", 2)[2] if site.startswith("blocks.") else site
    if kind in ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs"):
        v = np.broadcast_to(rows[:, None, :, None], ref.shape)
    else:
        v = np.broadcast_to(rows[..., None], ref.shape)
    return v & np.isfinite(ref) if kind == "attn.scores" else v


def rel_err(a: np.ndarray, r: np.ndarray, v: np.ndarray) -> float:
    """max |a - r| / max |r| over the valid elements."""
    return float(np.max(np.abs(a[v] - r[v])) / np.max(np.abs(r[v])))


def worst_site(trace, ref, rows) -> tuple[str, float]:
    errs = {s: rel_err(a, ref[s], valid(s, ref[s], rows)) for s, a in trace.sites.items()}
    s = max(errs, key=errs.get)
    return s, errs[s]


def assert_matches(trace, ref, rows, tol_name: str) -> None:
    for s, a in trace.sites.items():
        assert a.shape == ref[s].shape, f"{s}: shape {a.shape}, reference {ref[s].shape}"
    s, e = worst_site(trace, ref, rows)
    assert e <= tolerance(tol_name), f"{s}: rel error {e:.3g} > {tol_name} {tolerance(tol_name)}"


def load(ckpts, family, dtype="float64", impl=None):
    return hf_adapter.load(ckpts[family], dtype=dtype, attn_implementation=impl)


# ------------------------------------------------------------------------------ float64 = reference
@pytest.mark.parametrize("family,impl", IMPLS, ids=[f"{f}-{a}" for f, a in IMPLS])
def test_float64_matches_reference_with_padding_and_positions(ckpts, family, impl):
    ck = ckpts[family]
    inp = padded_inputs(ck.config)
    if (family, impl) == ("gpt_neox", "eager"):
        # HF NeoX eager softmaxes in fp32: a fully masked pad row (finfo(float64).min -> -inf)
        # gives NaN, and 0 * NaN leaks into real tokens at the next layer (MODEL_NOTES 10,
        # pitfall 3). An HF artefact: compared without padding, positions still offset.
        inp = Inputs(inp.input_ids, np.ones_like(inp.attention_mask), inp.position_ids)
    trace = hf_adapter.run(ck, inp, dtype="float64", attn_implementation=impl)
    ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids)
    assert list(trace.sites) == hf_adapter.exposed_sites(family, ck.config.n_layer, impl)
    assert set(trace.dtypes.values()) == {"float64"}
    assert trace.meta["impl"] == "hf" and trace.meta["attn_implementation"] == impl
    assert trace.meta["note"] == "loads the whole model"
    if family == "gptmeg":
        assert trace.meta["gptmeg"].startswith("Megatron gelu (eager ops), fp32 LayerNorm")
        assert trace.meta["gptmeg"].endswith(
            "baddbmm attention" if impl == "baddbmm" else f"GPT-2 {impl} attention")
    assert_matches(trace, ref, inp.attention_mask.astype(bool),
                   IMPL_TOL.get((family, impl), FLOAT64_TOL[family]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if reference.family(f).hf_cache])
def test_float64_cache_step(ckpts, family):
    """Prefix of 9 tokens, then 3 more on its cache: the adapter's second step equals the
    reference's second step on the reference's own cache, and the caches agree."""
    ck = ckpts[family]
    full = padded_inputs(ck.config)
    ids, mask, pos = full.input_ids, full.attention_mask, full.position_ids
    # NeoX eager in float64 turns padded rows into NaN that leaks (MODEL_NOTES 10, pitfall 3)
    model, impl = load(ckpts, family, impl="sdpa" if family == "gpt_neox" else "eager")
    first = hf_adapter.capture(model, ck.config, Inputs(ids[:, :9], mask[:, :9], pos[:, :9]),
                               attn_implementation=impl)
    step = Inputs(ids[:, 9:], mask, pos[:, 9:])
    hf2 = hf_adapter.capture(model, ck.config, step, past=first.cache, attn_implementation=impl)
    ref1 = reference.forward(ck.config, ck.weights(), ids[:, :9], mask[:, :9], pos[:, :9])
    ref2 = reference.forward(ck.config, ck.weights(), ids[:, 9:], mask, pos[:, 9:],
                             past=ref1.cache)
    tol = FLOAT64_TOL[family]
    assert_matches(hf2, ref2, mask[:, 9:].astype(bool), tol)
    assert len(hf2.cache) == ck.config.n_layer
    real = mask.astype(bool)[:, None, :, None]  # keys of padded positions never count
    for (hk, hv), (rk, rv) in zip(hf2.cache, ref2.cache):
        assert hk.shape == rk.shape == (2, ck.config.n_head, 12, ck.config.head_dim)
        for a, r in ((hk, rk), (hv, rv)):
            v = np.broadcast_to(real, r.shape)
            assert rel_err(a, r, v) <= tolerance(tol)


def test_openai_gpt_refuses_a_cache_and_returns_its_present(ckpts):
    """transformers' OpenAI GPT has no cache: the adapter's trace.cache is k, v off c_attn."""
    ck = ckpts["openai-gpt"]
    inp = padded_inputs(ck.config)
    trace = hf_adapter.run(ck, inp, dtype="float64")
    ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids)
    real = inp.attention_mask.astype(bool)[:, None, :, None]
    assert len(trace.cache) == ck.config.n_layer
    for (hk, hv), (rk, rv) in zip(trace.cache, ref.cache):
        for a, r in ((hk, rk), (hv, rv)):
            assert a.shape == r.shape
            assert rel_err(a, r, np.broadcast_to(real, r.shape)) <= tolerance("float64_exact")
    with pytest.raises(ParityError, match="no key/value cache"):
        hf_adapter.run(ck, inp, dtype="float64", past=trace.cache)


def test_gptj_with_a_float64_rotary_table_is_exact(ckpts):
    """GPT-J's float64 gap is transformers' rotary table (built in fp32 by from_pretrained);
    with an exact float64 table on the sdpa path the adapter's sites agree to float64 level,
    so its hooks are right."""
    ck = ckpts["gptj"]
    inp = padded_inputs(ck.config)
    model, impl = load(ckpts, "gptj", impl="sdpa")
    rot = model.transformer.rotary_emb
    n, r = rot.embed_positions.shape
    sin, cos = reference.ops.rotary_sin_cos(np.arange(n)[None], r)  # (1, n, R), interleaved
    table = np.concatenate([sin[0, :, 0::2], cos[0, :, 0::2]], axis=1)
    assert np.abs(table - rot.embed_positions.numpy()).max() > 0  # HF's table is not exact
    with torch.no_grad():
        rot.embed_positions.copy_(torch.from_numpy(table))
    trace = hf_adapter.capture(model, ck.config, inp, attn_implementation=impl)
    ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids)
    assert_matches(trace, ref, inp.attention_mask.astype(bool), "reference_vs_hf_gptj")


# ------------------------------------------------------------------------------ sites and hooks
def test_exposed_sites_per_family_are_pinned():
    gpt2 = ("ln_1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context",
            "attn.out", "resid_mid", "ln_2", "mlp.fc_in", "mlp.act", "mlp.out", "resid_post")
    assert hf_adapter.HF_SITES == {
        "gpt2": gpt2,
        "gptmeg": gpt2,
        "gpt_neo": gpt2,
        "openai-gpt": ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context",
                       "attn.out", "resid_mid", "ln_1", "mlp.fc_in", "mlp.act", "mlp.out",
                       "resid_post", "ln_2"),
        "gptj": ("ln_1", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context",
                 "attn.out", "mlp.fc_in", "mlp.act", "mlp.out", "resid_post"),
        "gpt_neox": ("ln_1", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context",
                     "attn.out", "ln_2", "mlp.fc_in", "mlp.act", "mlp.out", "resid_post"),
    }
    assert hf_adapter.hf_sites("gpt_neox", "pre") == tuple(
        k for k in gpt2 if k != "attn.q")  # use_parallel_residual false: pre-LN, q after rotary
    sdpa = hf_adapter.exposed_sites("gpt2", 2, "sdpa")
    assert sdpa[:3] == ["embed", "blocks.0.ln_1", "blocks.0.attn.q"]
    assert not [s for s in sdpa if s.endswith(("scores", "probs"))]
    assert sdpa[-2:] == ["ln_f", "logits"]
    assert hf_adapter.exposed_sites("openai-gpt", 1)[-2:] == ["blocks.0.ln_2", "logits"]


def test_site_globs_select_and_hooks_come_off(ckpts):
    ck = ckpts["gpt2"]
    model, _ = load(ckpts, "gpt2", dtype="float32")
    inp = padded_inputs(ck.config)
    trace = hf_adapter.capture(model, ck.config, inp, sites="blocks.*.resid_post,blocks.1.attn.*")
    want = [f"blocks.{i}.resid_post" for i in range(ck.config.n_layer)]
    want[1:1] = [f"blocks.1.attn.{k}" for k in ("q", "k", "v", "scores", "probs", "context", "out")]
    assert list(trace.sites) == want + ["logits"]
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
    full = hf_adapter.capture(model, ck.config, inp)
    assert np.array_equal(full.logits, trace.logits)  # capturing changes nothing


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_sites_keep_their_dtype_and_values(ckpts, dtype):
    """Site values are the HF tensors exactly: representable in the dtype recorded for them.
    GPT-Neo and GPT-J upcast q.k^T, so their scores are float32 in a half model."""
    for family in ("gpt_neo", "gptj", "gpt2"):
        ck = ckpts[family]
        trace = hf_adapter.run(ck, padded_inputs(ck.config), dtype=dtype)
        for s, a in trace.sites.items():
            want = "float32" if s.endswith("scores") and family != "gpt2" else dtype
            assert trace.dtypes[s] == want, s
            finite = np.isfinite(a)
            assert np.array_equal(round_to(a[finite], want), a[finite]), s
        assert all(k.dtype == np.float64 for kv in trace.cache for k in kv)


# ------------------------------------------------------------------------------ GPTMeg overrides
@pytest.mark.cpu_kernels
def test_gptmeg_fp16_layernorm_is_fp32_rounded_once(ckpts):
    """Every LayerNorm of GPTMeg (ln_f included) is the upcast one: in fp16 its output is the
    fp32 LayerNorm of its input rounded to fp16 once (bitwise), in the model's forward and on a
    stream with a large mean, where torch's native CPU half LayerNorm rounds differently."""
    ck = ckpts["gptmeg"]
    model, _ = load(ckpts, "gptmeg", dtype="float16")
    lns = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(lns) == 2 * ck.config.n_layer + 1
    assert all(type(m) is hf_adapter.Fp32LayerNorm for m in lns)

    def upcast(ln, x):
        return torch.nn.functional.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(),
                                              ln.bias.float(), ln.eps).half()

    trace = hf_adapter.capture(model, ck.config, padded_inputs(ck.config),
                               sites="embed,blocks.0.ln_1,blocks.3.resid_post,ln_f")
    tf = model.transformer
    with torch.no_grad():
        for x_site, y_site, ln in (("embed", "blocks.0.ln_1", tf.h[0].ln_1),
                                   ("blocks.3.resid_post", "ln_f", tf.ln_f)):
            want = upcast(ln, torch.from_numpy(trace[x_site]).half())
            assert trace.dtypes[y_site] == "float16"
            assert np.array_equal(trace[y_site], want.double().numpy()), y_site
        g = torch.Generator().manual_seed(0)
        x = (100 + torch.randn(256, ck.config.d_model, generator=g)).half()
        ln = tf.h[1].ln_2
        native = torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        assert not torch.equal(native, upcast(ln, x))  # the two recipes do differ here
        assert torch.equal(ln(x), upcast(ln, x))


def test_gptmeg_gelu_is_megatrons(ckpts):
    """The act site equals the reference's Megatron gelu to float64 level; gelu_new would miss
    by up to 2.6e-10 (MODEL_NOTES section 5b), far above the bound."""
    ck = ckpts["gptmeg"]
    inp = padded_inputs(ck.config)
    trace = hf_adapter.run(ck, inp, dtype="float64", sites="blocks.*.mlp.fc_in,blocks.*.mlp.act")
    for i in range(ck.config.n_layer):
        x = trace[f"blocks.{i}.mlp.fc_in"]
        act = trace[f"blocks.{i}.mlp.act"]
        assert np.abs(act - reference.ops.gelu_megatron(x)).max() <= tolerance("gelu_identity")
        assert np.abs(act - reference.ops.gelu_new(x)).max() > tolerance("megatron_gelu_gap_min")


# ------------------------------------------------------------------------------ errors and CLI
def test_missing_transformers_gives_the_install_hint(ckpts, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ParityError, match=r"pip install gpt-parity\[hf\]"):
        hf_adapter.run(ckpts["gpt2"], Inputs(np.array([[1, 2, 3]])), dtype="float32")


def test_unknown_attention_implementation_is_a_clear_error(ckpts):
    with pytest.raises(ParityError, match="'sdpa' is not available for gpt_neo"):
        hf_adapter.run(ckpts["gpt_neo"], Inputs(np.array([[1, 2]])), attn_implementation="sdpa")


def test_parity_trace_impl_hf(tiny_checkpoints, tmp_path, capsys):
    from parity.cli import main
    from parity.goldens.io import read_golden

    out = tmp_path / "hf.safetensors"
    rc = main(["trace", str(tiny_checkpoints["gptj"]), "--impl", "hf", "--dtype", "float32",
               "--tokens", "1 2 3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    g = read_golden(out)
    assert g.meta["impl"] == "hf" and g.meta["dtype"] == "float32"
    assert g.meta["note"] == "loads the whole model"
    ck = load_checkpoint(tiny_checkpoints["gptj"])
    direct = hf_adapter.run(ck, Inputs(np.array([[1, 2, 3]])), dtype="float32")
    assert np.array_equal(g.logits, direct.logits)
    assert set(g.sites) == set(direct.sites)


def test_a_weight_missing_from_the_file_is_an_error_not_a_random_init(ckpts, tmp_path):
    """transformers fills a missing weight with a random init and warns; the adapter refuses."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    ck = ckpts["gpt2"]
    tensors = load_file(str(ck.path / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(ck.path / "config.json", tmp_path / "config.json")
    with pytest.raises(ParityError, match=r"did not load.*h\.1\.mlp\.c_fc\.bias"):
        hf_adapter.load(dataclasses.replace(ck, path=tmp_path), dtype="float32")



# ------------------------------------------------------------------------------ issue 3: fast vs hf
def fast_module():
    try:
        from parity.subjects import fast
    except ImportError as e:
        pytest.skip(f"parity.subjects.fast is not importable ({e}): the fast-path comparison waits for it")
    return fast


def fast_variant(family: str, dtype: str) -> str:
    """The fast preset that states transformers' numerics for this run: `hf`, plus GPTMeg's
    fp32 LayerNorm where the adapter has it (fp16 only)."""
    return "hf+layernorm=fp32" if family == "gptmeg" and dtype == "float16" else "hf"


def ulp_figures(sub, hf, ref, rows) -> dict[str, tuple[float, float, float]]:
    """site -> (share within 1 ULP of the site's dtype, max ULP, max relative error) of `sub`
    against the adapter's trace `hf`, over the elements that count."""
    from parity.engine.metrics import ulp_distance

    out = {}
    for s, a in hf.sites.items():
        v = valid(s, ref[s], rows)
        y, h = sub[s][v], a[v]
        u = ulp_distance(y, h, hf.dtypes[s])
        out[s] = (float(np.mean(u <= 1)), float(u.max()),
                  float(np.abs(y - h).max() / np.abs(h).max()))
    return out


def reference_and_rows(ck, inp):
    ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids)
    return ref, inp.attention_mask.astype(bool)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_hf_preset_equals_transformers_float32(ckpts, family):
    """Issue 3: the `hf` preset in fp32 equals transformers in fp32 to rounding (measured:
    bitwise at every site; see benchmarks/README.md)."""
    fast = fast_module()
    ck = ckpts[family]
    inp = padded_inputs(ck.config)
    ref, rows = reference_and_rows(ck, inp)
    hf = hf_adapter.run(ck, inp, dtype="float32")
    sub = fast.run(ck, inp, variant="hf", dtype="float32")
    figs = ulp_figures(sub, hf, ref, rows)
    worst = max(figs, key=lambda s: figs[s][2])
    assert figs[worst][2] <= tolerance("fast_hf_vs_transformers_float32"), (worst, figs[worst])
    assert all(sub.dtypes[s] == hf.dtypes[s] == "float32" for s in hf.sites)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_native_half_is_transformers_bitwise(ckpts, family, dtype):
    """`--emulate off` runs torch's CPU half kernels in transformers' op order: every site,
    with its dtype (GPT-Neo / GPT-J scores in fp32), is bitwise what transformers computes."""
    fast = fast_module()
    ck = ckpts[family]
    inp = padded_inputs(ck.config)
    ref, rows = reference_and_rows(ck, inp)
    hf = hf_adapter.run(ck, inp, dtype=dtype)
    sub = fast.run(ck, inp, variant=fast_variant(family, dtype), dtype=dtype, emulate=False)
    for s in hf.sites:
        assert sub.dtypes[s] == hf.dtypes[s], s
        v = valid(s, ref[s], rows)
        assert np.array_equal(sub[s][v], hf[s][v]), s


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_emulated_half_agrees_with_transformers_cpu_per_block(ckpts, family, dtype):
    """Issue 3: the CPU emulation of CUDA half precision against transformers on the CPU in
    native half. Each fast block is fed transformers' own input to that block (local mode), so
    a site's figure belongs to that block's kernels; the share of elements within 1 ULP must
    reach the named bound at every site (the gap is CPU-vs-CUDA kernel semantics, explained in
    budgets.toml and benchmarks/README.md). torch's CPU half kernels differ by CPU, so the bound
    is the one of this CPU kernel level (benchmarks/cpu_capabilities.py)."""
    fast = fast_module()
    from parity.engine.compare import block_inputs, forward_local

    ck = ckpts[family]
    inp = padded_inputs(ck.config)
    ref, rows = reference_and_rows(ck, inp)
    hf = hf_adapter.run(ck, inp, dtype=dtype)
    model = fast.FastModel(ck, fast_variant(family, dtype), dtype=dtype, emulate=True)
    assert model.num.emulate
    sub = forward_local(model, inp, block_inputs(hf, ck.config))
    figs = ulp_figures(sub, hf, ref, rows)
    bound = cpu_tolerance(f"fast_emulated_vs_transformers_cpu_{dtype}", "min_share_within_1ulp")
    worst = min(figs, key=lambda s: figs[s][0])
    assert figs[worst][0] >= bound, (worst, figs[worst])
    assert figs["embed"][1] == 0  # a lookup and one add: no kernel difference at all


def test_subjects_dispatch_passes_the_variant_and_the_cache(ckpts):
    """parity.subjects.run('hf', ...): --variant is the attention implementation; past flows."""
    from parity import subjects

    ck = ckpts["gpt2"]
    inp = padded_inputs(ck.config)
    first = subjects.run("hf", ck, Inputs(inp.input_ids[:, :9], inp.attention_mask[:, :9],
                                          inp.position_ids[:, :9]), variant="sdpa",
                         dtype="float64")
    assert first.meta["attn_implementation"] == "sdpa" and "blocks.0.attn.probs" not in first
    step = subjects.run("hf", ck, Inputs(inp.input_ids[:, 9:], inp.attention_mask,
                                         inp.position_ids[:, 9:]), dtype="float64",
                        past=first.cache)
    whole = hf_adapter.run(ck, inp, dtype="float64")
    rows = inp.attention_mask[:, 9:].astype(bool)
    assert rel_err(step.logits, whole.logits[:, 9:], np.broadcast_to(
        rows[..., None], step.logits.shape)) <= tolerance("float64_exact")
