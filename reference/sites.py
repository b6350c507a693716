"""The one site-naming scheme (DESIGN.md "Sites"), per family, in execution order.

Which block sites a family has, and whether it has a final LayerNorm, are facts of the family
registry (`reference.families`: `block_sites`, `ln_f`); this module strings them into names.
"""
from __future__ import annotations

from .families import ATTN, MLP, PARALLEL, POST_LN, PRE_LN, family  # noqa: F401


def block_output_site(name: str) -> str:
    """The site that is the stream handed to the next block."""
    return family(name).block_output


def site_names(name: str, n_layer: int, block: str | None = None) -> list[str]:
    """Every site of a model, in order; `block` is the config's block kind (`cfg.block`) where
    the config may switch it (GPT-NeoX's use_parallel_residual), None for the family's own."""
    fam = family(name)
    names = ["embed"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{s}" for s in fam.sites_for(block)]
    if fam.ln_f:
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
