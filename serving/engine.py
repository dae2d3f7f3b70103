"""Load an HF causal LM (optionally bitsandbytes-quantized, with LoRA adapters) and generate in batches.

No Ray and no asyncio here: scheduler.py drives this from its engine thread. Generation works on a
`DecodeBatch`: `prefill` runs the prompts packed into one row (no padding computed), `step` decodes one
token for every row with the KV cache (appended in place, kv_cache.py), and rows that finish leave the
batch (and the cache). `merge` appends a freshly prefilled batch to a running one (the shorter KV history
is left-padded and masked), which is what lets the server add requests between two steps. Each row's
text is detokenized incrementally (detokenizer.py). `generate` wraps all this as a plain generator for
scripts and tests. Nothing here is thread-safe: the caller runs every call on one thread, and unloads an
adapter only when no batch uses it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from raylm.core.artifacts import ExportDir
from raylm.core.errors import InputError
from raylm.serving import kv_cache
from raylm.serving.detokenizer import TextStream

log = logging.getLogger("raylm")

# The tokenizer raylm trains has no chat template; this one keeps turns readable as plain text, which is
# what a model pre-trained on plain text continues best. A chat completion also stops at DEFAULT_CHAT_STOP
# (the start of the next user turn) when this template is used.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = "\nUser:"

# Prompts per prefill pass are capped by their total tokens: a packed pass holds a tokens x tokens mask.
PREFILL_PASS_TOKENS = 2048

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes' int8 path logs this on every matmul with float32 inputs: expected, and it floods logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in str(record.msg)


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNotice())


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Delta:
    """What one sequence produced in one decoding step."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class _Sequence:
    """Decoding state of one row: its tokens, its text stream, its random generator."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: TextStream
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class DecodeBatch:
    """Rows decoding together on one adapter: KV cache, attention mask, positions, last sampled tokens.
    `tags` are the caller's names for the rows, returned with each row's Delta."""

    adapter: str | None
    seqs: list[_Sequence]
    tags: list[Any]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor | None


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("serve.device is cuda but no CUDA device is visible to this replica")
    return device


def check_model_dir(path: str) -> None:
    ExportDir(path).validate_model("serve.model")


def check_adapter_dir(path: str) -> None:
    ExportDir(path).validate_adapter()


def check_all_weights_loaded(path: str, loading: dict[str, Any]) -> None:
    """transformers initialises weights it did not find at random and only logs it: a model served that way
    answers with noise, so a checkpoint missing any weight of its architecture is refused."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise InputError(
            f"serve.model {path}: the checkpoint has no values for {shown}; transformers would initialise "
            "them at random. Is the folder complete, and saved for this architecture?"
        )


def quantization_config(method: str, dtype: torch.dtype, double_quant: bool = True) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double_quant,
        )
    return None


