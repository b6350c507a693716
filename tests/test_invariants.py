"""Float64 invariants of the reference that hold whatever the weights (Hypothesis properties).

Each property states something any correct causal LM satisfies, so a bug in masks, caches,
positions or windows shows up as a counterexample printed as a recipe (config, seed, batch, ...).
Agreement is `float64_exact` from the budgets file: the two sides are the same math in a
different operation order. Padded query rows never count (DESIGN.md).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import reference
from parity.engine.budgets import tolerance
from reference.sites import site_kind

from tests.strategies import configs, seeds, token_batches, weights_for

EXACT = tolerance("float64_exact")
KEYED = ("attn.scores", "attn.probs")  # sites with a key axis after the query axis


def query_axis(site: str) -> int:
    """Axis of the (new) token positions: 2 for per-head sites (B, H, T, ...), else 1."""
    return 2 if site_kind(site).startswith("attn.") and site_kind(site) not in (
        "attn.context", "attn.out") else 1


def take(site: str, a: np.ndarray, row: int, queries, keys=None) -> np.ndarray:
    """Row `row`, query positions `queries` (and key positions `keys` for scores/probs)."""
    a = a[row]
    a = np.take(a, np.asarray(queries), axis=query_axis(site) - 1)
    if keys is not None and site_kind(site) in KEYED:
        a = np.take(a, np.asarray(keys), axis=-1)
    return a


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, tol: float = EXACT):
    """max |actual - expected| <= tol * max |expected| over finite entries; infinite entries
    (masked scores) must match exactly."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    inf_a, inf_e = ~np.isfinite(actual), ~np.isfinite(expected)
    assert (inf_a == inf_e).all() and (actual[inf_e] == expected[inf_e]).all(), (
        f"{what}: masked (non-finite) entries differ")
    fin = ~inf_e
    if not fin.any():
        return
    err = float(np.max(np.abs(actual[fin] - expected[fin])))
    scale = float(np.max(np.abs(expected[fin])))
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.0e} x max|ref| {scale:.3e}"


def real_positions(mask, row: int, t: int) -> np.ndarray:
    return np.arange(t) if mask is None else np.flatnonzero(mask[row] == 1)


def draw_model(data, family=None, **kw):
    raw = data.draw(configs(family=family, **kw), label="config")
    cfg = reference.parse_config(raw)
    return cfg, weights_for(cfg, data.draw(seeds(), label="seed"))


# ------------------------------------------------------------------------------- the strategies
@given(data=st.data())
def test_strategies_draw_valid_models_and_batches(data):
    """The strategies' own contract, which the properties below lean on."""
    cfg, W = draw_model(data)
    assert {k: v.shape for k, v in W.items()} == reference.param_shapes(cfg)
    assert all(v.dtype == np.float64 and np.isfinite(v).all() for v in W.values())
    ids, mask, pos = data.draw(token_batches(cfg), label="batch")
    b, t = ids.shape
    assert ids.dtype == np.int64 and 1 <= t <= cfg.n_positions
    assert ids.min() >= 0 and ids.max() < cfg.vocab_size
    if mask is not None:
        assert mask.shape == (b, t) and (mask.sum(axis=1) >= 1).all()
        assert (np.diff(mask, axis=1) >= 0).all(), "padding must be on the left"
    if pos is not None:
        assert pos.shape == (b, t) and pos.min() >= 0 and pos.max() < cfg.n_positions
        for r in range(b):
            real = real_positions(mask, r, t)
            assert (pos[r, real] == np.arange(len(real))).all()


