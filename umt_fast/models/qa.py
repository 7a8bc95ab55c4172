"""Open-ended video question answering, as the reference's ``UMT_QA`` (multi_modality/models/umt_qa.py).

Three parts, none of the stage-2 projections, temperature or VTM head:

  * ``vision_encoder``: the stage-2 student's encoder alone (no masking, no alignment heads, no
    ``pool_norm``): every token of every frame after the last block and its final LayerNorm;
  * ``text_encoder`` (the question encoder): the stage-2 text tower, its last ``fusion_layers``
    layers cross-attending to all the video tokens; no MLM head;
  * ``text_decoder``: a BERT of ``fusion_layers`` layers, every one with causal self-attention and
    cross-attention to the question states (masked on the question's padding), and BERT's LM head
    (``cls.predictions``, tied to the decoder's word embeddings). It generates the answer.

Fine-tuning starts from a stage-2 model as the reference does (tasks/shared_utils.py
``setup_model`` with ``has_decoder=True``): the question encoder takes the whole text tower; the
decoder takes the tower's embeddings, its fusion layers (text layer ``num_layers - fusion_layers + j``
-> decoder layer j, cross-attention included: the vision width must equal the text width, as for
BERT-base with ViT-B and BERT-large with ViT-L) and its MLM head as the LM head.

Training loss (``UMT_QA.forward(train=True)``): question b has k_b answers with weights w; each
answer's tokens ``[CLS] a_1 .. a_n [SEP]`` are decoded with the question's states, the targets are
the ids with [PAD] -> -100, shifted by one (token t+1 predicted at t); per answer, the summed
token cross-entropy nll; loss = sum over all answers (w * nll) / B.

Answer ranking (``UMT_QA.rank_answer``): see `VideoQAModel.rank_answer`.

Shape legend: B questions (one video each), N video tokens, D vision width, H text width,
Sq question tokens, Sa answer tokens, A candidate answers, K answers kept per question, V vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from umt_fast.models.student import SparseVideoStudent, StudentArch
from umt_fast.models.text import TextArch, TextEncoder, from_reference_keys, to_reference_keys

IGNORE_INDEX = -100


class QAVisionEncoder(nn.Module):
    """The stage-2 student's encoder on every token (``encoder.*``, the reference's
    ``vision_encoder.encoder.*``): a normalised clip [B, 3, T, H, W] -> every token [B, T*P, D]."""

    def __init__(self, arch: StudentArch):
        super().__init__()
        # One tap (the last block) is all QA reads; the alignment heads are not built.
        self.arch = replace(arch, return_layers=1, extra_heads=())
        self.encoder = SparseVideoStudent(self.arch).encoder

    def forward(self, video_BCTHW: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None) -> torch.Tensor:
        """``drop_scales_LB2``: [depth, B, 2] drop-path factors (`umt_fast.models.student.drop_path_scales`),
        used in training mode; None draws drop path from torch's generator."""
        B, _, T = video_BCTHW.shape[:3]
        idx = torch.arange(T * self.arch.patches_per_frame, device=video_BCTHW.device).expand(B, -1)
        return self.encoder(video_BCTHW, idx, drop_scales_LB2)[-1]


def decoder_arch(text_arch: TextArch) -> TextArch:
    """The answer decoder of a text tower: its ``fusion_layers`` top layers, each with
    cross-attention whose keys and values come from the question states (width H)."""
    n = text_arch.fusion_layers
    return replace(text_arch, num_layers=n, fusion_layers=n, vision_width=text_arch.hidden)


