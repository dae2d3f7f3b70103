"""Model-based scoring (pipelines/classify.py): a tiny BERT classifier trained here on two kinds of
generated text (no download), the stage's scores, thresholds and reasons on small tables without Ray,
bad configs refused before Ray starts, and curation on 1 and 2 actors with the same scores."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.core.lineage import read_manifest
from raylm.pipelines import classify
from raylm.pipelines.config import ClassifierConfig, FilterConfig
from raylm.pipelines.filters import QualityFilter
from raylm.pipelines.summary import classifiers_line

STOP = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from"]
TOPICS = {  # two kinds of text the classifier learns to tell apart; half of each document is stop words
    "tech": [
        "model",
        "data",
        "train",
        "cluster",
        "worker",
        "token",
        "shard",
        "serve",
        "batch",
        "layer",
        "weight",
        "gradient",
        "loss",
        "step",
    ],
    "nature": [
        "river",
        "mountain",
        "garden",
        "window",
        "letter",
        "morning",
        "summer",
        "winter",
        "market",
        "village",
        "city",
        "road",
    ],
}
LABELS = {0: "Nature", 1: "Tech-Talk"}  # columns topic_nature and topic_tech_talk


def topic_document(rng: random.Random, topic: str, n_words: int = 120) -> str:
    """Capitalized sentences of 12 words, half topic words and half stop words: passes the quality filters."""
    words = [rng.choice(TOPICS[topic]) if rng.random() < 0.5 else rng.choice(STOP) for _ in range(n_words)]
    return " ".join(" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12))


def train_topic_classifier(tokenizer_dir: str, out, steps: int = 40) -> str:
    """A 1-layer BERT (hidden 32, ~33k parameters) trained for a few steps to tell tech from nature."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for _ in range(steps):
        labels = [rng.random() < 0.5 for _ in range(16)]
        texts = [topic_document(rng, "tech" if y else "nature", rng.randint(12, 60)) for y in labels]
        batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels, dtype=torch.long)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def topic_model(tiny_tokenizer_dir, tmp_path_factory):
    return train_topic_classifier(tiny_tokenizer_dir, tmp_path_factory.mktemp("topic-model"))


def classifier(path: str, **overrides) -> ClassifierConfig:
    return ClassifierConfig(**({"path": path, "max_length": 128, "batch_size": 8} | overrides))


def table(texts, reject=None) -> pa.Table:
    return pa.table({"text": texts, "reject": pa.array(reject or [None] * len(texts), pa.string())})


def test_column_names_from_labels():
    assert classify.column_label("Tech-Talk") == "tech_talk"
    assert classify.column_label("__LABEL 0!") == "label_0"


def test_stage_scores_thresholds_and_leaves_rejected_rows_unscored(topic_model):
    rng = random.Random(5)
    texts = [topic_document(rng, "tech") for _ in range(2)] + [
        topic_document(rng, "nature") for _ in range(2)
    ]
    cfg = classifier(topic_model, min_score={"tech_talk": 0.5}, max_score={"Nature": 0.9})
    p = classify.plan("topic", cfg, "data.classifiers.topic")
    assert p.labels == ("Nature", "Tech-Talk") and p.columns == ("topic_nature", "topic_tech_talk")
    out = classify.ScoreDocuments(cfg, p)(table([*texts, "already out"], [None] * 4 + ["min_words: 2 < 50"]))
    assert out.schema.field("topic_tech_talk").type == pa.float32()
    rows = out.to_pylist()
    tech = np.array([r["topic_tech_talk"] for r in rows[:4]])
    print(f"\ntech scores of 2 tech then 2 nature documents: {tech.round(4).tolist()}")
    assert (tech[:2] > 0.9).all() and (tech[2:] < 0.1).all(), "the tiny model separates the two kinds"
    assert all(abs(r["topic_nature"] + r["topic_tech_talk"] - 1) < 1e-5 for r in rows[:4])  # softmax
    assert rows[0]["reject"] is None and rows[1]["reject"] is None
    # both nature documents fail the tech_talk minimum first (recipe order: min_score, then max_score)
    assert rows[2]["reject"] == f"classifier_min_score[topic_tech_talk]: {tech[2]:.4f} < 0.5"
    assert rows[4] == {
        "text": "already out",
        "reject": "min_words: 2 < 50",
        "topic_nature": None,
        "topic_tech_talk": None,
    }
    counts = classify.block_counts(out, [p])
    assert counts["topic.scored"] == 4 and counts["topic_tech_talk.dropped"] == 2
    assert counts["topic_nature.dropped"] == 0 and abs(counts["topic_tech_talk.sum"] - tech.sum()) < 1e-5


