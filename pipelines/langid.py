"""Language identification: every document gets a language label and a confidence; the recipe keeps
the languages it lists (`data.language`).

The model ships inside a package, so nothing is downloaded at run time: langid.py's naive Bayes model
(97 languages, ISO 639-1 codes). `LangidModel` runs it batched: the same numbers as
`langid.classify`, about 3x as fast (benchmarks/curate_stages.py). A user's fastText model
(`model_path`, e.g. lid.176.bin) takes its place when given. Labels are written to `language` and
`language_score` on every document the stage sees, so the rejects show them too.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.core import storage
from raylm.pipelines.config import LanguageConfig

# Reject reasons this stage emits.
LANGUAGE = "language"  # "language: de 0.97 not in [en]"
LANGUAGE_CONFIDENCE = "language_confidence"  # "language_confidence: en 0.41 < 0.5"
LANGUAGE_REASONS = frozenset({LANGUAGE, LANGUAGE_CONFIDENCE})
LABEL, SCORE = "language", "language_score"  # the columns it writes


class LangidModel:
    """langid.py's bundled model, a batch at a time. langid walks a byte automaton and adds, for each
    state entered, the log-probabilities of the n-gram features that state emits; here each state's
    sum over its features is precomputed once (state_logprob), so a document costs one automaton walk
    and one gather instead of a feature vector and a matrix product per document."""

    def __init__(self):
        from langid.langid import LanguageIdentifier, model

        ident = LanguageIdentifier.from_modelstring(model)
        self.next_state = list(ident.tk_nextmove)  # a list indexes faster than the array.array
        ptc = ident.nb_ptc.astype(np.float64)
        self.state_logprob = np.zeros((len(self.next_state) >> 8, ptc.shape[1]))
        for state, features in ident.tk_output.items():
            self.state_logprob[state] = ptc[list(features)].sum(axis=0)
        self.prior = ident.nb_pc.astype(np.float64)
        self.labels = [str(c) for c in ident.nb_classes]

    def _states(self, text: str) -> np.ndarray:
        step = self.next_state
        walk = itertools.accumulate(text.encode(), lambda s, byte: step[(s << 8) + byte], initial=0)
        return np.fromiter(walk, dtype=np.int64)[1:]

    def classify(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(label, probability of that label) per text."""
        logits = np.empty((len(texts), len(self.labels)))
        for i, text in enumerate(texts):
            logits[i] = self.state_logprob[self._states(text)].sum(axis=0)
        logits += self.prior
        top = logits.argmax(axis=1)
        # langid's norm_probs: the softmax of the top label, computed from the differences (no overflow)
        with np.errstate(over="ignore"):
            score = 1.0 / np.exp(logits - logits[np.arange(len(texts)), top][:, None]).sum(axis=1)
        return [self.labels[k] for k in top], score


class FastTextModel:
    """A user's fastText language-ID model; labels are its own less `__label__` (lid.176: ISO 639-1)."""

    def __init__(self, path: str):
        import fasttext

        with storage.local_file(path) as local:
            self.model = fasttext.load_model(local)

    def classify(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        # fastText reads one line per prediction; the list form also avoids fasttext 0.9's numpy-2
        # failure in its single-string predict.
        labels, probs = self.model.predict([t.replace("\n", " ") for t in texts], k=1)
        names = [found[0].removeprefix("__label__") if found else "" for found in labels]
        return names, np.array([min(float(p[0]), 1.0) if len(p) else 0.0 for p in probs])


@functools.cache
def load_model(model_path: str | None) -> LangidModel | FastTextModel:
    """Once per worker process: Ray Data reuses its workers, so a model is loaded once, not per batch."""
    return FastTextModel(model_path) if model_path else LangidModel()


class LanguageID:
    """Ray Data stage: labels the rows not yet rejected, and rejects those of a language not kept or of
    too little confidence."""

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.keep = frozenset(cfg.keep)

    def verdict(self, label: str, score: float) -> str | None:
        if self.keep and label not in self.keep:
            return f"{LANGUAGE}: {label} {score:.2f} not in [{', '.join(self.cfg.keep)}]"
        if score < self.cfg.min_confidence:
            return f"{LANGUAGE_CONFIDENCE}: {label} {score:.2f} < {self.cfg.min_confidence}"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        alive = np.flatnonzero(pc.is_null(batch.column("reject")).to_numpy(zero_copy_only=False))
        texts = [(t or "")[: self.cfg.max_chars] for t in batch.column("text").take(alive).to_pylist()]
        labels, scores = load_model(self.cfg.model_path).classify(texts) if texts else ([], [])
        label_col: list[str | None] = [None] * batch.num_rows
        score_col: list[float | None] = [None] * batch.num_rows
        reject = batch.column("reject").to_pylist()
        for row, label, score in zip(alive.tolist(), labels, scores):
            label_col[row], score_col[row] = label, float(score)
            reject[row] = self.verdict(label, float(score))
        batch = batch.set_column(
            batch.schema.get_field_index("reject"), "reject", pa.array(reject, pa.string())
        )
        return batch.append_column(LABEL, pa.array(label_col, pa.string())).append_column(
            SCORE, pa.array(score_col, pa.float32())
        )


def block_counts(t: pa.Table) -> dict[str, int]:
    """Documents per language label in one block (every document the stage labelled, kept or not)."""
    counted = pc.value_counts(t.column(LABEL).drop_null())
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
