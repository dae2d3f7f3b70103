"""Tokenizer training (byte-level BPE, Hugging Face `tokenizers`) and the batch tokenization stage."""

from __future__ import annotations

import os
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


def check_tokenizer_dir(path: str, key: str) -> None:
    """Load the tokenizer at `path` once, before Ray starts, so a missing or broken one fails with exit 2
    and a message naming `key` instead of a traceback from inside a Ray task. Remote folders are
    downloaded first (to a temporary folder, removed afterwards), as the curate stage does."""
    import shutil

    from raylm.core import storage
    from raylm.core.errors import ConfigError

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{key}: {path!r} {why}")

    if not storage.is_remote(path):
        _check_local_tokenizer(path, refuse)
        return
    try:
        local = storage.local_dir(path)
    except OSError as exc:  # credentials, network, a missing bucket: pyarrow raises OSError
        raise refuse(f"cannot be read: {_one_line(exc)}") from None
    try:
        _check_local_tokenizer(local, refuse)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one short line, however the library wrapped it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _check_local_tokenizer(local: str, refuse) -> None:
    if not os.path.exists(local):
        raise refuse("does not exist")
    if not os.path.isdir(local):
        raise refuse("is not a folder (a Hugging Face tokenizer is a folder with tokenizer.json)")
    try:
        empty = not os.listdir(local)
    except OSError as exc:  # no permission to list it, say
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    if empty:
        raise refuse("is an empty folder (a Hugging Face tokenizer is a folder with tokenizer.json)")
    from transformers import AutoTokenizer

    try:
        # local_files_only: a folder that is not a tokenizer must not send transformers to the Hub.
        tok = AutoTokenizer.from_pretrained(local, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many types (OSError, ValueError, ...)
        raise refuse(f"is not a Hugging Face tokenizer folder: {_one_line(exc)}") from None
    if tok.eos_token_id is None:
        raise refuse("holds a tokenizer without an eos token, which raylm uses to separate documents")


class Tokenize:
    """Ray Data stage: text -> token ids (list<int32>) with the eos separator appended to each document."""

    def __init__(self, tokenizer_dir: str, text_col: str = "text"):
        from raylm.core.storage import local_copy

        with local_copy(tokenizer_dir) as local:
            self.tok = load_tokenizer(local)
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
