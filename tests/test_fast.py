"""The fast path (`parity/subjects/fast.py`, `parity/subjects/knobs.py`): against the float64 reference, and knob
against knob where MODEL_NOTES.md says what must (and must not) change."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import reference
from parity.subjects import fast
from parity.engine.budgets import cpu_tolerance, tolerance
from parity.checkpoints.checkpoint import load_checkpoint
from parity.errors import ParityError
from parity.checkpoints.inputs import Inputs, default_batch
from parity.subjects.knobs import PRESETS, Knobs, parse_knobs, parse_variant, resolve
from reference.ops import round_to

FAMILIES = reference.FAMILIES
FLOAT64_PRESETS = [p for p in PRESETS if p != "fp32"]


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoints):
    return {f: load_checkpoint(p) for f, p in tiny_checkpoints.items()}


# ----------------------------------------------------------------------------- helpers
def two_steps(inp: Inputs, split: int) -> tuple[Inputs, Inputs]:
    """A left-padded batch cut into a prefix and a continuation that uses the cache."""
    pos = inp.position_ids
    first = Inputs(inp.input_ids[:, :split], inp.attention_mask[:, :split], pos[:, :split])
    second = Inputs(inp.input_ids[:, split:], inp.attention_mask, pos[:, split:])
    return first, second


def token_rows(inp: Inputs) -> np.ndarray:
    """(B, T) real-token rows of the new tokens (padded queries never count)."""
    t = inp.input_ids.shape[1]
    if inp.attention_mask is None:
        return np.ones(inp.input_ids.shape, bool)
    return np.asarray(inp.attention_mask)[:, -t:] != 0


def valid(site: str, ref: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Elements that count: real-token rows; for scores also only the keys the reference lets
    the query see (masked entries are -inf there and hold each subject's own fill value)."""
    if ref.ndim == 4:  # attn.q/k/v/scores/probs: (B, H, T, .)
        m = rows[:, None, :, None] & np.ones(ref.shape, bool)
        return m & np.isfinite(ref) if site.endswith("scores") else m
    return np.broadcast_to(rows.reshape(rows.shape + (1,) * (ref.ndim - 2)), ref.shape)


def rel_max(y, r, m) -> float:
    return float(np.max(np.abs(y[m] - r[m])) / max(np.max(np.abs(r[m])), 1e-300))


def worst(trace, ref, inp, masks_from=None) -> tuple[float, str]:
    """Largest relative error over the sites; valid elements from `masks_from` (a reference
    trace, whose masked scores are -inf), by default `ref` itself."""
    assert list(trace.sites) == list(ref.sites), "site names or order differ"
    rows = token_rows(inp)
    masks_from = masks_from or ref
    errs = []
    for s, r in ref.sites.items():
        assert trace.sites[s].shape == r.shape, (s, trace.sites[s].shape, r.shape)
        errs.append((rel_max(trace.sites[s], r, valid(s, masks_from.sites[s], rows)), s))
    return max(errs)


def ref_run(ck, inp, past=None):
    return reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                             inp.position_ids, past=past)


def check_against_reference(ck, variant, dtype, tol_name):
    """Full batch (left padding, explicit positions), then prefix + cached continuation."""
    inp = default_batch(ck.config, length=12)
    tr = fast.run(ck, inp, variant=variant, dtype=dtype)
    err, site = worst(tr, ref_run(ck, inp), inp)
    assert err <= tolerance(tol_name), f"{variant} {dtype}: {site} off by {err:.2e}"
    first, second = two_steps(inp, 8)
    tr1 = fast.run(ck, first, variant=variant, dtype=dtype)
    ref1 = ref_run(ck, first)
    assert [k.shape for k, _ in tr1.cache] == [k.shape for k, _ in ref1.cache]
    tr2 = fast.run(ck, second, variant=variant, dtype=dtype, past=tr1.cache)
    err, site = worst(tr2, ref_run(ck, second, past=ref1.cache), second)
    assert err <= tolerance(tol_name), f"{variant} {dtype} cached step: {site} off by {err:.2e}"
    return tr


