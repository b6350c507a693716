"""Agreements that depend on torch's native CPU kernels, per CPU kernel level.

    python benchmarks/cpu_capabilities.py              # every level, markdown table on stdout
    python benchmarks/cpu_capabilities.py --json       # the same figures as JSON
    python benchmarks/cpu_capabilities.py --worker     # the figures of this process's level

Which CPU kernels torch runs is decided by two independent things:
  - ATen's own vectorized kernels (elementwise ops, reductions, softmax, LayerNorm, tanh, erf,
    and the fallback GEMM) dispatch on the instruction-set level torch reports,
    torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers it.
  - half-precision GEMMs (addmm, matmul, baddbmm in fp16 / bf16) go to oneDNN only where the
    CPU has the instructions for it: bf16 needs AVX-512 (bw, vl, dq), fp16 needs AVX512-FP16 or
    AMX-FP16. Elsewhere (every AVX2-only CPU, and fp16 on most AVX-512 CPUs) they run ATen's
    own GEMM. ATEN_CPU_CAPABILITY does NOT change this choice; torch.backends.mkldnn.enabled =
    False does (the `--onednn off` levels below), and is what a CPU without AVX-512 gets.
So a level is (ATen capability, oneDNN half GEMMs on/off). Each runs in its own process (the
capability is read once, at import). MKL_ENABLE_INSTRUCTIONS=AVX2 goes with the AVX2 and
default levels (fp32 GEMMs of a CPU without AVX-512).

Figures, on the embedded tiny checkpoints (same inputs as the tests):
  hf_local        tests/test_hf_adapter.py::test_fast_emulated_half_agrees_with_transformers_cpu_
                  per_block: min over sites of the share within 1 ULP (fast emulation, local,
                  vs transformers' native CPU half), per family and dtype
  native_bitwise  ...::test_fast_native_half_is_transformers_bitwise: sites bitwise equal / sites
  lockstep        tests/test_fast.py::test_emulation_agrees_with_native_cpu_half_within_a_few_ulps:
                  min over sites of the share within `emulated_vs_native_cpu` ulps
  meg_ln_differs  ...::test_gptmeg_fp16_layernorm_is_fp32_rounded_once: native fp16 LayerNorm
                  differs from the upcast one on a stream with mean 100 (the test needs True)
  goldens         `parity golden check` on golden/: pass / skip / fail per device class and the
                  largest change of a cpu-emulated golden in eps of its dtype
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (ATen capability, oneDNN half GEMMs): env of the process and whether mkldnn stays enabled
LEVELS = {
    "default": ("default", False), "avx2": ("avx2", False), "avx512": ("avx512", True),
    "default+onednn": ("default", True), "avx2+onednn": ("avx2", True),
    "avx512-onednn": ("avx512", False),
}
REAL = {  # which real CPUs each level stands for
    "default": "ATEN_CPU_CAPABILITY=default on a CPU without AVX-512",
    "avx2": "a CPU with AVX2 and no AVX-512 (the issue's machine)",
    "avx512": "an AVX-512 CPU with AVX512-FP16/AMX (this machine, as is)",
    "default+onednn": "ATEN_CPU_CAPABILITY=default on an AVX-512 CPU",
    "avx2+onednn": "ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU",
    "avx512-onednn": "fp16: an AVX-512 CPU without AVX512-FP16 (e.g. AMD Zen 4, Ice Lake)",
}


def level_env(level: str) -> dict:
    cap, _ = LEVELS[level]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, PARITY_ONEDNN=("on" if LEVELS[level][1]
                                                                    else "off"))
    if cap != "avx512":
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
    else:
        env.pop("MKL_ENABLE_INSTRUCTIONS", None)
    return env


def apply_onednn_setting() -> None:
    """PARITY_ONEDNN=off: no oneDNN half GEMMs, as on a CPU without AVX-512 (see above)."""
    import torch

    if os.environ.get("PARITY_ONEDNN", "on") == "off":
        torch.backends.mkldnn.enabled = False


# ----------------------------------------------------------------------------- pytest plugin
def pytest_configure(config):  # `python -m pytest -p benchmarks.cpu_capabilities` (.ci/run)
    apply_onednn_setting()


# ----------------------------------------------------------------------------- figures
def model_figures() -> dict:
    import torch

    import reference
    from benchmarks.hf_adapter_agreement import fast_variant, padded_inputs, per_site
    from parity.subjects import fast, hf_adapter
    from parity.engine.budgets import tolerance
    from parity.checkpoints.checkpoint import load_checkpoint
    from parity.engine.compare import block_inputs, forward_local, token_rows
    from tests.test_fast import lockstep  # two FastModels fed one stream, block by block
    from parity.checkpoints.inputs import default_batch
    from parity.engine.metrics import ulp_distance, valid_mask
    from parity.checkpoints.recipes import make_checkpoint

    root = Path(tempfile.mkdtemp())
    out: dict = {"hf_local": {}, "native_bitwise": {}, "lockstep": {}}
    ulps = tolerance("emulated_vs_native_cpu", "ulps")
    for family in reference.FAMILIES:
        ck = load_checkpoint(make_checkpoint(family, root / family))
        inp = padded_inputs(ck.config)
        ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                                inp.position_ids)
        rows = inp.attention_mask.astype(bool)
        for dtype in ("float16", "bfloat16"):
            key = f"{family} {dtype}"
            var = fast_variant(family, dtype)
            hf = hf_adapter.run(ck, inp, dtype=dtype)
            model = fast.FastModel(ck, var, dtype=dtype, emulate=True)
            loc = per_site(forward_local(model, inp, block_inputs(hf, ck.config)).sites,
                           hf, ref, rows)
            w = min(loc, key=lambda s: loc[s][0])
            out["hf_local"][key] = [loc[w][0], w, loc[w][1]]
            nat = fast.run(ck, inp, variant=var, dtype=dtype, emulate=False)
            same = sum(np.array_equal(nat[s][valid_mask(s, ref[s], rows)],
                                      hf[s][valid_mask(s, ref[s], rows)]) for s in hf.sites)
            out["native_bitwise"][key] = [int(same), len(hf.sites)]
            binp = default_batch(ck.config)
            emu, natl = lockstep(ck, "hf", dtype, dict(emulate=True), dict(emulate=False),
                                 binp)
            brows = token_rows(binp)
            shares = {}
            for s in emu.sites:
                m = valid_mask(s, emu.sites[s], brows) & (emu.sites[s] > -1e30)
                shares[s] = float(np.mean(ulp_distance(emu.sites[s][m], natl.sites[s][m],
                                                       dtype) <= ulps))
            w = min(shares, key=shares.get)
            out["lockstep"][key] = [shares[w], w]
    # GPTMeg: torch's native fp16 LayerNorm vs the upcast one on a stream with mean 100
    g = torch.Generator().manual_seed(0)
    x = (100 + torch.randn(256, 64, generator=g)).half()
    wt, b = torch.ones(64).half(), torch.zeros(64).half()
    nat = torch.nn.functional.layer_norm(x, (64,), wt, b, 1e-5)
    up = torch.nn.functional.layer_norm(x.float(), (64,), wt.float(), b.float(), 1e-5).half()
    out["meg_ln_differs"] = bool(not torch.equal(nat, up))
    return out


def golden_figures() -> dict:
    from parity.goldens import check as goldens

    results = goldens.check(goldens.DEFAULT_DIR)
    counts: dict = {}
    worst = [0.0, ""]
    for r in results:
        c = r.spec.device_class if r.spec else "?"
        counts.setdefault(c, {"pass": 0, "skip": 0, "fail": 0})[r.verdict] += 1
        if c == "cpu-emulated":
            for d in r.sites:
                e = d.rel / goldens.EPS[r.spec.dtype]
                if e > worst[0]:
                    worst = [e, f"{r.name} {d.site}"]
    return {"goldens": counts, "golden_emulated_max_eps": worst,
            "fingerprint": goldens.cpu_fingerprint()}


def worker() -> dict:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # as the test suite (conftest.py)
    apply_onednn_setting()
    out = {"capability": torch.backends.cpu.get_cpu_capability(),
           "onednn": torch.backends.mkldnn.enabled}
    out.update(model_figures())
    out.update(golden_figures())
    return out


# ----------------------------------------------------------------------------- driver
def run_levels(levels) -> dict:
    figs = {}
    for lv in levels:
        p = subprocess.run([sys.executable, __file__, "--worker"], env=level_env(lv), cwd=ROOT,
                           capture_output=True, text=True, check=False)
        if p.returncode:
            raise SystemExit(f"level {lv} failed:\n{p.stderr[-3000:]}")
        figs[lv] = json.loads(p.stdout.strip().splitlines()[-1])
    return figs


def table(figs: dict) -> str:
    lv = list(figs)
    head = "| agreement | " + " | ".join(lv) + " |\n|---|" + "---|" * len(lv) + "\n"
    rows = []
    first = figs[lv[0]]
    for key in first["hf_local"]:
        rows.append(f"| hf_local min share <=1 ULP, {key} | " + " | ".join(
            f"{figs[v]['hf_local'][key][0]:.4f} ({figs[v]['hf_local'][key][1]})" for v in lv)
            + " |")
    for key in first["lockstep"]:
        rows.append(f"| lockstep emu vs native min share <=2 ulps, {key} | " + " | ".join(
            f"{figs[v]['lockstep'][key][0]:.4f} ({figs[v]['lockstep'][key][1]})" for v in lv)
            + " |")
    for key in first["native_bitwise"]:
        rows.append(f"| --emulate off vs transformers, sites bitwise, {key} | " + " | ".join(
            "{}/{}".format(*figs[v]["native_bitwise"][key]) for v in lv) + " |")
    rows.append("| native fp16 LayerNorm differs from upcast | " + " | ".join(
        str(figs[v]["meg_ln_differs"]) for v in lv) + " |")
    rows.append("| golden check pass/skip/fail (cpu-emulated; cpu-native) | " + " | ".join(
        "{}/{}/{}; {}/{}/{}".format(*figs[v]["goldens"]["cpu-emulated"].values(),
                                    *figs[v]["goldens"]["cpu-native"].values()) for v in lv)
        + " |")
    rows.append("| cpu-emulated goldens, max change in eps | " + " | ".join(
        f"{figs[v]['golden_emulated_max_eps'][0]:.2f}" for v in lv) + " |")
    return head + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--levels", default=",".join(LEVELS))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker()))
        return
    figs = run_levels(a.levels.split(","))
    if a.json:
        print(json.dumps(figs, indent=1))
        return
    print(table(figs))
    print("\n" + "\n".join(f"- {lv}: {REAL[lv]}" for lv in figs))


if __name__ == "__main__":
    main()
