"""Rows -> one Markdown table (printed and saved), plus results.json with everything measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Row

COLUMNS = [
    "model",
    "photo",
    "setup",
    "load",
    "img/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "workers x batch",
    "input px",
    "engine",
    "vs stock",
    "of ceiling",
]
SETUP_ORDER = {"stock": 0, "ours": 1, "inprocess": 2}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(numerator: float, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "-"


def _share(value: float, ceiling: float | None) -> str:
    return f"{100 * value / ceiling:.0f}%" if ceiling else "-"


def ceiling(rows: list[Row], row: Row) -> float | None:
    """The best in-process img/s for `row`'s model and photo, if measured."""
    values = [r.img_s for r in rows if (r.model, r.photo) == (row.model, row.photo) and r.setup == "inprocess"]
    return max(values) if values else None


def stock_img_s(rows: list[Row], row: Row) -> float | None:
    """The stock handler's img/s for `row`'s model and photo at the same load, if measured."""
    key = (row.model, row.photo, row.level)
    return next((r.img_s for r in rows if r.setup == "stock" and (r.model, r.photo, r.level) == key), None)


def table_rows(rows: list[Row]) -> list[Row]:
    shown = [r for r in rows if r.detail.get("in_table", True)]
    models = list(dict.fromkeys(r.model for r in rows))
    photos = list(dict.fromkeys(r.photo for r in rows))
    return sorted(shown, key=lambda r: (models.index(r.model), photos.index(r.photo), SETUP_ORDER[r.setup]))


def cells(row: Row, rows: list[Row], quiet_pct: float) -> list[str]:
    http = row.setup != "inprocess"
    disturbed = "!" if (row.other_cpu_pct or 0) >= quiet_pct else ""
    vs_stock = _ratio(row.img_s, stock_img_s(rows, row)) if row.setup == "ours" else ""
    return [
        row.model,
        row.photo or "-",
        row.setup,
        row.level,
        f"{row.img_s:.1f}{disturbed}",
        _ms(row.p50_ms),
        _ms(row.p95_ms),
        _ms(row.p99_ms),
        f"{row.errors}/{row.requests}",
        f"{row.workers} x {row.batch_size}" if row.workers is not None else "-",
        str(row.input_size or "-"),
        row.engine or "-",
        vs_stock,
        _share(row.img_s, ceiling(rows, row)) if http else "",
    ]


def markdown(rows: list[Row], quiet_pct: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(r, rows, quiet_pct)) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


PEER_COLUMNS = ["photo", "server", "load", "img/s", "p50 ms", "p99 ms", "errors", "workers x batch", "peak RSS MB"]


def peers_markdown(rows: list[Row]) -> str:
    """bench.peers' table: per photo and load, each server's throughput, latency, errors and memory."""
    photos = list(dict.fromkeys(r.photo for r in rows))
    servers = list(dict.fromkeys(r.setup for r in rows))
    lines = ["| " + " | ".join(PEER_COLUMNS) + " |", "|" + "|".join("---" for _ in PEER_COLUMNS) + "|"]
    for row in sorted(rows, key=lambda r: (photos.index(r.photo), int(r.level[2:]), servers.index(r.setup))):
        lines.append(
            "| "
            + " | ".join(
                [
                    row.photo,
                    row.setup,
                    row.level,
                    f"{row.img_s:.1f}",
                    _ms(row.p50_ms),
                    _ms(row.p99_ms),
                    f"{row.errors}/{row.requests}",
                    f"{row.workers} x {row.batch_size}",
                    str(row.detail.get("peak_rss_mb", "-")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def notes(quiet_pct: float) -> str:
    return NOTES + f" !: other processes used {quiet_pct:g}% of a core or more during that measurement."


NOTES = (
    "img/s: HTTP 200 responses per second (in-process: images per second). Latencies: per request "
    "(in-process: per batch). errors: non-200 responses + transport errors / requests sent. "
    "vs stock: our img/s over the stock handler's at the same concurrency. of ceiling: img/s as a share "
    "of the best in-process img/s. input px: the square side the model sees. engine: how the forward pass ran."
)


def save(out_dir: Path, meta: dict, rows: list[Row], table: str, quiet_pct: float) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results, table_md = out_dir / "results.json", out_dir / "table.md"
    results.write_text(json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=1))
    header = "\n".join(f"- {key}: {value}" for key, value in meta.items() if not isinstance(value, dict | list))
    table_md.write_text(f"{header}\n\n{table}\n\n{notes(quiet_pct)}\n")
    return results, table_md