def lockstep(ck, variant, dtype, a: dict, b: dict, inp):
    """Run two FastModels layer by layer, both fed model `a`'s stream: per-block traces."""
    ma, mb = fast.FastModel(ck, variant, dtype, **a), fast.FastModel(ck, variant, dtype, **b)
    ca, cb = ma.prepare(inp), mb.prepare(inp)
    h = ma.embed(ca)
    mb.embed(cb)
    for i in range(ck.config.n_layer):
        mb.block(cb, i, h)
        h = ma.block(ca, i, h)
    ma.head(ca, h)
    mb.head(cb, h)
    return ca.trace, cb.trace


def ulp_share(a, b, dtype, m, ulps) -> float:
    """Share of the valid elements within `ulps` steps of `dtype` (both hold dtype values)."""
    from parity.engine.metrics import ulp_distance

    return float(np.mean(ulp_distance(a[m], b[m], dtype) <= ulps))


# ----------------------------------------------------------------------------- float64 collapse
@pytest.mark.parametrize("preset", FLOAT64_PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_in_float64_equals_the_reference(ckpts, family, preset):
    tr = check_against_reference(ckpts[family], preset, "float64", "fast_float64_vs_reference")
    assert tr.meta["dtype"] == "float64" and tr.meta["emulate"] == "off"


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_preset_runs_in_float32_within_the_measured_tolerance(ckpts, family):
    tr = check_against_reference(ckpts[family], "fp32", "float16", "fast_float32_vs_reference")
    assert tr.meta["dtype"] == "float32"
    assert set(tr.dtypes.values()) == {"float32"}


def test_sdpa_real_kernel_in_float32_keeps_the_local_window(ckpts):
    """torch's fused kernel (not the emulation) with GPT-Neo's explicit window mask."""
    ck = ckpts["gpt_neo"]
    inp = default_batch(ck.config, length=16)  # longer than the window of 8
    tr = fast.run(ck, inp, variant="sdpa", dtype="float32")
    ref = ref_run(ck, inp)
    rows = token_rows(inp)
    for i in range(ck.config.n_layer):
        s = f"blocks.{i}.attn.context"
        assert rel_max(tr.sites[s], ref.sites[s], valid(s, ref.sites[s], rows)) <= \
            tolerance("fast_float32_vs_reference")


# ----------------------------------------------------------------------------- trace layout
@pytest.mark.parametrize("family", FAMILIES)
def test_trace_sites_dtypes_cache_and_meta(ckpts, family):
    ck = ckpts[family]
    inp = default_batch(ck.config, length=10)
    tr = fast.run(ck, inp, variant="hf", dtype="float16")
    assert list(tr.sites) == reference.site_names(family, ck.config.n_layer)
    upcast = family in ("gpt_neo", "gptj")  # HF eager casts q, k to fp32 for these two
    assert tr.dtypes["blocks.0.attn.scores"] == ("float32" if upcast else "float16")
    assert tr.dtypes["blocks.0.attn.probs"] == tr.dtypes["logits"] == "float16"
    for s, a in tr.sites.items():
        assert a.dtype == np.float64
        vis = valid(s, a, token_rows(inp))
        if tr.dtypes[s] == "float16":  # every recorded value is an fp16 value
            assert np.array_equal(a[vis], round_to(a[vis], "float16")), s
    b, t = inp.input_ids.shape
    cfg = ck.config
    assert [k.shape for k, v in tr.cache] == [(b, cfg.n_head, t, cfg.head_dim)] * cfg.n_layer
    assert tr.meta["impl"] == "fast" and tr.meta["emulate"] == "on"
    assert tr.meta["knobs"] == resolve("hf", family, cfg).describe()
    assert tr.meta["torch"] == torch.__version__
    assert all(isinstance(v, str) for v in tr.meta.values())


def test_site_subset_keeps_only_the_glob_and_logits(ckpts):
    ck = ckpts["gpt2"]
    tr = fast.run(ck, default_batch(ck.config), sites="blocks.*.resid_post")
    assert list(tr.sites) == [f"blocks.{i}.resid_post" for i in range(4)] + ["logits"]


# ----------------------------------------------------------------------------- meg vs hf
def _first_block_sites(family):
    return [f"blocks.0.{s}" for s in reference.family(family).block_sites]


@pytest.mark.parametrize("family", ["gpt2", "gptmeg"])
def test_meg_differs_from_hf_first_at_the_gelu(ckpts, family):
    """MODEL_NOTES section 5 on fp16 GPT-2/GPTMeg: (a) the fp32 LayerNorm equals CUDA's half
    LayerNorm (both fp32 inside, one rounding), (c) baddbmm's alpha = 1/4 is a power of two here
    (hd = 16), so scores agree too; (b) the fused gelu is the first site to differ."""
    ck = ckpts[family]
    inp = default_batch(ck.config)
    hf = fast.run(ck, inp, variant="hf", dtype="float16")
    meg = fast.run(ck, inp, variant="meg", dtype="float16")
    rows = token_rows(inp)
    sites = ["embed"] + _first_block_sites(family)
    first = next(s for s in sites if not np.array_equal(
        hf.sites[s][valid(s, hf.sites[s], rows) & (hf.sites[s] > -1e4)],
        meg.sites[s][valid(s, hf.sites[s], rows) & (hf.sites[s] > -1e4)]))
    assert first == "blocks.0.mlp.act"
    assert hf.meta["jit_fused"] == "n.a." and meg.meta["jit_fused"] == "emulated"
    # in float64 the two recipes are the same function
    hf64 = fast.run(ck, inp, variant="hf", dtype="float64")
    meg64 = fast.run(ck, inp, variant="meg", dtype="float64")
    assert worst(meg64, hf64, inp, ref_run(ck, inp))[0] <= tolerance("fast_float64_vs_reference")


def _write_checkpoint(path, raw: dict):
    """A checkpoint with an arbitrary config (random weights by parity.checkpoints.recipes.init_tensor)."""
    from safetensors.torch import save_file

    from parity.checkpoints.recipes import init_tensor

    cfg = reference.parse_config(raw)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"transformer." + n: torch.from_numpy(init_tensor(cfg.family, n, s, 0)).float()
               for n, s in reference.param_shapes(cfg).items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw))
    return load_checkpoint(path)


