"""Agreement of the fast path's `hf` preset with transformers itself (issue 3), per site.

    python benchmarks/hf_adapter_agreement.py            # markdown tables on stdout

On the embedded tiny checkpoint of every family (2 rows, 12 tokens, the second left-padded by 5,
explicit position ids), transformers runs on the CPU through `parity.subjects.hf_adapter` (eager), and
the fast path runs
  - in float32,
  - in fp16 / bf16 with the CPU emulation of CUDA half precision (the default on a CPU), both
    accumulated (each on its own stream) and local (each fast block fed transformers' own input
    to that block, so that a figure belongs to that block's ops and not to what it inherits),
  - in fp16 / bf16 on torch's native CPU half kernels (`--emulate off`).
GPTMeg runs `hf+layernorm=fp32` in fp16 (GPTMeg upcasts LayerNorm for fp16 only), `hf` otherwise.
Figures: share of the compared elements within 1 ULP of the site's dtype and the largest ULP
distance, over real tokens and visible keys (padded query rows and masked score entries hold
implementation-defined values and never count); for float32 the largest relative error
max|fast - hf| / max|hf|. The figures are written into benchmarks/README.md by hand.
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from parity.subjects import fast
from parity.subjects import hf_adapter  # noqa: E402
from parity.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from parity.engine.compare import block_inputs, forward_local  # noqa: E402
from parity.checkpoints.inputs import Inputs  # noqa: E402
from parity.engine.metrics import ulp_distance, valid_mask  # noqa: E402
from parity.checkpoints.recipes import make_checkpoint  # noqa: E402


def padded_inputs(cfg, t: int = 12, seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :5] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + np.array([[0], [3]])
    return Inputs(ids, mask, pos)


def fast_variant(family: str, dtype: str) -> str:
    return "hf+layernorm=fp32" if family == "gptmeg" and dtype == "float16" else "hf"


def per_site(sub_sites, hf, ref, rows) -> dict[str, tuple[float, float, float]]:
    """site -> (share within 1 ULP, max ULP, max relative error), over the valid elements."""
    out = {}
    for s, a in hf.sites.items():
        v = valid_mask(s, ref[s], rows)
        y, h = sub_sites[s][v], a[v]
        u = ulp_distance(y, h, hf.dtypes[s])
        out[s] = (float(np.mean(u <= 1)), float(u.max()),
                  float(np.abs(y - h).max() / np.abs(h).max()))
    return out


def by_kind(figs: dict) -> dict[str, tuple[float, float]]:
    """Worst over layers of each site kind: (min share within 1 ULP, max ULP)."""
    out: dict[str, list] = {}
    for s, (share, mx, _) in figs.items():
        k = s.split(".", 2)[2] if s.startswith("blocks.") else s
        w = out.setdefault(k, [1.0, 0.0])
        w[0], w[1] = min(w[0], share), max(w[1], mx)
    return {k: (a, b) for k, (a, b) in out.items()}


def main() -> None:
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp())
    rows32, rowsh, kinds = [], [], {}
    for family in reference.FAMILIES:
        ck = load_checkpoint(make_checkpoint(family, root / family))
        inp = padded_inputs(ck.config)
        ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                                inp.position_ids)
        rows = inp.attention_mask.astype(bool)
        hf = hf_adapter.run(ck, inp, dtype="float32")
        f = fast.run(ck, inp, variant="hf", dtype="float32")
        figs = per_site(f.sites, hf, ref, rows)
        worst = max(figs, key=lambda s: figs[s][2])
        bitwise = all(v[1] == 0 for v in figs.values())
        rows32.append(f"| {family} | {len(figs)} | {figs[worst][2]:.1e} | "
                      f"{'yes' if bitwise else 'no'} |")
        for dtype in ("float16", "bfloat16"):
            var = fast_variant(family, dtype)
            hf = hf_adapter.run(ck, inp, dtype=dtype)
            acc = per_site(fast.run(ck, inp, variant=var, dtype=dtype).sites, hf, ref, rows)
            model = fast.FastModel(ck, var, dtype=dtype, emulate=True)
            loc = per_site(forward_local(model, inp, block_inputs(hf, ck.config)).sites,
                           hf, ref, rows)
            nat = per_site(fast.run(ck, inp, variant=var, dtype=dtype, emulate=False).sites,
                           hf, ref, rows)
            same = sum(v[1] == 0 for v in nat.values())
            n = sum(valid_mask(s, ref[s], rows).sum() for s in hf.sites)
            share_acc = sum(acc[s][0] * valid_mask(s, ref[s], rows).sum() for s in acc) / n
            lw = min(loc, key=lambda s: loc[s][0])
            rowsh.append(
                f"| {family} | {dtype} | {share_acc:.4f} | {max(v[1] for v in acc.values()):.0f} | "
                f"{max(v[2] for v in acc.values()):.1e} | "
                f"{loc[lw][0]:.4f} ({lw}) | {max(v[1] for v in loc.values()):.0f} | "
                f"{same}/{len(hf.sites)} |")
            kinds[(family, dtype)] = by_kind(loc)
    print("float32: fast `hf` vs transformers eager\n")
    print("| family | sites | max rel error | bitwise at every site |")
    print("|---|---|---|---|")
    print("\n".join(rows32))
    print("\nfp16 / bf16: fast (CPU emulation of CUDA) vs transformers (native CPU half)\n")
    print("| family | dtype | accumulated: share within 1 ULP | accumulated: max ULP | "
          "accumulated: max rel error | local: worst site share within 1 ULP | local: max ULP | "
          "--emulate off: sites bitwise equal |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rowsh))
    for dtype in ("float16", "bfloat16"):
        names = list(kinds[("gpt2", dtype)])
        print(f"\nlocal, {dtype}, per site kind (min share within 1 ULP / max ULP over layers)\n")
        print("| family | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for family in reference.FAMILIES:
            k = kinds[(family, dtype)]
            print(f"| {family} | " + " | ".join(
                f"{k[n][0]:.4f} / {k[n][1]:.0f}" if n in k else "-" for n in names) + " |")


def kernels() -> None:
    """Op by op: torch's native CPU half kernel against the emulation of the CUDA kernel
    (`fast.Numerics`), on random inputs of the tiny models' sizes."""
    print("\nop level: native CPU half kernel vs CUDA emulation, share of outputs that differ\n")
    print("| op | float16 | bfloat16 |")
    print("|---|---|---|")
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(24, 64, generator=g)
    w32 = torch.randn(64, 256, generator=g) / 8
    b32 = 0.1 * torch.randn(256, generator=g)
    s32 = 3 * torch.randn(2, 4, 12, 12, generator=g)
    res: dict[str, list[str]] = {}
    for dtype in ("float16", "bfloat16"):
        dt = getattr(torch, dtype)
        num = fast.Numerics(dtype, "cpu", emulate=True)
        x, w, b, s = (t.to(dt) for t in (x32, w32, b32, s32))
        xe, we, be, se = (num.r(t) for t in (x, w, b, s))  # the same values, emulated
        y = torch.addmm(b, x, w)
        ye = num.linear(xe, we, be)
        cases = {
            "addmm (Conv1D / Linear)": (y, ye),
            "pow(x, 3.0) (gelu_new)": (torch.pow(y, 3.0), num.pow3(ye)),
            "tanh": (torch.tanh(y), num.r(torch.tanh(ye))),
            "softmax": (torch.softmax(s, -1), num.softmax(se, num.dtype)),
            "layer_norm": (torch.nn.functional.layer_norm(y, (256,)),
                           num.layer_norm(ye, torch.ones(256), torch.zeros(256), 1e-5)),
            "matmul (B, H, T, T)": (torch.matmul(s, s), num.matmul(se, se)),
        }
        for name, (native, emulated) in cases.items():
            d = (native.float() != emulated.float()).double().mean().item()
            res.setdefault(name, []).append(f"{d:.4f}")
    for name, v in res.items():
        print(f"| {name} | {v[0]} | {v[1]} |")


if __name__ == "__main__":
    main()
    kernels()