# ------------------------------------------------------------------------------- causality
@given(data=st.data())
def test_changing_a_token_changes_nothing_before_it(data):
    cfg, W = draw_model(data)
    ids, mask, pos = data.draw(token_batches(cfg, min_len=2), label="batch")
    b, t = ids.shape
    row = data.draw(st.integers(0, b - 1), label="changed row")
    at = data.draw(st.integers(1, t - 1), label="changed position")
    new = data.draw(st.integers(0, cfg.vocab_size - 1).filter(lambda x: x != ids[row, at]),
                    label="new id")
    ids2 = ids.copy()
    ids2[row, at] = new
    before = reference.forward(cfg, W, ids, mask, pos)
    after = reference.forward(cfg, W, ids2, mask, pos)
    assert not np.array_equal(before["embed"][row, at], after["embed"][row, at]), \
        "the changed token did not change its embedding: the property would be vacuous"
    for site, a in before.sites.items():
        for r in range(b):
            q = np.arange(t) if r != row else np.arange(at)
            assert_close(take(site, after[site], r, q), take(site, a, r, q),
                         f"{site} row {r} positions {q.min()}..{q.max()}")


# ------------------------------------------------------------------------------- KV cache
@given(data=st.data())
def test_decoding_with_the_cache_equals_the_full_forward(data):
    cfg, W = draw_model(data)
    ids, mask, pos = data.draw(token_batches(cfg, min_len=2), label="batch")
    b, t = ids.shape
    s = data.draw(st.integers(1, t - 1), label="split")
    cut = lambda a, sl: None if a is None else a[:, sl]  # noqa: E731
    full = reference.forward(cfg, W, ids, mask, pos)
    first = reference.forward(cfg, W, ids[:, :s], cut(mask, slice(None, s)), cut(pos, slice(None, s)))
    # the second call sees the whole mask (past + new); position ids continue where they were
    second = reference.forward(cfg, W, ids[:, s:], mask, cut(pos, slice(s, None)), past=first.cache)
    assert len(second.cache) == cfg.n_layer
    for r in range(b):
        real = real_positions(mask, r, t)
        head, tail = real[real < s], real[real >= s]
        for site, a in full.sites.items():
            if len(head):
                assert_close(take(site, first[site], r, head, head),
                             take(site, a, r, head, head), f"{site} row {r} first part")
            if len(tail):
                assert_close(take(site, second[site], r, tail - s, real),
                             take(site, a, r, tail, real), f"{site} row {r} decoded part")
        for i, ((k, v), (fk, fv)) in enumerate(zip(second.cache, full.cache)):
            assert_close(k[r][:, real], fk[r][:, real], f"cache k layer {i} row {r}")
            assert_close(v[r][:, real], fv[r][:, real], f"cache v layer {i} row {r}")


# ------------------------------------------------------------------------------- padding
@given(data=st.data())
def test_left_padding_changes_no_real_token(data):
    cfg, W = draw_model(data)
    ids, mask, pos = data.draw(token_batches(cfg, min_len=2, padding=True), label="padded batch")
    padded = reference.forward(cfg, W, ids, mask, pos)
    for r in range(ids.shape[0]):
        real = np.flatnonzero(mask[r] == 1)
        assert (pos[r, real] == np.arange(len(real))).all()  # the strategy's contract
        alone = reference.forward(cfg, W, ids[r:r + 1, real])  # unpadded, default positions
        n = np.arange(len(real))
        for site, a in alone.sites.items():
            assert_close(take(site, padded[site], r, real, real), take(site, a, 0, n, n),
                         f"{site} row {r} ({ids.shape[1] - len(real)} pads)")


@given(data=st.data())
def test_rows_of_a_batch_are_independent(data):
    cfg, W = draw_model(data)
    # at least two rows: a batch of one compared with its only row is the same forward twice
    ids, mask, pos = data.draw(token_batches(cfg, max_batch=4, min_batch=2), label="batch")
    assert ids.shape[0] >= 2
    batch = reference.forward(cfg, W, ids, mask, pos)
    one = lambda a, r: None if a is None else a[r:r + 1]  # noqa: E731
    for r in range(ids.shape[0]):
        alone = reference.forward(cfg, W, ids[r:r + 1], one(mask, r), one(pos, r))
        real = real_positions(mask, r, ids.shape[1])
        for site, a in alone.sites.items():
            assert_close(take(site, batch[site], r, real, real), take(site, a, 0, real, real),
                         f"{site} row {r} of {ids.shape[0]}")