class Engine:
    """One model (plus its LoRA adapters) and batched generation on it; not thread-safe by design:
    the caller runs every method on one thread."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        quantization: str = "none",
        device: str = "auto",
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        max_context: int | None = None,
        nf4_double_quant: bool = True,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model_dir(model_path)
        self.device = pick_device(device)
        torch_dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        # quantization_config=None would not mean "none": it drops a quantized checkpoint's own config
        # (raylm compress's compressed-tensors), and every quantized layer then loads random weights.
        load_time = quantization_config(quantization, torch_dtype, nf4_double_quant)
        self.model, loading = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch_dtype,
            **({"quantization_config": load_time} if load_time is not None else {}),
            device_map={"": self.device},
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            output_loading_info=True,
        )
        check_all_weights_loaded(model_path, loading)
        self.model.eval()
        self.quantization = quantization
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        model_ctx = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(max_context, model_ctx) if max_context else model_ctx
        self.uses_default_template = chat_template is None and not getattr(
            self.tokenizer, "chat_template", None
        )
        self.chat_template = (
            chat_template or getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        )
        self.max_token_chars = _max_token_chars(self.tokenizer)
        self.adapters: list[str] = []
        self._warm_up(quantization)
        self.packed_prefill = self._packed_prefill_works()

    def _warm_up(self, quantization: str) -> None:
        """One forward pass at load time, so a model that cannot run here (e.g. a layer shape a
        quantization kernel does not support) fails at start-up, not on a user's request."""
        try:
            self._forward(None, input_ids=torch.tensor([[self.eos_id]], device=self.device))
        except Exception as exc:
            raise InputError(
                f"the model does not run with quantization={quantization} on {self.device}: {exc}"
            ) from exc

    # ---- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) without tokenizing: no token stands for more than
        max_token_chars characters, so a prompt far past the context is refused in O(1)."""
        return len(text) // self.max_token_chars

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def memory_footprint(self) -> int:
        """Bytes taken by the weights and buffers (quantized weights count at their packed size)."""
        return int(self.model.get_memory_footprint())

    # ---- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        check_adapter_dir(path)
        if name in self.adapters:
            return
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=_peft_name(name), is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, path, adapter_name=_peft_name(name), is_trainable=False
            )
        self.model.eval()
        self.adapters.append(name)
        log.info("loaded adapter %s from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; the caller makes sure no batch decodes on it (scheduler.py counts its users)."""
        if name not in self.adapters:
            return
        # peft keeps one adapter around as the "active" one; deleting the last is fine since base
        # requests run with adapters disabled anyway.
        if len(self.adapters) > 1:
            self.model.delete_adapter(_peft_name(name))
            self.adapters.remove(name)
            log.info("unloaded adapter %s", name)

    def _forward(self, adapter: str | None, **inputs: Any) -> Any:
        with torch.inference_mode():
            if not self.adapters:
                return self.model(**inputs)
            if adapter is None:
                with self.model.disable_adapter():
                    return self.model(**inputs)
            self.model.set_adapter(_peft_name(adapter))
            return self.model(**inputs)

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None = None
    ) -> Iterator[list[Delta | None]]:
        """Generate for a batch of token-id prompts, all on the same adapter (None = the base model).

        Yields, after every forward pass, one entry per prompt: a Delta, or None once that row is done.
        """
        batch, first = self.prefill(prompts, params, adapter, list(range(len(prompts))))
        return self._steps(batch, first, len(prompts))

    def _steps(
        self, batch: DecodeBatch, first: list[tuple[Any, Delta]], n: int
    ) -> Iterator[list[Delta | None]]:
        deltas = first
        while True:
            step: list[Delta | None] = [None] * n
            for row, delta in deltas:
                step[row] = delta
            yield step
            if not batch.seqs:
                return
            deltas = self.step(batch)

    def prefill(
        self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None, tags: list[Any]
    ) -> tuple[DecodeBatch, list[tuple[Any, Delta]]]:
        """Run the prompts through the model and sample each row's first token.

        Prompts are prefilled packed: back to back in one row, each attending only to itself, so no
        padding is computed (left-padding 32 prompts of 10-55 tokens computes 2.2x the tokens). Returns the
        batch to keep decoding, one left-padded row per prompt (rows already finished are dropped), and
        (tag, Delta) per row.
        """
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded")
        batch, deltas = None, []
        for rows in _token_budget_chunks([len(p) for p in prompts], PREFILL_PASS_TOKENS):
            part, first = self._prefill_pass(
                [prompts[i] for i in rows], [params[i] for i in rows], adapter, [tags[i] for i in rows]
            )
            deltas += first
            if batch is None or not batch.seqs:
                batch = part
            elif part.seqs:
                self.merge(batch, part)
        assert batch is not None, "prefill needs at least one prompt"
        return batch, deltas

    def _prefill_pass(
        self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None, tags: list[Any]
    ) -> tuple[DecodeBatch, list[tuple[Any, Delta]]]:
        seqs = [
            _Sequence(p, sp, _generator(sp.seed), TextStream(self._decode, sp.stop))
            for p, sp in zip(prompts, params)
        ]
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        forward = self._packed_forward if self.packed_prefill else self._padded_forward
        logits, cache = forward(prompts, adapter, room=max(sp.max_tokens for sp in params))
        # The decode-time view of every row: left-padded to the longest prompt, next position = length.
        mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long().to(self.device)
        positions = (lengths - 1)[:, None].to(self.device)
        batch = DecodeBatch(adapter, seqs, list(tags), cache, mask, positions, None)
        return batch, self._advance(batch, logits)

    def _packed_forward(
        self, prompts: list[list[int]], adapter: str | None, room: int
    ) -> tuple[torch.Tensor, Any]:
        """All prompts in one row with per-prompt positions and a block-diagonal causal mask; returns each
        prompt's last logits and a cache split into left-padded rows with `room` slots to grow."""
        lengths = torch.tensor([len(p) for p in prompts])
        out = self._forward(
            adapter,
            input_ids=torch.tensor([[t for p in prompts for t in p]], device=self.device),
            position_ids=torch.cat([torch.arange(n) for n in lengths.tolist()])[None].to(self.device),
            attention_mask=self._block_causal_mask(lengths),
            use_cache=True,
            logits_to_keep=(lengths.cumsum(0) - 1).to(self.device),
        )
        kv_cache.unpack_rows(out.past_key_values, lengths.tolist(), room)
        return out.logits[0], out.past_key_values

    def _block_causal_mask(self, lengths: torch.Tensor) -> torch.Tensor | None:
        """[1, 1, total, total]: each token sees the earlier tokens of its own prompt. None for a single
        prompt: plain causal attention, and no total x total mask for a long one."""
        if len(lengths) == 1:
            return None
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        allowed = (segment[:, None] == segment[None, :]).tril()
        if self.model.config._attn_implementation != "sdpa":  # eager and others add the mask to scores
            allowed = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(
                ~allowed, torch.finfo(self.model.dtype).min
            )
        return allowed[None, None].to(self.device)

    def _padded_forward(
        self, prompts: list[list[int]], adapter: str | None, room: int
    ) -> tuple[torch.Tensor, Any]:
        """The fallback for models whose attention ignores a custom mask: one left-padded row per prompt."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            adapter,
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        kv_cache.reserve(out.past_key_values, room)
        return out.logits[:, -1, :], out.past_key_values

    def _packed_prefill_works(self) -> bool:
        """Whether this model honours the packed prefill's mask: two prompts packed must give the logits
        they give alone. A model whose attention ignores custom masks would let them see each other."""
        prompts = [[self.eos_id], [self.eos_id, self.pad_id, self.eos_id]]
        try:
            packed, _ = self._packed_forward(prompts, None, room=0)
        except Exception as exc:
            log.warning("packed prefill does not run on this model (%s); prefilling left-padded", exc)
            return False
        alone = torch.stack([self._padded_forward([p], None, room=0)[0][0] for p in prompts]).float()
        tolerance = 1e-3 if self.model.dtype == torch.float32 and self.quantization == "none" else 5e-2
        works = bool((packed.float() - alone).abs().max() <= tolerance * alone.abs().max().clamp(min=1))
        if not works:
            log.warning("packed prefill changes this model's outputs; prefilling left-padded")
        return works

    def step(self, batch: DecodeBatch) -> list[tuple[Any, Delta]]:
        """One decoding step for every row of the batch; finished rows leave it."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.seqs), 1))], dim=1)
        batch.positions = batch.positions + 1
        out = self._forward(
            batch.adapter,
            input_ids=batch.tokens[:, None].to(self.device),
            attention_mask=batch.mask,
            position_ids=batch.positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        return self._advance(batch, out.logits[:, -1, :])

    def merge(self, into: DecodeBatch, other: DecodeBatch) -> None:
        """Append `other`'s rows to `into` (same adapter) so both decode in one forward pass from now on.

        The shorter history is left-padded in the KV cache and masked out; positions stay per row, and
        RoPE was applied before caching, so padding shifts nothing."""
        if into.adapter != other.adapter:
            raise ValueError("only batches on the same adapter can be merged")
        width = max(into.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0))

        into.seqs += other.seqs
        into.tags += other.tags
        kv_cache.stack_rows(into.cache, other.cache, width, _room(into))
        into.mask = torch.cat([pad(into.mask), pad(other.mask)], dim=0)
        into.positions = torch.cat([into.positions, other.positions], dim=0)
        into.tokens = torch.cat([into.tokens, other.tokens], dim=0)

    def _advance(self, batch: DecodeBatch, logits: torch.Tensor) -> list[tuple[Any, Delta]]:
        """Sample the next token of every row, turn it into text, and drop the rows that finished."""
        tokens = self._sample(logits, batch.seqs)
        deltas = [
            (tag, self._push(seq, tok)) for tag, seq, tok in zip(batch.tags, batch.seqs, tokens.tolist())
        ]
        batch.tokens = tokens
        self.keep_rows(batch, [i for i, seq in enumerate(batch.seqs) if seq.finish_reason is None])
        return deltas

    def keep_rows(self, batch: DecodeBatch, keep: list[int]) -> list[Any]:
        """Keep only the rows `keep` (indices, in order) of the batch; returns the tags of the others."""
        if len(keep) == len(batch.seqs):
            return []
        kept = set(keep)
        gone = [tag for i, tag in enumerate(batch.tags) if i not in kept]
        if keep:
            index = torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(index)
            batch.mask, batch.positions = batch.mask[index], batch.positions[index]
            if batch.tokens is not None:
                batch.tokens = batch.tokens[index.cpu()]
        batch.seqs = [batch.seqs[i] for i in keep]
        batch.tags = [batch.tags[i] for i in keep]
        return gone

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        logits = logits.float().cpu()
        temps = torch.tensor([s.params.temperature for s in seqs])
        top_ps = torch.tensor([s.params.top_p for s in seqs])
        greedy = temps == 0
        if bool(greedy.all()):
            return logits.argmax(-1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], dim=-1)
        if bool((top_ps < 1).any()):
            # nucleus: keep the smallest set of top tokens whose mass reaches top_p (the top one always)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_ps[:, None]
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        picked = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if not greedy[i]:
                picked[i] = torch.multinomial(probs[i], 1, generator=s.generator)[0]
        return picked

    def _push(self, seq: _Sequence, token: int) -> Delta:
        """Append a token to a row; return the text that is now safe to hand out."""
        if token == self.eos_id and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            return Delta(seq.text.take(), len(seq.ids), seq.finish_reason)
        seq.ids.append(token)
        seq.text.add(seq.ids)
        at = seq.text.stop_at()
        if at is not None:
            seq.finish_reason = "stop"
            return Delta(seq.text.take(at), len(seq.ids), seq.finish_reason)
        if len(seq.ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
            return Delta(seq.text.take(), len(seq.ids), seq.finish_reason)
        return Delta(seq.text.take(seq.text.safe()), len(seq.ids))

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces before punctuation: it is not a per-token operation, so a window's text
        # could differ from the same characters inside a longer text.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def complete(self, prompt: str, params: SamplingParams, adapter: str | None = None) -> str:
        """Generate one completion to the end (a convenience for scripts and tests)."""
        text = ""
        for step in self.generate([self.encode(prompt)], [params], adapter):
            if step[0] is not None:
                text += step[0].text
        return text

    def perplexity(self, texts: list[str], window: int | None = None, batch_size: int = 16) -> float:
        """exp(mean next-token loss) over texts joined by eos and cut into full windows (the context by
        default): the quantization quality check."""
        window = min(window or self.context_length, self.context_length)
        ids = [t for text in texts for t in [*self.encode(text), self.eos_id]]
        n = len(ids) // window
        if n == 0:
            raise ValueError(f"perplexity needs at least {window} tokens of text, got {len(ids)}")
        chunks = torch.tensor(ids[: n * window]).view(n, window)
        total = 0.0
        for start in range(0, n, batch_size):
            x = chunks[start : start + batch_size].to(self.device)
            logits = self._forward(None, input_ids=x).logits.float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
                )
            )
        return float(torch.exp(torch.tensor(total / (n * (window - 1)))))