def test_meg_scores_differ_from_hf_when_the_scale_is_not_a_power_of_two(tmp_path):
    """hd = 12: matmul-then-scale rounds twice, baddbmm once (MODEL_NOTES section 5c); the sites
    before the scores stay identical, the scores differ, and only the knob that moves them."""
    ck = _write_checkpoint(tmp_path / "g", dict(
        model_type="gpt2", vocab_size=256, n_positions=64, n_embd=48, n_layer=2, n_head=4,
        activation_function="gelu_new"))
    inp = default_batch(ck.config)
    rows = token_rows(inp)
    hf = fast.run(ck, inp, variant="hf", dtype="float16")
    for variant in ("meg", "hf+attn_scores=baddbmm"):
        other = fast.run(ck, inp, variant=variant, dtype="float16")
        same = {s: np.array_equal(hf.sites[s][valid(s, hf.sites[s], rows)],
                                  other.sites[s][valid(s, hf.sites[s], rows)])
                for s in ["embed"] + _first_block_sites("gpt2")[:4]}
        assert same == {"embed": True, "blocks.0.ln_1": True, "blocks.0.attn.q": True,
                        "blocks.0.attn.k": True, "blocks.0.attn.v": True}, variant
        s = "blocks.0.attn.scores"
        m = valid(s, hf.sites[s], rows) & (hf.sites[s] > -1e4)
        assert not np.array_equal(hf.sites[s][m], other.sites[s][m]), variant


def test_knob_that_does_not_apply_is_ignored_and_one_that_applies_is_not(ckpts):
    inp = default_batch(ckpts["gpt2"].config)
    a = fast.run(ckpts["gpt2"], inp, variant="hf", dtype="float16")
    b = fast.run(ckpts["gpt2"], inp, variant="hf+rotary=fp32", dtype="float16")
    assert all(np.array_equal(a.sites[s], b.sites[s]) for s in a.sites)
    inp = default_batch(ckpts["gptj"].config)
    a = fast.run(ckpts["gptj"], inp, variant="hf", dtype="float16")
    b = fast.run(ckpts["gptj"], inp, variant="hf+rotary=fp32", dtype="float16")
    assert np.array_equal(a.sites["blocks.0.attn.v"], b.sites["blocks.0.attn.v"])
    assert not np.array_equal(a.sites["blocks.0.attn.q"], b.sites["blocks.0.attn.q"])


