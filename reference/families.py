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
# parallel with two LNs (GPT-NeoX): ln_1 feeds attention, ln_2 (of the same h) the MLP;
# resid_post = mlp + attn + h. There is no resid_mid: both LNs read the block input.
PARALLEL_2LN = ("ln_1", *ATTN, "ln_2", *MLP, "resid_post")

BLOCK_KINDS = ("pre", "post", "parallel")
SCALE_RULES = ("config", "inv_sqrt_hd", "none")
# interleaved: pairs (x0, x1), (x2, x3)... (GPT-J); rotate_half: x_j paired with x_{j+R/2} (NeoX)
ROTARY_STYLES = (None, "interleaved", "rotate_half")
QKV_LAYOUTS = ("blocks", "per_head")
ROTARY_CONFIGS = ("rotary_dim", "partial_rotary_factor")


def sites_of(block: str, ln: tuple[str, ...]) -> tuple[str, ...]:
    """The block site list of a block kind with these LayerNorms."""
    if block == "parallel":
        return PARALLEL_2LN if len(ln) == 2 else PARALLEL
    return {"pre": PRE_LN, "post": POST_LN}[block]

# ----------------------------------------------------------------------------- config.json keys
# Where a config.json keeps each ModelConfig field (first key present wins), per HF config class.
GPT2_CONFIG_KEYS = {
    "d_model": ("n_embd", "hidden_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_positions": ("n_positions", "max_position_embeddings"),
    "d_inner": ("n_inner",),  # null or absent: 4 * d_model
    "activation": ("activation_function",),
    "eps": ("layer_norm_epsilon",),
}
GPT_NEO_CONFIG_KEYS = {
    "d_model": ("hidden_size", "n_embd"),
    "n_layer": ("num_layers", "num_hidden_layers", "n_layer"),
    "n_head": ("num_heads", "num_attention_heads", "n_head"),
    "n_positions": ("max_position_embeddings", "n_positions"),
    "d_inner": ("intermediate_size",),
    "activation": ("activation_function",),
    "eps": ("layer_norm_epsilon",),
}
GPT_NEOX_CONFIG_KEYS = {
    "d_model": ("hidden_size",),
    "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",),
    "n_positions": ("max_position_embeddings",),
    "d_inner": ("intermediate_size",),
    "activation": ("hidden_act",),
    "eps": ("layer_norm_eps",),
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
    hf_softmax_fp32: bool = False  # softmax(dtype=float32) of scores kept in the model dtype
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
    # canonical name part -> the part HF stores (and names its modules) instead, e.g. NeoX's
    # "h" -> "layers", "ln_1" -> "input_layernorm"; empty: HF's names are the canonical ones
    hf_names: dict = field(default_factory=dict)
    tok: str = "wte"  # token embedding
    pos: str | None = "wpe"  # learned position embedding (None: positions come from rotary)
    ln: tuple[str, ...] = ("ln_1", "ln_2")  # the LayerNorms of a block
    qkv: tuple[str, ...] = ("attn.c_attn",)  # one fused q|k|v projection, or q, k, v
    qkv_bias: bool = True
    # a fused q|k|v output: "blocks" = [Q | K | V] (GPT-2's c_attn), "per_head" = [q_h0 | k_h0 |
    # v_h0 | q_h1 | ...] each hd wide (NeoX's query_key_value)
    qkv_layout: str = "blocks"
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
    # config.json booleans that switch the block kind: (key, default); false -> "pre" (NeoX's
    # use_parallel_residual). Empty: the block kind is fixed
    block_switch: tuple = ()
    ln_f: bool = True  # a final LayerNorm before the head
    # attention scores: "config" (GPT-2's scale_attn_weights / scale_attn_by_inverse_layer_idx),
    # "inv_sqrt_hd" (always 1/sqrt(hd)), "none" (q k^T unscaled)
    scale: str = "inv_sqrt_hd"
    rotary: str | None = None  # "interleaved": pairs (x0, x1) rotated, first rotary_dim dims
    # how config.json sizes the rotary part: "rotary_dim" (dims; default rotary_default) or
    # "partial_rotary_factor" (a fraction of hd: rotary_pct or rope_parameters; with rope_theta /
    # rotary_emb_base as the base)
    rotary_config: str = "rotary_dim"
    rotary_default: float = 64
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

    def hf_hidden_state_sites(self, n_layer: int) -> list[str]:
        """The site of each entry of transformers' `output_hidden_states` tuple (n_layer + 1
        entries): entry 0 is the embedding, entry i (0 < i < n_layer) block i-1's output
        stream, and the last entry the final hidden state, which transformers takes after ln_f
        where the family has one (OpenAI GPT, post-LN without ln_f: the last block's ln_2)."""
        out = self.block_output
        names = ["embed"] + [f"blocks.{i}.{out}" for i in range(n_layer - 1)]
        names.append("ln_f" if self.ln_f else f"blocks.{n_layer - 1}.{out}")
        return names

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Weight names of the token and (if any) position embeddings."""
        return (self.tok + ".weight",) + (() if self.pos is None else (self.pos + ".weight",))

    def sites_for(self, block: str | None = None) -> tuple[str, ...]:
        """The block sites under a block kind the config chose (None: the family's own)."""
        return self.block_sites if block in (None, self.block) else sites_of(block, self.ln)

    def hf_name(self, path: str) -> str:
        """A canonical dotted name (or module path) as HF spells it."""
        return ".".join(self.hf_names.get(part, part) for part in path.split("."))

    def hf_key(self, name: str) -> str:
        """The stored key of a canonical weight name (the LM head carries no prefix)."""
        if name.startswith(self.lm_head + "."):
            return name
        return self.key_prefix + self.hf_name(name)

    @property
    def hf_body(self) -> str:
        """The attribute of the HF causal LM that holds the transformer body."""
        return self.key_prefix.rstrip(".")

    def canonical_key(self, key: str) -> str:
        key = key.removeprefix(self.key_prefix)
        if not self.hf_names:
            return key
        back = {v: k for k, v in self.hf_names.items()}
        return ".".join(back.get(part, part) for part in key.split("."))


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
        # flex_attention: transformers' FlexAttention path (GPT-2 and GPT-Neo have none)
        hf_attn_implementations=("eager", "sdpa", "flex_attention"), hf_attn_upcast=True,
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

_ENTRIES += (
    Family(
        name="gpt_neox", module="gpt_neox", hf_class="GPTNeoXForCausalLM",
        hf_attn_implementations=("eager", "sdpa", "flex_attention"),
        hf_softmax_fp32=True,  # eager: q k^T in the model dtype, softmax(dtype=float32)
        config_keys=GPT_NEOX_CONFIG_KEYS,
        defaults=dict(vocab_size=50432, n_positions=2048, d_model=6144, n_layer=44, n_head=64),
        activation="gelu",  # hidden_act: the exact erf gelu
        tie_default=False,
        key_prefix="gpt_neox.",
        hf_names={"h": "layers", "ln_f": "final_layer_norm", "ln_1": "input_layernorm",
                  "ln_2": "post_attention_layernorm"},
        tok="embed_in", pos=None,
        qkv=("attention.query_key_value",), qkv_layout="per_head",
        out_proj="attention.dense", fc_in="mlp.dense_h_to_4h", fc_out="mlp.dense_4h_to_h",
        lm_head="embed_out",
        legacy_buffers=("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),
        conv1d=False, block="parallel", block_sites=PARALLEL_2LN,
        block_switch=("use_parallel_residual", True),
        rotary="rotate_half", rotary_config="partial_rotary_factor", rotary_default=0.25,
        unused_embedding_rows=True,  # Pythia: 50277 used of 50304 (20B: 50432)
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