def _token_budget_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows, as many per chunk as fit in `budget` tokens (a longer prompt gets a chunk alone)."""
    chunks: list[list[int]] = []
    used = budget
    for i, n in enumerate(lengths):
        if used + n > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks


def _room(batch: DecodeBatch) -> int:
    """Tokens the batch may still generate: the most any of its rows has left."""
    return max((s.params.max_tokens - len(s.ids) for s in batch.seqs), default=0)


def _max_token_chars(tokenizer: Any) -> int:
    """Most characters of text one token can stand for: its longest vocabulary entry (added tokens too).

    A byte-level BPE entry spells one character per byte and a SentencePiece piece spells its text, so a
    token never covers more characters than its entry is long. A normalizer may first merge a few code
    points into one (NFC/NFKC compose at most 3), hence the factor 4 when there is one. A normalizer that
    deletes characters (BERT's StripAccents) would break the bound; causal LM tokenizers do not use one.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    merges = backend is None or backend.normalizer is not None  # a slow tokenizer may normalize too
    return max(1, longest) * (4 if merges else 1)


def _peft_name(adapter: str) -> str:
    """The name an adapter has inside peft: adapter ids are any folder or config name, but torch module
    names cannot be empty or hold a "." (a Tune trial folder like lr=0.001 would fail on first use)."""
    if adapter and "." not in adapter:
        return adapter
    return "raylm-" + adapter.encode("utf-8", "surrogatepass").hex()


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    # manual_seed takes 64 bits and reads a negative seed as its two's complement; wrapping keeps that
    # meaning and lets seed + choice (one seed per choice) pass 2**64 - 1 instead of raising mid-stream.
    gen.manual_seed(seed % 2**64 if seed is not None else random.getrandbits(63))
    return gen