class VideoQAModel(nn.Module):
    """``vision_encoder`` (`QAVisionEncoder`), ``text_encoder`` (a `TextEncoder` without its MLM
    head) and ``text_decoder`` (a `TextEncoder` of `decoder_arch`: every layer a fusion layer,
    ``cls.predictions`` the LM head)."""

    def __init__(self, vision_encoder: QAVisionEncoder, text_encoder: TextEncoder, text_decoder: TextEncoder | None = None):
        super().__init__()
        arch = text_encoder.arch
        if arch.vision_width != vision_encoder.arch.width:
            raise ValueError(f"text tower built for vision width {arch.vision_width}, the encoder is {vision_encoder.arch.width}")
        self.vision_encoder = vision_encoder
        if hasattr(text_encoder, "cls"):
            del text_encoder.cls  # the question encoder has no MLM head (the reference's BertModel)
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder if text_decoder is not None else TextEncoder(decoder_arch(arch))
        if self.text_decoder.arch != decoder_arch(arch):
            raise ValueError(f"text_decoder is {self.text_decoder.arch}, expected {decoder_arch(arch)}")
        self.pad_token_id = arch.pad_token_id

    # ---------------------------------------------------------------- encoders
    def encode_vision(self, video_BCTHW: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised [B, 3, T, H, W] -> every token [B, T*P, D] (drop path: `QAVisionEncoder.forward`)."""
        return self.vision_encoder(video_BCTHW, drop_scales_LB2)

    def encode_question(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor, vision_BND: torch.Tensor) -> torch.Tensor:
        """The question states [B, Sq, H]: the text tower, its fusion layers attending to all of
        the video's tokens."""
        x = self.text_encoder.forward_text(ids_BS, mask_BS)
        return self.text_encoder.forward_fusion(x, mask_BS, vision_BND)

    # ---------------------------------------------------------------- decoder
    def decoder_logits(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor | None, states_BQH: torch.Tensor,
                       states_mask_BQ: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The LM head's logits [B, Sa, V]: token t attends to tokens <= t that are not padding
        (``mask_BS``; None = no padding), and to the question states where ``states_mask_BQ`` is 1."""
        dec = self.text_decoder
        B, S = ids_BS.shape
        x = dec.bert.embeddings(input_ids=ids_BS)
        keep = torch.ones(S, S, dtype=torch.bool, device=ids_BS.device).tril()[None, None]
        if mask_BS is not None:
            keep = keep & mask_BS[:, None, None, :].bool()
        cross = states_mask_BQ[:, None, None, :].bool()
        states = states_BQH.to(x.dtype)
        for layer in dec.fusion:
            x = layer.attention(x, x, keep)
            x = layer.crossattention(x, states, cross)
            x = layer.output(layer.intermediate(x), x)
        return dec.cls.predictions(x)

    def answer_targets(self, ids_BS: torch.Tensor) -> torch.Tensor:
        """The ids with [PAD] -> -100 (the reference's ``answer_targets``)."""
        return ids_BS.masked_fill(ids_BS == self.pad_token_id, IGNORE_INDEX)

    def answer_nll(self, ids_BS, mask_BS, states_BQH, states_mask_BQ) -> torch.Tensor:
        """Per answer, the summed next-token cross-entropy of its non-pad tokens after [CLS]: [B]."""
        logits = self.decoder_logits(ids_BS, mask_BS, states_BQH, states_mask_BQ)
        return sequence_nll(logits, self.answer_targets(ids_BS))

    # ---------------------------------------------------------------- training
    def forward(self, video_BCTHW: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor, answer_counts_B: torch.Tensor,
                answer_weights: torch.Tensor, drop_scales_LB2: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The reference's QA loss (0-dim): sum over every answer of weight * nll, / B.

        Args:
            question_ids, question_mask: [B, Sq].
            answer_ids, answer_mask: [M, Sa], the answers of question 0, then of question 1, ...
            answer_counts_B: int64 [B], how many answers each question has (sum = M).
            answer_weights: [M], each answer's weight (the reference: its share of the question's
                annotated answers).
            drop_scales_LB2: the vision encoder's drop-path factors [depth, B, 2] (training mode);
                None draws drop path from torch's generator.
        """
        vision = self.encode_vision(video_BCTHW, drop_scales_LB2)
        states = self.encode_question(question_ids, question_mask, vision)
        M = answer_ids.shape[0]
        states = states.repeat_interleave(answer_counts_B, dim=0, output_size=M)
        states_mask = question_mask.repeat_interleave(answer_counts_B, dim=0, output_size=M)
        nll = self.answer_nll(answer_ids, answer_mask, states, states_mask)
        return (answer_weights.to(nll.dtype) * nll).sum() / video_BCTHW.shape[0]

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def rank_answer(self, states_BQH: torch.Tensor, states_mask_BQ: torch.Tensor, answer_ids_AS: torch.Tensor,
                    answer_mask_AS: torch.Tensor, k: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The reference's ``rank_answer``: pick each question's answer from a fixed list.

        1. The decoder reads [CLS] alone (the first token of ``answer_ids_AS[0]``); the softmax over
           the vocabulary of its logits gives every candidate's first-token probability p1 (at
           the candidate's id after [CLS]); the K = min(k, A) candidates of highest p1 are kept.
        2. Each kept candidate's whole sequence is decoded: nll = the summed cross-entropy of its
           tokens after [CLS] ([PAD] ignored; it includes the first token again).
        3. score = log p1 - nll; the probabilities are the softmax of the K scores, sorted.

        Returns:
            (ids int64 [B, K]: indices into the answer list, best first; probs [B, K]: the softmax
            of the scores, descending). The prediction is ``ids[b, probs[b].argmax()]``.
        """
        B = states_BQH.shape[0]
        A = answer_ids_AS.shape[0]
        K = min(k, A)
        start = answer_ids_AS[:1, :1].expand(B, 1)
        first = _at_least_fp32(self.decoder_logits(start, None, states_BQH, states_mask_BQ)[:, 0]).softmax(-1)
        p1_BA = first.index_select(1, answer_ids_AS[:, 1])
        top_p, top_ids = p1_BA.topk(K, dim=1)

        ids = answer_ids_AS[top_ids.flatten()]  # [B*K, Sa], question-major
        mask = answer_mask_AS[top_ids.flatten()]
        states = states_BQH.repeat_interleave(K, dim=0)
        states_mask = states_mask_BQ.repeat_interleave(K, dim=0)
        nll = torch.cat([self.answer_nll(ids[i:i + chunk], mask[i:i + chunk], states[i:i + chunk], states_mask[i:i + chunk])
                         for i in range(0, B * K, chunk)])  # fmt: skip
        scores = top_p.log().to(nll.dtype) - nll.view(B, K)
        probs, order = scores.softmax(-1).topk(K, dim=1)
        return top_ids.gather(1, order), probs


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sequence_nll(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed per sequence: logits at t against target t+1, targets of
    -100 ignored. [B, S, V], [B, S] -> [B]."""
    B, S, V = logits_BSV.shape
    ce = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V), targets_BS[:, 1:].reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX)  # fmt: skip
    return ce.view(B, S - 1).sum(1)


# -------------------------------------------------------------------------------------------------
# The reference's QA checkpoint keys
# -------------------------------------------------------------------------------------------------
# A fine-tuned UMT_QA file: vision_encoder.encoder.* (the QA configs build no alignment heads,
# clip_return_layer=0), text_encoder.embeddings.* and text_encoder.encoder.layer.{i}.* (a BertModel:
# no "bert." prefix, no MLM head), text_decoder.bert.embeddings.*, text_decoder.bert.encoder.layer.{j}.*
# and text_decoder.cls.predictions.* (a BertLMHeadModel).

QA_SENTINEL = "text_decoder.bert.embeddings.word_embeddings.weight"
_IGNORED_PREFIXES = ("clip_teacher.", "vision_encoder.clip_teacher.", "vision_encoder.clip_decoder.")


def is_qa_state_dict(sd: dict) -> bool:
    return QA_SENTINEL in sd


def to_reference_qa_state_dict(model: VideoQAModel) -> dict[str, torch.Tensor]:
    """Our state dict in the reference's UMT_QA naming."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return qa_state_dict_to_reference(sd, model.text_encoder.arch)


def qa_state_dict_to_reference(sd: dict[str, torch.Tensor], text_arch: TextArch) -> dict[str, torch.Tensor]:
    out, enc, dec = {}, {}, {}
    for k, v in sd.items():
        if k.startswith("text_encoder."):
            enc[k[len("text_encoder."):]] = v
        elif k.startswith("text_decoder."):
            dec[k[len("text_decoder."):]] = v
        else:
            out[k] = v
    for k, v in to_reference_keys(enc, text_arch).items():
        out["text_encoder." + k.removeprefix("bert.")] = v
    out.update({"text_decoder." + k: v for k, v in to_reference_keys(dec, decoder_arch(text_arch)).items()})
    return out


def qa_state_dict_from_reference(sd: dict[str, torch.Tensor], text_arch: TextArch) -> dict[str, torch.Tensor]:
    """The reference's UMT_QA keys -> ours; the teacher and alignment heads, if any, are dropped."""
    out, enc, dec = {}, {}, {}
    for k, v in sd.items():
        if k.startswith(_IGNORED_PREFIXES):
            continue
        if k.startswith("text_encoder."):
            enc["bert." + k[len("text_encoder."):]] = v
        elif k.startswith("text_decoder."):
            dec[k[len("text_decoder."):]] = v
        else:
            out[k] = v
    enc = from_reference_keys(enc, text_arch)
    out.update({"text_encoder." + k: v for k, v in enc.items() if not k.startswith("cls.")})
    out.update({"text_decoder." + k: v for k, v in from_reference_keys(dec, decoder_arch(text_arch)).items()})
    return out


def qa_state_dict_from_stage2(sd: dict[str, torch.Tensor], fusion_layers: int) -> dict[str, torch.Tensor]:
    """A reference-named stage-2 state dict -> the reference's UMT_QA naming, as the reference's
    fine-tuning starts (tasks/shared_utils.py ``setup_model``, ``has_decoder=True``):

      * ``text_encoder.bert.X`` -> ``text_encoder.X`` (every layer, the embeddings);
      * ``text_encoder.bert.encoder.layer.{i}.*`` with i >= num_layers - fusion_layers (the
        reference's ``fusion_layer``) -> ``text_decoder.bert.encoder.layer.{i - that}.*``;
      * ``text_encoder.bert.embeddings.*`` -> ``text_decoder.bert.embeddings.*`` too;
      * ``text_encoder.cls.*`` (the MLM head) -> ``text_decoder.cls.*`` (the LM head);
      * ``vision_encoder.encoder.*`` kept; the alignment heads, ``pool_norm``, the projections,
        ``temp``, ``itm_head`` and the teacher dropped (UMT_QA has none of them).
    """
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.", k))}
    if not layers or "vision_encoder.encoder.patch_embed.proj.weight" not in sd:
        raise ValueError("not a UMT stage-2 state dict: no vision_encoder.encoder.* / text_encoder.bert.encoder.layer.*")
    first_fused = len(layers) - fusion_layers
    out = {}
    for k, v in sd.items():
        if k.startswith("vision_encoder.encoder."):
            out[k] = v
        elif k.startswith("text_encoder.bert."):
            rest = k[len("text_encoder.bert."):]
            out["text_encoder." + rest] = v
            m = re.match(r"encoder\.layer\.(\d+)\.(.*)", rest)
            if m is None:
                out["text_decoder.bert." + rest] = v
            elif int(m.group(1)) >= first_fused:
                out[f"text_decoder.bert.encoder.layer.{int(m.group(1)) - first_fused}.{m.group(2)}"] = v
        elif k.startswith("text_encoder.cls."):
            out["text_decoder." + k[len("text_encoder."):]] = v
    return out


def qa_shapes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """What a reference-named UMT_QA state dict says: text layers, how many cross-attend to the
    video, decoder layers, text width."""
    def count(pattern):
        return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})

    text_layers = count(r"text_encoder\.encoder\.layer\.(\d+)\.")
    if not is_qa_state_dict(sd) or not text_layers:
        raise ValueError("not a UMT video-QA state dict: no text_decoder.bert.embeddings.* / text_encoder.encoder.layer.*")
    return {
        "text_layers": text_layers,
        "fusion_layers": count(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\."),
        "decoder_layers": count(r"text_decoder\.bert\.encoder\.layer\.(\d+)\."),
        "text_width": sd["text_encoder.embeddings.word_embeddings.weight"].shape[1],
    }


def load_reference_qa_state_dict(model: VideoQAModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load a reference-named UMT_QA state dict into `model`, strictly (every key must match)."""
    from umt_fast.safe_load import load_state_dict_checked

    load_state_dict_checked(model, qa_state_dict_from_reference(sd, model.text_encoder.arch), source, strict=True)


def init_from_stage2(model: VideoQAModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """Start fine-tuning from a reference-named stage-2 state dict (`qa_state_dict_from_stage2`),
    strictly."""
    arch = model.text_encoder.arch
    if arch.vision_width != arch.hidden:
        raise ValueError(f"{source}: the answer decoder starts from the fusion layers, whose cross-attention reads "
                         f"width {arch.vision_width}; the decoder reads the question states of width {arch.hidden}. "
                         "They must agree (ViT-B with BERT-base, ViT-L with BERT-large)")  # fmt: skip
    load_reference_qa_state_dict(model, qa_state_dict_from_stage2(sd, arch.fusion_layers), source)
