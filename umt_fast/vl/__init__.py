"""Stage 2: vision-language pre-training (UTA + VTC + VTM + MLM) and zero-shot retrieval.

    text.py       the BERT text encoder (Hugging Face transformers) whose last layers add
                  cross-attention to the vision tokens, and the MLM head
    losses.py     VTC (gathered over ranks, same-id positives), VTM hard negatives, MLM masking
    model.py      the stage-2 model: the stage-1 student + pool_norm, projections, VTM head,
                  and the mapping to and from the reference's stage-2 checkpoint keys
    data.py       JSON caption lists, image / video loaders, the interleaving of media types
    retrieval.py  zero-shot text-to-video / video-to-text retrieval (VTC, then VTM re-ranking)
    train.py      the stage-2 training loop
"""
