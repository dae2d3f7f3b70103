"""Config of the curation stage (`data:` in a recipe)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from raylm.core.schema import Bool, Float, Fraction, Int, PathOrUri, Section, Seed

BUILTIN_SOURCES = ("builtin:python-docs",)
# Word n-grams longer than this never repeat in real text, and each costs n list slices per document.
MAX_NGRAM = 100
MAX_SEQ_LEN = 2**20  # a packed sequence is built in memory on one worker
NgramSize = Annotated[Int, Field(ge=1, le=MAX_NGRAM)]
NgramShare = Annotated[Float, Field(gt=0, le=1)]
LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(_[A-Za-z]{4})?$")  # ISO 639-1 (en), 639-3 (yue), fastText's eng_Latn
SHIPPED_CATEGORIES = ("profanity", "adult", "violence")  # English lists in pipelines/data/sensitive/
# A category names a column field and a reject detail: lowercase letters, digits and underscores.
CategoryName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]


class SourceConfig(Section):
    path: PathOrUri
    """A file, folder, glob or URI (s3://, gs://), or `builtin:python-docs` for the docstrings of Python's stdlib."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """File format; auto decides per file from its extension (.jsonl, .jsonl.gz, .json, .parquet, .txt, .md)."""
    id_field: str = "id"
    """Field holding the document id; ids are generated (path:line) when it is absent."""
    text_field: str = "text"
    """Field holding the document text."""

    @field_validator("path")
    @classmethod
    def _known_builtin(cls, path: str) -> str:
        if path.startswith("builtin:") and path not in BUILTIN_SOURCES:
            raise ValueError(f"unknown builtin source (known: {', '.join(BUILTIN_SOURCES)})")
        return path


class NormalizeConfig(Section):
    nfkc: Bool = True
    """Apply Unicode NFKC normalization."""
    strip_control: Bool = True
    """Remove control characters other than newline and tab."""
    collapse_whitespace: Bool = True
    """Collapse runs of spaces/tabs, strip line ends, and squeeze 3+ newlines into 2."""


class FilterConfig(Section):
    """Gopher / C4 style quality rules; set a threshold to null to switch that rule off."""

    min_words: Int | None = Field(50, ge=0)
    """Drop documents with fewer words."""
    max_words: Int | None = Field(100_000, ge=0)
    """Drop documents with more words."""
    min_mean_word_length: Float | None = Field(3.0, ge=0)
    """Drop documents whose mean word length is below this."""
    max_mean_word_length: Float | None = Field(10.0, gt=0)
    """Drop documents whose mean word length is above this."""
    max_symbol_word_ratio: Fraction | None = 0.1
    """Drop documents with more '#' and '...' per word than this."""
    max_digit_fraction: Fraction | None = 0.25
    """Drop documents whose characters are more than this fraction digits."""
    min_alpha_word_fraction: Fraction | None = 0.8
    """Drop documents where fewer words than this contain a letter."""
    max_duplicate_line_fraction: Fraction | None = 0.3
    """Drop documents where more lines than this are repeats of earlier lines."""
    max_top_ngram_fraction: dict[NgramSize, NgramShare] | None = {2: 0.2, 3: 0.18, 4: 0.16}
    """For n-gram size n: drop if the most frequent n-gram covers more than this fraction of characters."""
    max_duplicate_ngram_fraction: dict[NgramSize, NgramShare] | None = {
        5: 0.15,
        6: 0.14,
        7: 0.13,
        8: 0.12,
        9: 0.11,
        10: 0.10,
    }
    """For n-gram size n: drop if repeated n-grams cover more than this fraction of characters."""
    min_stop_words: Int | None = Field(2, ge=0)
    """Drop documents with fewer distinct English stop words (the, of, and, ...)."""
    max_bullet_line_fraction: Fraction | None = 0.9
    """Drop documents where more lines than this start with a bullet."""

    @model_validator(mode="after")
    def _ranges(self) -> FilterConfig:
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is larger than max_words ({self.max_words})")
        low, high = self.min_mean_word_length, self.max_mean_word_length
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_mean_word_length ({low}) is larger than max_mean_word_length ({high})")
        return self


class PIIConfig(Section):
    enabled: Bool = True
    """Replace emails, IP addresses and phone numbers with placeholders."""
    email: str = "<EMAIL>"
    """Placeholder for email addresses."""
    ip_address: str = "<IP_ADDRESS>"
    """Placeholder for IPv4 / IPv6 addresses."""
    phone: str = "<PHONE>"
    """Placeholder for phone numbers."""


class LanguageConfig(Section):
    """Language identification (pipelines/langid.py); the section's presence switches it on."""

    enabled: Bool = True
    """Label each document with its language and confidence, and keep the languages listed in keep."""
    keep: list[str] = ["en"]
    """Language codes to keep (ISO 639-1 with the bundled model); an empty list keeps all (labels only)."""
    min_confidence: Fraction = 0.5
    """Drop a document of a kept language whose confidence (probability of its language) is below this."""
    model_path: PathOrUri | None = None
    """A fastText language-ID model (.bin, e.g. lid.176.bin) to use instead of langid.py's bundled model; needs `pip install fasttext-wheel`."""
    max_chars: Int | None = Field(2000, ge=1)
    """Identify the language from the first this many characters (null: the whole text)."""

    @field_validator("keep")
    @classmethod
    def _codes(cls, keep: list[str]) -> list[str]:
        bad = [code for code in keep if not LANGUAGE_CODE.match(code)]
        if bad:
            raise ValueError(f"not language codes: {bad} (ISO 639-1 such as en, de, fr)")
        return keep

    @field_validator("model_path")
    @classmethod
    def _fasttext_installed(cls, path: str | None) -> str | None:
        from importlib.util import find_spec

        if path is not None and find_spec("fasttext") is None:
            raise ValueError("a fastText model needs the fasttext package: pip install fasttext-wheel")
        return path


class SensitiveCategoryConfig(Section):
    words: PathOrUri | None = None
    """File of words and phrases, one per line (# starts a comment), matched case-insensitively on word boundaries."""
    patterns: PathOrUri | None = None
    """File of RE2 regular expressions, one per line, matched case-insensitively (with neither file: the shipped lists)."""
    action: Literal["drop", "mask"] = "drop"
    """drop: drop a document above max_per_1000_words; mask: replace every match with the mask text."""
    max_per_1000_words: Float = Field(1.0, ge=0)
    """With action drop: drop a document with more matches per 1000 words than this (0: any match drops it)."""
    mask: str | None = None
    """With action mask: the text that replaces each match; null: <CATEGORY> (the name in capitals)."""


class SensitiveConfig(Section):
    """Sensitive-content rules (pipelines/sensitive.py); the section's presence switches them on."""

    enabled: Bool = True
    """Count matches of each category's words and patterns, and drop or mask as the category says."""
    categories: dict[CategoryName, SensitiveCategoryConfig] = Field(
        default_factory=lambda: {name: SensitiveCategoryConfig() for name in SHIPPED_CATEGORIES},
        min_length=1,
    )
    """Categories by name; profanity, adult and violence have shipped English lists."""

    @model_validator(mode="after")
    def _lists(self) -> SensitiveConfig:
        for name, category in self.categories.items():
            if category.words is None and category.patterns is None and name not in SHIPPED_CATEGORIES:
                raise ValueError(
                    f"category '{name}' has no shipped lists ({', '.join(SHIPPED_CATEGORIES)} do): "
                    f"set categories.{name}.words or categories.{name}.patterns"
                )
        return self


# A classifier's name starts its score columns: lowercase letters, digits and underscores.
ClassifierName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
MAX_ACTORS = 10_000  # actors of one classifier's pool; more is a typo
MAX_CLASSIFIER_BATCH = 1_000_000  # documents one actor scores in one call


class ClassifierConfig(Section):
    """A user's local text classifier run as Ray Data batch inference (pipelines/classify.py), under its
    name in `data.classifiers`; each label's score becomes a float32 column `<name>_<label>`."""

    kind: Literal["hf", "fasttext"] = "hf"
    """hf: a Hugging Face sequence-classification model; fasttext: a fastText supervised model (.bin)."""
    path: PathOrUri
    """hf: a folder saved with save_pretrained (config.json, *.safetensors, the tokenizer); fasttext: the .bin file; local or URI."""
    min_score: dict[str, Fraction] = {}
    """Drop a document whose score for a label is below the value: {label: lowest score kept}."""
    max_score: dict[str, Fraction] = {}
    """Drop a document whose score for a label is above the value: {label: highest score kept}."""
    batch_size: Int = Field(64, ge=1, le=MAX_CLASSIFIER_BATCH)
    """Documents per model call (one Ray Data batch)."""
    concurrency: Int = Field(1, ge=1, le=MAX_ACTORS)
    """Actors in the pool; each loads the model once."""
    num_gpus: Float = Field(0, ge=0, le=64)
    """GPUs per actor (0: the model runs on CPU)."""
    num_cpus: Float = Field(1, ge=0, le=1024)
    """CPUs per actor (Ray sets the actor's torch / OpenMP threads to this)."""
    max_length: Int = Field(512, ge=1, le=MAX_SEQ_LEN)
    """hf: tokens per document; longer documents are truncated."""
    max_chars: Int | None = Field(10_000, ge=1)
    """Score the first this many characters of a document (null: the whole text)."""
    trust_remote_code: Bool = False
    """hf: allow a model folder's own Python code to run (only for models you trust)."""
    batch_invariant: Bool = True
    """hf: pad every model call to batch_size x max_length, so a document's scores do not depend on the documents batched with it (bit for bit the same on any number of actors); false pads to each batch's longest document: faster on short documents, scores then vary in the last bits."""

    @field_validator("kind")
    @classmethod
    def _fasttext_installed(cls, kind: str) -> str:
        from importlib.util import find_spec

        if kind == "fasttext" and find_spec("fasttext") is None:
            raise ValueError("a fastText model needs the fasttext package: pip install fasttext-wheel")
        return kind


class NearDedupConfig(Section):
    enabled: Bool = True
    """Remove near-duplicates with MinHash LSH."""
    ngram: Int = Field(5, ge=1, le=MAX_NGRAM)
    """Word n-gram size of the shingles."""
    num_perm: Int = Field(128, ge=8, le=8192)
    """Number of MinHash permutations."""
    threshold: Float = Field(0.8, gt=0, lt=1)
    """Jaccard similarity at and above which two documents are duplicates."""
    bands: Int | None = Field(None, ge=1)
    """LSH bands; derived from threshold and num_perm when null (with rows)."""
    rows: Int | None = Field(None, ge=1)
    """Rows per band; derived from threshold and num_perm when null (with bands)."""
    verify: Bool = True
    """Check each candidate pair's exact Jaccard on its shingles before linking them."""
    seed: Seed = 1
    """Seed of the permutations (the same seed gives the same signatures on any cluster)."""

    @model_validator(mode="after")
    def _bands_rows(self) -> NearDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither (then they are derived from threshold)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows ({self.bands}*{self.rows}) exceeds num_perm ({self.num_perm})")
        return self


class TokenizerConfig(Section):
    path: PathOrUri | None = None
    """Use the HF tokenizer saved at this local path instead of training one."""
    vocab_size: Int = Field(8192, ge=300, le=2**31 - 1)
    """Vocabulary size of the byte-level BPE tokenizer trained on the kept documents."""
    min_frequency: Int = Field(2, ge=1)
    """Minimum pair frequency for a BPE merge."""
    max_training_docs: Int = Field(200_000, ge=1)
    """Train the tokenizer on at most this many kept documents (a deterministic sample)."""


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    """Where the corpus comes from; several sources are read as one corpus."""
    output: PathOrUri | None = None
    """Output folder; defaults to <run_dir>/curated."""
    normalize: NormalizeConfig = NormalizeConfig()
    """Text normalization."""
    filters: FilterConfig = FilterConfig()
    """Quality filters."""
    pii: PIIConfig = PIIConfig()
    """PII scrubbing."""
    sensitive: SensitiveConfig | None = None
    """Sensitive-content rules (profanity, adult, violence, your own lists); off unless the recipe has the section."""
    language: LanguageConfig | None = None
    """Language identification; off unless the recipe has the section."""
    classifiers: dict[ClassifierName, ClassifierConfig] = {}
    """Model-based scoring after the quality filters: classifiers by name (which starts their score columns), run in this order; empty: off."""
    exact_dedup: Bool = True
    """Remove documents whose normalized text is identical (keeps the smallest id)."""
    near_dedup: NearDedupConfig = NearDedupConfig()
    """Near-duplicate removal."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """Tokenizer training or loading."""
    seq_len: Int = Field(512, ge=8, le=MAX_SEQ_LEN)
    """Tokens per packed training sequence."""
    eval_fraction: Float = Field(0.02, ge=0, lt=1)
    """Fraction of kept documents (chosen by a hash of their id) written to the eval split."""
    finetune_fraction: Fraction = 0.0
    """Fraction of kept documents held apart from pretraining for fine-tuning and tuning (splits finetune / finetune_eval), chosen by a hash of their id."""
    finetune_eval_fraction: Float = Field(0.1, gt=0, lt=1)
    """Share of the held-apart documents written to finetune_eval, the validation split that tuning scores trials on."""
    rows_per_shard: Int = Field(4096, ge=1)
    """Packed sequences per token shard (shards are balanced to within one row)."""
    write_rejects: Bool = True
    """Write the rows that filters drop to rejects/ with their reason (malformed input is always written)."""
    batch_size: Int = Field(512, ge=1)
    """Rows per Ray Data batch in the map stages."""

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.eval_fraction + self.finetune_fraction >= 1:
            raise ValueError(
                f"eval_fraction + finetune_fraction ({self.eval_fraction} + {self.finetune_fraction}) "
                "must be below 1, or no document is left for the train split"
            )
        return self
