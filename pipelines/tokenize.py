"""Tokenizer training (byte-level BPE, Hugging Face `tokenizers`) and the batch tokenization stage."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE tokenizer; returns a transformers PreTrainedTokenizerFast.

    `<|endoftext|>` is bos, eos and the document separator used when packing; `<|pad|>` pads batches.
    Byte-level means every string encodes (no unknown tokens) and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=1_000_000,
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load an HF tokenizer from a local folder; it must have an eos token (the document separator)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token, which raylm uses to separate documents")
    return tok


class Tokenize:
    """Ray Data stage: text -> token ids (list<int32>) with the eos separator appended to each document."""

    def __init__(self, tokenizer_dir: str, text_col: str = "text"):
        from core.storage import local_dir

        self.tok = load_tokenizer(local_dir(tokenizer_dir))
        self.eos = self.tok.eos_token_id
        self.text_col = text_col

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_col).to_pylist()
        encoded = self.tok(texts, add_special_tokens=False)["input_ids"]
        ids = [np.asarray([*e, self.eos], dtype=np.int32) for e in encoded]
        return pa.table(
            {
                "id": batch.column("id"),
                "split": batch.column("split"),
                "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            }
        )
