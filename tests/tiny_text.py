"""Small BERT folders for tests: MiniLM's uncased WordPiece vocabulary and tokenizer (captions
tokenize as with the bundled MiniLM) under a BERT config of our choosing.

`tiny_text_weights()` is the text tower of the tests that train the vision-language recipes for
their engine (world size, resume, stops, shards) rather than for what MiniLM knows. The bundled MiniLM-L6 (22.7 M parameters, 384 wide) makes every stage-2
checkpoint ~350 MB and every step update 25 M parameters; this tower has 3 layers of width 64,
randomly initialised from a fixed seed: about 2.1 M parameters, most of them word embeddings.
The demos and their golden losses, the tokenizer and MiniLM loading tests and the tests that
need a trained tower's varied scores keep the MiniLM.
"""
import atexit
import functools
import json
import os
import shutil
import tempfile

from umt_fast.models.text import bundled_minilm_dir

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_bert_folder(folder, weights: bool = False, seed: int = 0, **config) -> str:
    """MiniLM's tokenizer files and its config.json with ``config`` overriding its fields in
    ``folder``; with ``weights``, also a BertForMaskedLM of that config drawn from ``seed``
    (without, the folder only describes a tower: for models built with load=False)."""
    source = bundled_minilm_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(source, name), folder)
    with open(os.path.join(source, "config.json")) as f:
        merged = {**json.load(f), **config}
    merged.pop("_name_or_path", None)
    if weights:
        import torch
        from transformers import BertConfig, BertForMaskedLM

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            BertForMaskedLM(BertConfig(**merged)).save_pretrained(folder)  # writes config.json too
    else:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(merged, f)
    return str(folder)


@functools.lru_cache(maxsize=None)
def tiny_text_weights() -> str:
    """A trainable 3-layer, 64-wide BERT with an MLM head (made once per test process and removed
    at its exit): pass it as ``--text.weights`` / ``--text-weights``."""
    folder = tempfile.mkdtemp(prefix="tiny-bert-")
    atexit.register(shutil.rmtree, folder, True)
    return write_bert_folder(folder, weights=True, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=128)  # fmt: skip
