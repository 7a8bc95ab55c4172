"""The stage-2 model: the text tower against Hugging Face's BERT, the reference's stage-2 key
mapping (round trip, teacher keys ignored), initialisation from stage 1, and one training forward."""
import pytest
import torch

from umt_fast.models.student import SparseVideoStudent, StudentArch
from umt_fast.models.vl import (
    HEAD_NORM_EPS,
    VisionLanguageModel,
    VLBatch,
    from_reference_state_dict,
    load_reference_state_dict,
    stage2_shapes,
    to_reference_state_dict,
)
from umt_fast.models.text import build_text_encoder, bundled_minilm_dir, load_tokenizer, tokenize_captions
from umt_fast.recipes.pretrain_vl import initialise

ARCH = StudentArch(width=192, depth=4, heads=3, teacher_dim=64, return_layers=2, num_frames=2, img_size=64,
                   head_norm_eps=HEAD_NORM_EPS)


@pytest.fixture(scope="module")
def text_encoder():
    return build_text_encoder("minilm", fusion_layers=2, vision_width=ARCH.width)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _model(text_encoder, seed):
    torch.manual_seed(seed)
    text = build_text_encoder("minilm", 2, ARCH.width, load=False)
    text.load_state_dict(text_encoder.state_dict())
    return VisionLanguageModel(SparseVideoStudent(ARCH), text, embed_dim=32)


def test_text_tower_equals_huggingface_bert_without_cross_attention(text_encoder, tokenizer):
    from transformers import BertModel

    hf = BertModel.from_pretrained(bundled_minilm_dir(), local_files_only=True, add_pooling_layer=False).eval()
    text_encoder.eval()
    tok = tokenizer(["a dog runs in the park", "a red car"], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        expected = hf(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        x = text_encoder.forward_text(tok["input_ids"], tok["attention_mask"])
        mask = tok["attention_mask"][:, None, None, :].bool()
        for layer in text_encoder.fusion:  # BERT's own path through the fusion layers
            x = layer.attention(x, x, mask)
            x = layer.output(layer.intermediate(x), x)
    keep = tok["attention_mask"].bool()
    assert torch.allclose(x[keep], expected[keep], atol=1e-5)


def test_stage2_keys_round_trip_in_the_reference_naming(text_encoder, tmp_path):
    a, b = _model(text_encoder, 0), _model(text_encoder, 1)
    ref = to_reference_state_dict(a)
    # The reference's layout (UMT_SPEC.md section 4).
    assert "vision_encoder.encoder.patch_embed.proj.weight" in ref
    assert "vision_encoder.clip_decoder.1.head.weight" in ref
    assert "vision_encoder.pool_norm.weight" in ref
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in ref
    assert "text_encoder.bert.encoder.layer.3.attention.self.query.weight" in ref
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" in ref
    assert ref["text_encoder.bert.encoder.layer.5.crossattention.self.key.weight"].shape == (384, ARCH.width)
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" not in ref
    assert "text_encoder.cls.predictions.transform.dense.weight" in ref and "text_encoder.cls.predictions.bias" in ref
    for key in ("vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp"):
        assert key in ref
    assert not any(k.startswith(("student.", "text_encoder.fusion.", "pool_norm.")) for k in ref)
    assert ref["temp"].shape == () and ref["temp"].item() == pytest.approx(0.07)  # the reference's scalar
    assert stage2_shapes(ref) == {"embed_dim": 32, "text_layers": 6, "fusion_layers": 2, "text_width": 384}
    # A reference file also carries the teacher (ignored) and wraps everything in "model".
    path = tmp_path / "stage2.pth"
    extra = {"clip_teacher.conv1.weight": torch.zeros(1), "text_encoder.bert.embeddings.position_ids": torch.arange(512),
             "text_encoder.bert.pooler.dense.weight": torch.zeros(384, 384)}  # fmt: skip
    torch.save({"model": {**ref, **extra}}, path)
    assert "stage-2" in initialise(b, str(path))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert to_reference_state_dict(b).keys() == ref.keys()
    # A truncated file is refused, not half-loaded.
    broken = dict(ref)
    del broken["text_encoder.bert.encoder.layer.4.crossattention.output.dense.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_reference_state_dict(b, broken, "broken")
    assert from_reference_state_dict(ref, a.text_encoder.arch).keys() == sa.keys()


def test_init_from_a_stage1_checkpoint_loads_the_student_and_its_heads(text_encoder, tmp_path):
    torch.manual_seed(3)
    stage1 = SparseVideoStudent(ARCH)
    path = tmp_path / "stage1.pth"
    torch.save({"model": {"module." + k: v for k, v in stage1.state_dict().items()}}, path)  # as DDP saves
    model = _model(text_encoder, 4)
    assert "stage-1" in initialise(model, str(path))
    for k, v in stage1.state_dict().items():
        assert torch.equal(model.student.state_dict()[k], v)
    # A truncated file is refused, not half-loaded; an unrelated one is named as such.
    torch.save({k: v for k, v in stage1.state_dict().items() if "blocks.3." not in k}, path)
    with pytest.raises(ValueError, match="missing"):
        initialise(model, str(path))
    torch.save({"fc.weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="neither a UMT stage-1 nor a stage-2"):
        initialise(model, str(path))


def test_forward_gives_four_finite_losses_and_gradients_everywhere(text_encoder, tokenizer):
    model = _model(text_encoder, 5).train()
    B, T, P = 3, ARCH.num_frames, ARCH.patches_per_frame
    idx = torch.sort(torch.randperm(T * P)[:6]).values.expand(B, -1)
    text_ids, text_mask = tokenize_captions(tokenizer, ["a cat", "two dogs play", "a cat sleeps"], 10)
    labels = torch.full_like(text_ids, -100)
    labels[:, 1] = text_ids[:, 1]
    mlm_ids = text_ids.clone()
    mlm_ids[:, 1] = tokenizer.mask_token_id
    targets = torch.nn.functional.normalize(torch.randn(ARCH.return_layers, B, 6, ARCH.teacher_dim), dim=-1)
    batch = VLBatch(video=torch.randn(B, 3, T, 64, 64), visible_idx=idx, targets=targets, text_ids=text_ids,
                    text_mask=text_mask, mlm_ids=mlm_ids, mlm_labels=labels, ids=torch.tensor([0, 1, 0]))
    losses = model(batch)
    assert set(losses) == {"uta", "vtc", "vtm", "mlm"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