def test_max_score_and_scores_that_do_not_depend_on_the_batch(topic_model):
    rng = random.Random(6)
    texts = [topic_document(rng, t, rng.randint(50, 200)) for t in ["tech", "nature"] * 6]
    stage = classify.ScoreDocuments(
        cfg := classifier(topic_model, max_score={"nature": 0.5}), classify.plan("topic", cfg, "k")
    )
    together = stage(table(texts))
    alone = pa.concat_tables([stage(table([t])) for t in texts])
    shuffled = stage(table(texts[::-1]))
    for column in ("topic_nature", "topic_tech_talk"):  # bit for bit, whatever the batch holds
        assert together[column].to_pylist() == alone[column].to_pylist() == shuffled[column].to_pylist()[::-1]
    reasons = together.column("reject").to_pylist()
    assert reasons[0] is None and reasons[1].startswith("classifier_max_score[topic_nature]: 0.9")


def test_summary_line():
    block = {
        "topic": {
            "documents_scored": 1204,
            "mean": {"topic_nature": 0.29, "topic_tech_talk": 0.71},
            "drops": {"topic_tech_talk": 56},
        }
    }
    assert classifiers_line(block) == (
        "\nclassifiers: topic 1,204 scored (mean topic_nature 0.29, topic_tech_talk 0.71), 56 dropped "
        "(topic_tech_talk 56)"
    )
    assert classifiers_line(None) == ""


def test_config_checks_names():
    base = {"name": "t", "data": {"sources": [{"path": "builtin:python-docs"}]}}
    assert build_config(base).data.classifiers == {}
    on = build_config({**base, "data": {**base["data"], "classifiers": {"q": {"path": "/m"}}}}).data
    assert on.classifiers["q"].kind == "hf" and on.classifiers["q"].trust_remote_code is False
    with pytest.raises(ConfigError, match=r"data\.classifiers\.Bad Name"):
        build_config({**base, "data": {**base["data"], "classifiers": {"Bad Name": {"path": "/m"}}}})
    with pytest.raises(ConfigError, match=r"data\.classifiers\.q\.min_score\.hq"):
        build_config(
            {**base, "data": {**base["data"], "classifiers": {"q": {"path": "/m", "min_score": {"hq": 2}}}}}
        )


