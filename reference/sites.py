"""The one site-naming scheme (DESIGN.md "Sites"), per family, in execution order."""
from __future__ import annotations

ATTN = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context", "attn.out")
MLP = ("mlp.fc_in", "mlp.act", "mlp.out")

# Pre-LN sequential blocks (GPT-2, GPT-Neo, GPTMeg)
PRE_LN = ("ln_1", *ATTN, "resid_mid", "ln_2", *MLP, "resid_post")
# OpenAI GPT is post-LN: resid_mid = h + attn, ln_1 = LN1(resid_mid);
# resid_post = ln_1 + mlp, ln_2 = LN2(resid_post) is the block output.
POST_LN = (*ATTN, "resid_mid", "ln_1", *MLP, "resid_post", "ln_2")
# GPT-J parallel block: one LN feeds both branches; resid_post = attn + mlp + h.
PARALLEL = ("ln_1", *ATTN, *MLP, "resid_post")

BLOCK_SITES = {
    "openai-gpt": POST_LN,
    "gpt2": PRE_LN,
    "gptmeg": PRE_LN,
    "gpt_neo": PRE_LN,
    "gptj": PARALLEL,
}
HAS_LN_F = {"openai-gpt": False, "gpt2": True, "gptmeg": True, "gpt_neo": True, "gptj": True}


def block_output_site(family: str) -> str:
    """The site that is the stream handed to the next block."""
    return "ln_2" if family == "openai-gpt" else "resid_post"


def site_names(family: str, n_layer: int) -> list[str]:
    names = ["embed"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{s}" for s in BLOCK_SITES[family]]
    if HAS_LN_F[family]:
        names.append("ln_f")
    names.append("logits")
    return names


def site_layer(site: str) -> int | None:
    """Layer index of a block site, None for embed / ln_f / logits."""
    if site.startswith("blocks."):
        return int(site.split(".")[1])
    return None


def site_kind(site: str) -> str:
    """'blocks.3.attn.q' -> 'attn.q'; 'embed' -> 'embed'."""
    if site.startswith("blocks."):
        return site.split(".", 2)[2]
    return site
