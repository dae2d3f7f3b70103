"""Render each Grafana dashboard's panels from a running Prometheus into one PNG per dashboard.

Grafana is not packaged for the machines raylm is developed on, so the pictures in docs/monitoring/ are
drawn with matplotlib from the very queries of grafana/dashboards/*.json (query_range over the run), not
Grafana screenshots. Usage:

    python cluster/monitoring/render.py --prometheus http://127.0.0.1:9090 --out docs/monitoring \
        --start UNIX_TIME --end UNIX_TIME
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parent / "grafana" / "dashboards"
COLUMNS = 3


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt.replace("{{", "").replace("}}", "")


def series(url: str, panel: dict, window: tuple[float, float, float], rate_interval: str) -> list:
    """(legend, times, values) of each series of each target of the panel."""
    out = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$run", ".*").replace("$__rate_interval", rate_interval)
        for s in query_range(url, expr, *window):
            values = [(float(t), float(v)) for t, v in s["values"]]
            out.append((legend(target.get("legendFormat", ""), s["metric"]), values))
    return out


def scaled(unit: str, v: float) -> float:
    return 100 * v if unit == "percentunit" else v


def draw(ax, panel: dict, data: list, t0: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    suffix = {
        "percentunit": " %",
        "percent": " %",
        "s": " s",
        "MBs": " MB/s",
        "reqps": " req/s",
        "bytes": " B",
    }
    ax.set_title(panel["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    if not data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if panel["type"] == "timeseries":
        for name, values in data:
            ax.plot([t - t0 for t, _ in values], [scaled(unit, v) for _, v in values], label=name, lw=1.2)
        ax.set_xlabel("seconds into the run", fontsize=7)
        ax.set_ylabel(suffix.get(unit, "").strip(), fontsize=7)
        ax.legend(fontsize=6, loc="best")
        return
    last = [(name, scaled(unit, values[-1][1])) for name, values in data]
    if panel["type"] == "stat":
        ax.axis("off")
        text = "\n".join(f"{name}: {v:,.4g}{suffix.get(unit, '')}" for name, v in last[:6])
        ax.text(0.02, 0.5, text, va="center", fontsize=10, transform=ax.transAxes)
        return
    names = [n for n, _ in last]
    ax.barh(range(len(last)), [v for _, v in last], color="tab:blue")
    ax.set_yticks(range(len(last)), names, fontsize=6)
    ax.invert_yaxis()
    for i, (_, v) in enumerate(last):
        ax.text(v, i, f" {v:,.4g}", va="center", fontsize=6)


def render(
    url: str, dashboard: Path, out: Path, window: tuple[float, float, float], rate_interval: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(dashboard.read_text())
    panels = board["panels"]
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(15, 2.7 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        draw(ax, panel, series(url, panel, window, rate_interval), window[0])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"{board['title']}: the panels' queries over a real run, drawn from Prometheus (not Grafana)"
    )
    fig.tight_layout()
    path = out / f"{board['uid']}.png"
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def render_all(url: str, out: str, start: float, end: float, rate_interval: str = "30s") -> list[Path]:
    Path(out).mkdir(parents=True, exist_ok=True)
    window = (start, end, max(1.0, (end - start) / 300))
    return [render(url, p, Path(out), window, rate_interval) for p in sorted(DASHBOARDS.glob("*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--out", default="docs/monitoring")
    p.add_argument("--start", type=float, default=time.time() - 3600)
    p.add_argument("--end", type=float, default=time.time())
    p.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    args = p.parse_args()
    for path in render_all(args.prometheus, args.out, args.start, args.end, args.rate_interval):
        print(path)


if __name__ == "__main__":
    main()