@pytest.fixture(scope="module")
def pickle_only_model(topic_model, tmp_path_factory):
    """The topic model with its weights as a pickled pytorch_model.bin only (transformers 5 writes
    safetensors whatever save_pretrained is told)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(topic_model, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return str(out)


@pytest.mark.parametrize(
    "case, key, says",
    [
        ("missing", "data.classifiers.topic.path", "not found"),
        ("unknown-label", "data.classifiers.topic.min_score", "no label 'quality'"),
        ("pickle-only", "data.classifiers.topic.path", "safetensors"),
    ],
)
def test_bad_classifiers_exit_2_before_ray(case, key, says, topic_model, pickle_only_model, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "text": "some text"}) + "\n")
    path = {"missing": str(tmp_path / "nope"), "pickle-only": pickle_only_model}.get(case, topic_model)
    entry = {"path": path, "min_score": {"quality": 0.5} if case == "unknown-label" else {}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {"name": "r", "run_dir": str(tmp_path / "run"), "data": {"sources": [{"path": str(corpus)}]}}
        )
    )
    code = main(["curate", str(recipe), f"data.classifiers.topic={json.dumps(entry)}"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and says in err, err
    assert not (tmp_path / "run").exists(), "refused before anything was created"


def test_a_fasttext_classifier(tmp_path):
    fasttext = pytest.importorskip("fasttext")
    rng = random.Random(2)
    lines = [f"__label__{t} {topic_document(rng, t, 40)}" for _ in range(100) for t in TOPICS]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(
        str(tmp_path / "train.txt"), dim=8, epoch=25, lr=0.5, thread=1, seed=1, verbose=0
    )
    model.save_model(str(tmp_path / "topic.bin"))
    cfg = classifier(str(tmp_path / "topic.bin"), kind="fasttext", min_score={"tech": 0.5})
    p = classify.plan("topic", cfg, "k")
    assert set(p.columns) == {"topic_tech", "topic_nature"}
    out = classify.ScoreDocuments(cfg, p)(table([topic_document(rng, "tech"), topic_document(rng, "nature")]))
    rows = out.to_pylist()
    assert rows[0]["topic_tech"] > 0.9 and rows[0]["reject"] is None
    assert rows[1]["reject"].startswith("classifier_min_score[topic_tech]: 0.0")


# --- curation with the classifier on an actor pool (Ray) ----------------------------------------------

FILES = 6
# Rows per batch of the cleaning pass: Ray Data bundles at least this many listed files into one
# cleaning task, so with 2 every task reads 2 of the 6 files and the actor pool gets 3 blocks.
CLEAN_BATCH = 2


@pytest.fixture(scope="module")
def topic_corpus(tmp_path_factory):
    rng = random.Random(3)
    docs = [{"id": f"t{i:02d}", "text": topic_document(rng, "tech")} for i in range(30)]
    docs += [{"id": f"n{i:02d}", "text": topic_document(rng, "nature")} for i in range(30)]
    docs += [{"id": f"short{i}", "text": "Too short to keep."} for i in range(3)]
    kept = QualityFilter(FilterConfig())(table([d["text"] for d in docs]))
    assert kept.column("reject").null_count == 60, "the generated documents pass the quality filters"
    root = tmp_path_factory.mktemp("topic-corpus")
    for k in range(FILES):
        (root / f"part-{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[k::FILES]))
    return root


def topic_config(corpus, run_dir, model: str, actors: int):
    from tests.pipelines.test_curate import config

    entry = {"path": model, "min_score": {"Tech-Talk": 0.5}, "concurrency": actors}
    return config(
        corpus,
        run_dir,
        batch_size=CLEAN_BATCH,
        classifiers={"topic": entry | {"batch_size": 4, "max_length": 128}},
    )


@pytest.fixture(scope="module")
def curated_on_2_actors(ray_cluster, topic_corpus, topic_model, tmp_path_factory):
    from raylm.pipelines.run import run

    cfg = topic_config(topic_corpus, tmp_path_factory.mktemp("run"), topic_model, actors=2)
    run(cfg)
    return cfg.data.output


@pytest.mark.slow
def test_curate_scores_on_an_actor_pool(curated_on_2_actors):
    m = read_manifest(curated_on_2_actors)
    c = m["counts"]
    assert (c["after_language"], c["after_filters"], c["after_classifiers"]) == (63, 60, 30)
    assert c["after_exact_dedup"] == 30 and m["drops"]["classifiers"] == {"classifier_min_score": 30}
    block = m["classifiers"]["topic"]
    assert block["columns"] == ["topic_nature", "topic_tech_talk"]
    assert block["labels"] == ["Nature", "Tech-Talk"] and block["kind"] == "hf"
    assert block["documents_scored"] == 60 and block["drops"] == {"topic_tech_talk": 30}
    assert 0.4 < block["mean"]["topic_tech_talk"] < 0.6  # half tech, half nature
    docs = pq.read_table(f"{curated_on_2_actors}/docs")
    assert sorted(docs["id"].to_pylist()) == [f"t{i:02d}" for i in range(30)]  # score columns reach docs/
    assert min(docs["topic_tech_talk"].to_pylist()) >= 0.5
    assert docs.schema.field("topic_nature").type == pa.float32()
    rejects = {r["id"]: r for r in pq.read_table(f"{curated_on_2_actors}/rejects").to_pylist()}
    assert rejects["n00"]["reject"].startswith("classifier_min_score[topic_tech_talk]: 0.0")
    assert (
        rejects["short0"]["reject"].startswith("min_words") and rejects["short0"]["topic_tech_talk"] is None
    )


@pytest.mark.slow
def test_one_and_two_actors_give_identical_scores(curated_on_2_actors, topic_corpus, topic_model, tmp_path):
    """The curate run's scores (2 actors, docs/ + rejects/) against the cleaning pass on 1 actor."""
    from raylm.pipelines import readers
    from raylm.pipelines.run import _clean

    data = topic_config(topic_corpus, tmp_path, topic_model, actors=1).data
    one_actor = _clean(data, readers.find_inputs(data.sources).files).take_all()
    rows = pq.read_table(f"{curated_on_2_actors}/docs").to_pylist()
    rows += pq.read_table(f"{curated_on_2_actors}/rejects").to_pylist()

    def scores(rows):
        return {
            r["id"]: (r["topic_nature"], r["topic_tech_talk"]) for r in sorted(rows, key=lambda r: r["id"])
        }

    one, two = scores(one_actor), scores(rows)
    assert len(one) == 63 and one == two
    assert sum(v == (None, None) for v in one.values()) == 3  # the short ones were never scored
