"""detokenizer.py: streaming the text token by token gives exactly the full decode, and exactly what the
engine handed out when it decoded the whole sequence on every token (stop strings included)."""

from __future__ import annotations

import random

import pytest

from raylm.serving.detokenizer import TextStream

MULTIBYTE = ["é", "ß", "€", "日本語", "naïve café", "😀", "👩‍💻", "Ωμέγα", "中文字符", "🙂 ok", "ü"]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on text full of multi-byte characters: its merges cut some of them
    between tokens, and its 256 byte tokens make any byte sequence (valid UTF-8 or not)."""
    from raylm.pipelines.tokenize import train_tokenizer

    rng = random.Random(0)
    words = ["the", "river", "city", " ", ".", "\n", *MULTIBYTE]
    texts = ["".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(40)) for _ in range(300)]
    return train_tokenizer(iter(texts), vocab_size=400, min_frequency=2)


def decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_text(tok, ids: list[int]) -> list[str]:
    """The pieces handed out token by token (everything flushed after the last one)."""
    stream, pieces = TextStream(decoder(tok)), []
    for n in range(1, len(ids) + 1):
        stream.add(ids[:n])
        pieces.append(stream.take(stream.safe()))
    pieces.append(stream.take())
    return pieces


def random_ids(tok, rng: random.Random) -> list[int]:
    """Random tokens: any from the vocabulary (lone bytes included), the encoding of multi-byte text, or
    a mix; now and then a special token, which decodes to nothing."""
    vocab = len(tok)
    kind = rng.random()
    if kind < 0.35:
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
    elif kind < 0.7:
        text = "".join(rng.choice([*MULTIBYTE, "a", " ", "the "]) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(rng.choice(MULTIBYTE) * 3, add_special_tokens=False)
        ids += [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
    for _ in range(rng.randint(0, 2)):
        ids.insert(rng.randrange(len(ids) + 1), tok.pad_token_id)
    return ids


def test_streamed_text_equals_the_full_decode(tokenizer):
    rng = random.Random(1)
    multibyte_split = 0
    for _ in range(1500):
        ids = random_ids(tokenizer, rng)
        pieces = stream_text(tokenizer, ids)
        assert "".join(pieces) == decoder(tokenizer)(ids), ids
        multibyte_split += any("\ufffd" in decoder(tokenizer)(ids[:n]) for n in range(1, len(ids)))
    assert multibyte_split > 300  # many sequences really had characters split over tokens


def test_a_character_split_over_tokens_is_held_back_until_complete(tokenizer):
    symbols = "".join(tokenizer.convert_ids_to_tokens(tokenizer.encode("a😀", add_special_tokens=False)))
    byte_ids = tokenizer.convert_tokens_to_ids(list(symbols))  # "a" and the emoji's 4 bytes, one per token
    assert len(byte_ids) == 5
    assert stream_text(tokenizer, byte_ids) == ["a", "", "", "", "😀", ""]


def reference_pieces(tok, ids: list[int], stops: tuple[str, ...], max_tokens: int):
    """What engine._push handed out before incremental decoding: the whole sequence decoded on every token."""
    decode, emitted, out = decoder(tok), 0, []

    def emit(upto: int, text: str, reason):
        nonlocal emitted
        piece = text[emitted:upto] if upto > emitted else ""
        emitted = max(emitted, upto)
        out.append((piece, reason))
        return reason is not None

    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        found = [text.find(s, max(0, emitted - len(s))) for s in stops]
        at = next((a for a in found if a != -1), None)
        if at is not None:
            emit(at, text, "stop")
            return out
        if n >= max_tokens:
            emit(len(text), text, "length")
            return out
        safe = len(text.rstrip("\ufffd"))
        for stop in stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        emit(max(safe, emitted), text, None)
    emit(len(decode(ids)), decode(ids), "stop")  # eos
    return out


def streamed_pieces(tok, ids: list[int], stops: tuple[str, ...], max_tokens: int):
    """The same with TextStream, as engine._push does it now."""
    stream, out = TextStream(decoder(tok), stops), []
    for n in range(1, len(ids) + 1):
        stream.add(ids[:n])
        at = stream.stop_at()
        if at is not None:
            out.append((stream.take(at), "stop"))
            return out
        if n >= max_tokens:
            out.append((stream.take(), "length"))
            return out
        out.append((stream.take(stream.safe()), None))
    out.append((stream.take(), "stop"))
    return out


def test_stop_strings_cut_exactly_as_with_full_decoding(tokenizer):
    """Every piece and finish reason the same, token by token, for stop strings taken from the text
    (often spanning several tokens, with multi-byte characters), stops that never match, and max_tokens."""
    rng = random.Random(2)
    decode, stopped = decoder(tokenizer), 0
    for _ in range(1500):
        ids = random_ids(tokenizer, rng)
        text = decode(ids)
        stops = []
        for _ in range(rng.randint(0, 3)):
            if text and rng.random() < 0.8:
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["zz", "日本", "é.", "\n\n"]))
        stops = tuple(s for s in stops if s)
        max_tokens = rng.choice([len(ids), max(1, len(ids) // 2), len(ids) + 5])
        expected = reference_pieces(tokenizer, ids, stops, max_tokens)
        assert streamed_pieces(tokenizer, ids, stops, max_tokens) == expected, (ids, stops)
        stopped += expected[-1][1] == "stop" and len(expected) < len(ids) + 1
    assert stopped > 500