# ------------------------------------------------------------------------------- GPT-Neo windows
@given(data=st.data())
def test_gpt_neo_attention_sees_exactly_its_window(data):
    """Scores are finite exactly where query i may see key j: j <= i, and i - j < window_size
    in local layers (MODEL_NOTES section 3)."""
    cfg, W = draw_model(data, family="gpt_neo")
    ids, _, _ = data.draw(token_batches(cfg, padding=False), label="batch")
    t = ids.shape[1]
    trace = reference.forward(cfg, W, ids, sites="blocks.*.attn.scores")
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    for layer in range(cfg.n_layer):
        expected = j <= i
        if cfg.layer_kind(layer) == "local":
            expected = expected & (i - j < cfg.window_size)
        seen = np.isfinite(trace[f"blocks.{layer}.attn.scores"])
        assert (seen == expected).all(), (
            f"layer {layer} ({cfg.layer_kind(layer)}, window {cfg.window_size}): visible keys "
            f"differ from the window rule")


@given(data=st.data())
def test_gpt_neo_local_layers_are_blind_beyond_their_reach(data):
    """With every layer local, the last position depends only on the last L*(w-1)+1 tokens
    (each layer reaches w-1 further back); the first token within reach does change it."""
    raw = data.draw(configs(family="gpt_neo", layer_kinds=st.just("local")), label="config")
    n_layer, t_max = raw["num_layers"], min(12, raw["max_position_embeddings"])
    raw["window_size"] = data.draw(st.integers(1, (t_max - 2) // n_layer + 1), label="window")
    cfg = reference.parse_config(raw)
    W = weights_for(cfg, data.draw(seeds(), label="seed"))
    reach = n_layer * (cfg.window_size - 1)
    t = data.draw(st.integers(reach + 2, t_max), label="length")
    ids, _, _ = data.draw(token_batches(cfg, min_len=t, max_len=t, padding=False), label="batch")
    far = data.draw(st.integers(0, t - 2 - reach), label="changed position (out of reach)")
    last = np.array([t - 1])
    base = reference.forward(cfg, W, ids)

    def changed(at):
        ids2 = ids.copy()
        ids2[:, at] = (ids[:, at] + 1) % cfg.vocab_size
        return reference.forward(cfg, W, ids2)

    out = changed(far)
    for site, a in base.sites.items():
        for r in range(ids.shape[0]):
            assert_close(take(site, out[site], r, last), take(site, a, r, last),
                         f"{site} row {r} at the last position after changing position {far}")
    edge = changed(t - 1 - reach)  # the farthest token within reach must matter
    diff = np.abs(edge.logits[:, -1] - base.logits[:, -1]).max()
    assert diff > EXACT * np.abs(base.logits[:, -1]).max(), (
        f"changing position {t - 1 - reach} (within reach {reach}) left the last logits unchanged")


# ------------------------------------------------------------------------------- GPT-J rotary
@given(data=st.data())
def test_gptj_scores_are_invariant_to_a_shift_of_all_positions(data):
    """Rotary attention depends on position differences only: adding c to every position id
    leaves layer 0's scores (and so everything after them) unchanged, while q itself turns."""
    cfg, W = draw_model(data, family="gptj")
    ids, mask, pos = data.draw(token_batches(cfg, max_len=min(12, cfg.n_positions - 1)),
                               label="batch")
    b, t = ids.shape
    pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
    shift = data.draw(st.integers(1, cfg.n_positions - 1 - int(pos.max())), label="shift")
    keep = "blocks.0.attn.q,blocks.0.attn.scores"
    base = reference.forward(cfg, W, ids, mask, pos, sites=keep)
    moved = reference.forward(cfg, W, ids, mask, pos + shift, sites=keep)
    q0, q1 = base["blocks.0.attn.q"], moved["blocks.0.attn.q"]
    assert np.abs(q1 - q0).max() > EXACT * np.abs(q0).max(), "the shift did not rotate q"
    for r in range(b):
        real = real_positions(mask, r, t)
        for site in ("blocks.0.attn.scores", "logits"):
            assert_close(take(site, moved[site], r, real, real),
                         take(site, base[site], r, real, real), f"{site} row {r} shift {shift}")