# ----------------------------------------------------------------------------- GPT-Neo window
@pytest.mark.parametrize("variant", ["hf", "meg", "naive-half", "sdpa"])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_gpt_neo_local_layers_keep_their_window(ckpts, variant, dtype):
    ck = ckpts["gpt_neo"]
    cfg = ck.config
    inp = default_batch(cfg, length=16)  # window 8
    tr = fast.run(ck, inp, variant=variant, dtype=dtype)
    rows = token_rows(inp)
    i_idx = np.arange(16)[:, None]
    j_idx = np.arange(16)[None, :]
    outside = (i_idx - j_idx >= cfg.window_size) | (j_idx > i_idx)
    assert outside.any()
    local = [i for i in range(cfg.n_layer) if cfg.layer_kind(i) == "local"]
    assert local
    for i in local:
        p = tr.sites[f"blocks.{i}.attn.probs"]
        sel = rows[:, None, :, None] & outside[None, None]
        assert np.all(p[np.broadcast_to(sel, p.shape)] == 0.0), (variant, dtype, i)
        if dtype == "float64":  # (fp16 probabilities may underflow to 0 inside the window)
            inside = (rows[:, None, :, None] & ~outside[None, None]
                      & (inp.attention_mask[:, None, None, :] != 0))
            assert np.all(p[np.broadcast_to(inside, p.shape)] > 0.0)


# ----------------------------------------------------------------------------- emulation vs CPU
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_emulation_agrees_with_native_cpu_half_within_a_few_ulps(ckpts, family, dtype):
    """Lockstep (both blocks fed the same stream): the emulation of CUDA and torch's own CPU
    half kernels differ only where those kernels differ from CUDA (EMULATION.md, figures)."""
    ck = ckpts[family]
    inp = default_batch(ck.config)
    emu, nat = lockstep(ck, "hf", dtype, dict(emulate=True), dict(emulate=False), inp)
    assert emu.meta["emulate"] == "on" and nat.meta["emulate"] == "off"
    rows = token_rows(inp)
    ulps = cpu_tolerance("emulated_vs_native_cpu", "ulps")
    shares = {s: ulp_share(emu.sites[s], nat.sites[s], dtype, valid(s, emu.sites[s], rows) &
                           (emu.sites[s] > -1e30), ulps) for s in emu.sites}
    low = {s: v for s, v in shares.items()
           if v < cpu_tolerance("emulated_vs_native_cpu", "min_share")}
    assert not low, low


# ----------------------------------------------------------------------------- lockstep API
def test_block_accepts_the_reference_stream(ckpts):
    ck = ckpts["gpt2"]
    inp = default_batch(ck.config)
    ref = ref_run(ck, inp)
    rows = token_rows(inp)
    h_in, h_out = ref.sites["blocks.1.resid_post"], ref.sites["blocks.2.resid_post"]
    m64 = fast.FastModel(ck, "hf", "float64")
    ctx = m64.prepare(inp)
    out = m64.to_numpy(m64.block(ctx, 2, h_in))
    assert rel_max(out, h_out, valid("x", h_out, rows)) <= tolerance("fast_float64_vs_reference")
    m16 = fast.FastModel(ck, "hf", "float16")
    a = m16.to_numpy(m16.block(m16.prepare(inp), 2, h_in))  # float64 in: rounded once
    b = m16.to_numpy(m16.block(m16.prepare(inp), 2, round_to(h_in, "float16")))
    assert np.array_equal(a, b)


def test_past_in_the_wrong_layout_is_refused(ckpts):
    ck = ckpts["gpt2"]
    inp = default_batch(ck.config)
    tr = fast.run(ck, inp, dtype="float16")
    with pytest.raises(ParityError, match="past has 2 layers"):
        fast.run(ck, inp, dtype="float16", past=tr.cache[:2])
    with pytest.raises(ParityError, match="attention_mask"):
        fast.run(ck, inp, dtype="float16", past=tr.cache)  # mask does not cover the past


