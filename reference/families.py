"""The family registry: every fact about each supported family, stated once.

    from reference.families import FAMILIES, family
    fam = family("gptj")        # -> Family (frozen); unknown names raise UnknownFamily
    fam.tok, fam.block, fam.rotary, fam.hf_class

Facts only: the per-family math lives in the family's reference module (`reference/<module>.py`);
the fast path, the transformers adapter, checkpoint IO, recipes and reports read the facts here
and branch on them (`fam.block == "post"`, `fam.rotary`), never on a family's name. A new family
is one reference module, one entry below and its recipe presets (`parity/checkpoints/recipes.py`).

Names are the checkpoint's keys without the `key_prefix` and without `h.{i}.` inside a block
(so `attn.c_attn` is the weight `transformer.h.3.attn.c_attn.weight`). Pure Python: imports
neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- block site lists
# The site scheme of DESIGN.md "Sites", per block kind, in execution order (a test pins the full
# ordered list per family).
ATTN = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.context", "attn.out")
MLP = ("mlp.fc_in", "mlp.act", "mlp.out")
# pre-LN sequential: h <- h + Attn(LN1 h); h <- h + MLP(LN2 h)
PRE_LN = ("ln_1", *ATTN, "resid_mid", "ln_2", *MLP, "resid_post")
# post-LN: resid_mid = h + attn, ln_1 = LN1(resid_mid); resid_post = ln_1 + mlp, ln_2 =
# LN2(resid_post) is the block output
POST_LN = (*ATTN, "resid_mid", "ln_1", *MLP, "resid_post", "ln_2")
# parallel: one LN feeds both branches; resid_post = attn + mlp + h
PARALLEL = ("ln_1", *ATTN, *MLP, "resid_post")

BLOCK_KINDS = ("pre", "post", "parallel")
SCALE_RULES = ("config", "inv_sqrt_hd", "none")
ROTARY_STYLES = (None, "interleaved")

# ----------------------------------------------------------------------------- config.json keys
# Where a config.json keeps each ModelConfig field (first key present wins), per HF config class.
GPT2_CONFIG_KEYS = {
    "d_model": ("n_embd", "hidden_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_positions": ("n_positions", "max_position_embeddings"),
    "d_inner": ("n_inner",),  # null or absent: 4 * d_model
    "activation": ("activation_function",),
}
GPT_NEO_CONFIG_KEYS = {
    "d_model": ("hidden_size", "n_embd"),
    "n_layer": ("num_layers", "num_hidden_layers", "n_layer"),
    "n_head": ("num_heads", "num_attention_heads", "n_head"),
    "n_positions": ("max_position_embeddings", "n_positions"),
    "d_inner": ("intermediate_size",),
    "activation": ("activation_function",),
}


class UnknownFamily(ValueError):
    """A family name (HF model_type) the registry has no entry for."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """One family's facts (MODEL_NOTES.md); built by keyword, one entry per family."""

    name: str  # the HF model_type
    module: str  # the reference module with its float64 math: reference/<module>.py
    # -- Hugging Face
    hf_class: str  # `architectures` of config.json
    hf_attn_implementations: tuple[str, ...]  # what the transformers adapter can run
    hf_cache: bool = True  # transformers returns a key/value cache for it
    # transformers has no class of its own: (config class, model class) it runs in its place
    hf_stand_in: tuple[str, str] | None = None
    # HF eager attention numerics: q, k upcast to fp32 (and an fp32 softmax); how the scale is
    # applied ("mul" by hd^-0.5 or "div" by sqrt(hd)); what masked scores hold
    hf_attn_upcast: bool = False
    hf_scale_op: str = "mul"
    hf_mask_fill: str = "finfo_min"
    # -- config.json
    config_keys: dict = field(default_factory=lambda: dict(GPT2_CONFIG_KEYS))
    # defaults of the HF config class: vocab_size, n_positions, d_model, n_layer, n_head
    defaults: dict = field(default_factory=dict)
    activation: str = "gelu_new"  # the default activation
    activation_aliases: dict = field(default_factory=dict)  # config value -> ops.ACTIVATIONS name
    tie_default: bool = True  # tie_word_embeddings when config.json does not say
    # -- checkpoint names
    key_prefix: str = "transformer."  # stored keys carry it (or not); the LM head never does
    tok: str = "wte"  # token embedding
    pos: str | None = "wpe"  # learned position embedding (None: positions come from rotary)
    ln: tuple[str, ...] = ("ln_1", "ln_2")  # the LayerNorms of a block
    qkv: tuple[str, ...] = ("attn.c_attn",)  # one fused q|k|v projection, or q, k, v
    qkv_bias: bool = True
    out_proj: str = "attn.c_proj"
    out_bias: bool = True
    fc_in: str = "mlp.c_fc"
    fc_out: str = "mlp.c_proj"
    lm_head: str = "lm_head"
    lm_head_bias: bool = False
    legacy_buffers: tuple[str, ...] = ("attn.bias", "attn.masked_bias")  # ignored when loading
    # -- weight layout and wiring
    conv1d: bool = True  # Conv1D weights [in, out] (x W); False: nn.Linear [out, in] (x W^T)
    block: str = "pre"  # pre | post | parallel
    block_sites: tuple[str, ...] = PRE_LN
    ln_f: bool = True  # a final LayerNorm before the head
    # attention scores: "config" (GPT-2's scale_attn_weights / scale_attn_by_inverse_layer_idx),
    # "inv_sqrt_hd" (always 1/sqrt(hd)), "none" (q k^T unscaled)
    scale: str = "inv_sqrt_hd"
    rotary: str | None = None  # "interleaved": pairs (x0, x1) rotated, first rotary_dim dims
    windowed: bool = False  # local (windowed) layers where config attention_types says so
    megatron: bool = False  # Megatron numerics: fp32 LayerNorm, Megatron gelu, baddbmm scores
    unused_embedding_rows: bool = False  # the vocabulary is padded beyond the tokenizer
    # the slow tokenizer: "byte-level" (GPT2Tokenizer) or "bert-bpe" (OpenAIGPTTokenizer:
    # BERT-normalized words, `</w>` word ends, <unk>)
    tokenizer: str = "byte-level"
    # -- reports
    report_pairs: tuple[tuple[str, str], ...] = ()  # variants attributed subject vs subject

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

    @property
    def attn_module(self) -> str:
        """The attention module inside a block (the parent of the output projection)."""
        return self.out_proj.rsplit(".", 1)[0]

    @property
    def block_output(self) -> str:
        """The site that is the stream handed to the next block."""
        return "ln_2" if self.block == "post" else "resid_post"

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Weight names of the token and (if any) position embeddings."""
        return (self.tok + ".weight",) + (() if self.pos is None else (self.pos + ".weight",))

    def canonical_key(self, key: str) -> str:
        return key.removeprefix(self.key_prefix)


_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, d_model=768, n_layer=12, n_head=12)
_GPT2_PAIRS = (("meg", "hf"),)  # where Megatron's and HF's numerics part ways on GPT-2 weights

_ENTRIES = (
    Family(
        name="openai-gpt", module="openai_gpt", hf_class="OpenAIGPTLMHeadModel",
        hf_attn_implementations=("eager",),
        hf_cache=False,  # transformers keeps no cache: k, v are read off c_attn
        hf_scale_op="div", hf_mask_fill="-1e4",  # a true division; masked by replacement
        config_keys={**GPT2_CONFIG_KEYS, "activation": ("afn",)},
        defaults=dict(_GPT2_DEFAULTS, vocab_size=40478, n_positions=512),
        activation_aliases={"gelu": "gelu_new"},  # its own table maps "gelu" to the tanh form
        tok="tokens_embed", pos="positions_embed", tokenizer="bert-bpe",
        block="post", block_sites=POST_LN, ln_f=False,
    ),
    Family(
        name="gpt2", module="gpt2", hf_class="GPT2LMHeadModel",
        hf_attn_implementations=("eager", "sdpa"),
        defaults=_GPT2_DEFAULTS, scale="config", report_pairs=_GPT2_PAIRS,
    ),
    Family(
        name="gpt_neo", module="gpt_neo", hf_class="GPTNeoForCausalLM",
        hf_attn_implementations=("eager",), hf_attn_upcast=True,
        config_keys=GPT_NEO_CONFIG_KEYS,
        defaults=dict(vocab_size=50257, n_positions=2048, d_model=2048, n_layer=24, n_head=16),
        qkv=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
        qkv_bias=False, out_proj="attn.attention.out_proj",
        legacy_buffers=("attn.attention.bias", "attn.attention.masked_bias"),
        conv1d=False,
        scale="none",  # HF GPT-Neo does not scale its scores
        windowed=True,
    ),
    Family(
        name="gptj", module="gptj", hf_class="GPTJForCausalLM",
        hf_attn_implementations=("eager", "sdpa"), hf_attn_upcast=True,
        # vocab 50400 = 50257 used + 143 TPU padding rows
        defaults=dict(vocab_size=50400, n_positions=2048, d_model=4096, n_layer=28, n_head=16),
        tie_default=False,
        pos=None, ln=("ln_1",),
        qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"), qkv_bias=False,
        out_proj="attn.out_proj", out_bias=False, fc_in="mlp.fc_in", fc_out="mlp.fc_out",
        lm_head_bias=True,  # kept even when the weight is tied
        conv1d=False, block="parallel", block_sites=PARALLEL,
        rotary="interleaved", unused_embedding_rows=True,
    ),
    Family(
        name="gptmeg", module="gptmeg",
        hf_class="GPTMegLMHeadModel",  # ours: not in transformers
        hf_attn_implementations=("eager", "baddbmm", "sdpa"),  # baddbmm: registered by us
        hf_stand_in=("GPT2Config", "GPT2LMHeadModel"),  # its weights and config are GPT-2's
        defaults=_GPT2_DEFAULTS,
        activation="gelu_megatron",  # Megatron's gelu unless the config says otherwise
        scale="config", megatron=True, report_pairs=_GPT2_PAIRS,
    ),
)

REGISTRY: dict[str, Family] = {f.name: f for f in _ENTRIES}
FAMILIES: tuple[str, ...] = tuple(REGISTRY)  # ordered names


def family(name: str) -> Family:
    """The registry entry of a family (its HF model_type)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownFamily(
            f"unknown family {name!r} (known: {', '.join(FAMILIES)})") from None
