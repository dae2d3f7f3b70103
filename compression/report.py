"""The comparison table of `raylm compress`: parameters, bytes on disk, held-out perplexity and its ratio
to the uncompressed model (and, for a distilled student, its KL to it), one row per method (compare.json and the table printed at the end)."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("method", "method", "{}"),
    ("parameters", "params", "{:,}"),
    ("bytes", "bytes", "{:,}"),
    ("bytes_ratio", "size", "{:.3f}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("perplexity_ratio", "ppl ratio", "{:.4f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("kl_to_teacher", "KL to ref", "{:.4f}"),
    ("compress_s", "time s", "{:.1f}"),
)


def comparison(reference: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference row first, then each method's with its ratios to the reference."""
    out = []
    for row in [reference, *rows]:
        out.append(
            {
                **row,
                "bytes_ratio": row["bytes"] / reference["bytes"],
                "perplexity_ratio": row["perplexity"] / reference["perplexity"],
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join(lines)