# ----------------------------------------------------------------------------- variants
def test_variant_syntax():
    k = parse_variant("meg+gelu=tanh,attn_upcast=on", "gptmeg")
    assert (k.attn_scores, k.gelu, k.attn_upcast, k.layernorm) == ("baddbmm", "tanh", True, "fp32")
    assert parse_variant("attn_scores=sdpa", "gpt2") == resolve("sdpa", "gpt2")
    assert parse_variant(None, "gpt2") == resolve("hf", "gpt2") == Knobs()
    for preset in PRESETS:
        k = resolve(preset, "gptj")
        assert parse_knobs(k.describe(), Knobs()) == k
    with pytest.raises(ParityError, match="unknown knob"):
        parse_variant("hf+colour=red", "gpt2")
    with pytest.raises(ParityError, match="takes on/off"):
        parse_variant("hf+attn_upcast=maybe", "gpt2")
    with pytest.raises(ParityError, match="unknown variant preset"):
        parse_variant("megatron", "gpt2")


def test_presets_per_family_follow_the_hf_modeling_files(ckpts):
    neo, j, oa = resolve("hf", "gpt_neo"), resolve("hf", "gptj"), resolve("hf", "openai-gpt")
    assert neo.attn_upcast and j.attn_upcast and not resolve("hf", "gpt2").attn_upcast
    assert (oa.scale_op, oa.mask_fill) == ("div", "-1e4")
    assert resolve("meg", "gptmeg", ckpts["gptmeg"].config).gelu == "jit"
    assert resolve("fp32", "gpt2").force_dtype == "float32"
    erf = reference.parse_config(dict(model_type="gpt2", activation_function="gelu"))
    assert resolve("hf", "gpt2", erf).gelu == "erf" and resolve("meg", "gpt2", erf).gelu == "erf"
    mp = resolve("meg-parallel", "gpt2")
    assert mp.qk_layer_scaling and mp.softmax == "fp32" and mp.attn_scores == "baddbmm"


def test_meg_parallel_scores_carry_the_layer_number_scaling_in_fp32(ckpts):
    ck = ckpts["gpt2"]
    inp = default_batch(ck.config)
    tr = fast.run(ck, inp, variant="meg-parallel", dtype="float16")
    assert tr.dtypes["blocks.3.attn.scores"] == "float32"
    hf = fast.run(ck, inp, variant="hf", dtype="float16")
    rows = token_rows(inp)
    s = "blocks.0.attn.scores"  # layer 1: alpha = 1/4, times 1: same values as HF's
    m = valid(s, hf.sites[s], rows) & (hf.sites[s] > -1e4)
    assert np.array_equal(tr.sites[s][m], hf.sites[s][m])


# ----------------------------------------------------------------------------- CLI
def test_parity_trace_fast_meg_fp16(tiny_checkpoints, tmp_path):
    from parity.cli import main
    from parity.goldens.io import read_golden

    out = tmp_path / "x.safetensors"
    rc = main(["trace", str(tiny_checkpoints["gpt2"]), "--impl", "fast", "--variant", "meg",
               "--dtype", "fp16", "--tokens", "1 2 3", "--out", str(out)])
    assert rc == 0
    g = read_golden(out)
    assert g.meta["impl"] == "fast" and g.meta["variant"] == "meg"
    assert g.meta["dtype"] == "float16" and g.meta["emulate"] == "on"
    assert g.meta["jit_fused"] == "emulated" and "gelu=jit" in g.meta["knobs"]
    assert g.logits.shape == (1, 3, 512)
    assert main(["trace", str(tiny_checkpoints["gpt2"]), "--impl", "fast", "--variant",
                 "hf+gelu=fast", "--tokens", "1 2", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_emulation_matches_cuda_kernels(ckpts, family):
    ck = ckpts[family]
    inp = default_batch(ck.config)
    emu, cuda = lockstep(ck, "hf", "float16", dict(device="cpu"), dict(device="cuda"), inp)
    rows = token_rows(inp)
    tol = tolerance("emulated_vs_cuda", "ulps")
    low = {}
    for s in emu.sites:
        share = ulp_share(emu.sites[s], cuda.sites[s], emu.dtypes[s],
                          valid(s, emu.sites[s], rows) & (emu.sites[s] > -1e30), tol)
        if share < tolerance("emulated_vs_cuda", "min_share"):
            low[s] = share
    assert not low, low


@pytest.mark.gpu
def test_jit_gelu_really_fuses_on_cuda(ckpts):
    ck = ckpts["gptmeg"]
    tr = fast.run(ck, default_batch(ck.config), variant="meg", dtype="float16", device="cuda")
    assert tr.meta["jit_fused"] == "true"
