"""Text output of the benchmark: the machine, the result table with ratios, and the issues' targets.

A ratio is always the tool's figure divided by minerva-mount's on the same row, so on MB/s and
files/s rows a ratio above 1 means the tool is faster than minerva-mount, and on seconds rows
(listings) a ratio above 1 means the tool is slower.
"""

from __future__ import annotations

MINERVA = "minerva-mount"


def machine_text(info: dict) -> str:
    return "\n".join([
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, kernel {info['kernel']}, "
        f"{info['os']}, load {info['load_before']}",
        f"versions: python {info['python']}; weed {info['weed']}; {info['s3fs']}; {info['rclone']}; "
        f"{info['fio']}",
        f"checkout: {info['checkout']}",
    ])


def load_text(doc: dict) -> str:
    info = doc["machine"]
    return (f"load average (1, 5, 15 min) before {info['load_before']}, after {info.get('load_after', '?')}; "
            f"wall time {doc['wall_seconds'] / 60:.1f} min")


def value(doc: dict, wid: str, column: str) -> float | None:
    cell = doc["results"].get(wid, {}).get(column)
    return cell.get("value") if cell else None


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def table_text(doc: dict) -> str:
    columns = doc["columns"]
    header = ["workload", "unit", *columns]
    lines, notes = [], []
    for row in doc["workloads"]:
        cells = doc["results"].get(row["id"], {})
        base = value(doc, row["id"], MINERVA)
        out = [row["title"], row["unit"] + (" (lower=better)" if row["better"] == "lower" else "")]
        for col in columns:
            cell = cells.get(col)
            if cell is None:
                out.append("-")
            elif "failed" in cell:
                notes.append(f"[{len(notes) + 1}] {row['id']} / {col}: {cell['failed']}")
                out.append(f"failed [{len(notes)}]")
            elif col == MINERVA or not base:
                out.append(_fmt(cell["value"]))
            else:
                out.append(f"{_fmt(cell['value'])} ({cell['value'] / base:.2f}x)")
        lines.append(out)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r))

    text = [fmt(header), "  ".join("-" * n for n in widths), *map(fmt, lines)]
    text.append("(x) = the tool's figure / minerva-mount's on the same row")
    text.append(load_text(doc))
    if not doc.get("page_cache_dropped", True):
        text.append("WARNING: the page cache could not be dropped (not root): cold figures are not cold")
    text += notes
    text.append("targets:")
    for t in doc.get("targets", []):
        text.append(f"  [{t['status']:>4}] issue {t['issue']}: {t['what']}  ({t['detail']})")
    return "\n".join(text)


def _target(issue: int, what: str, ok: bool | None, detail: str) -> dict:
    return {"issue": issue, "what": what, "status": "n/a" if ok is None else "ok" if ok else "MISS",
            "detail": detail}


def targets(doc: dict) -> list[dict]:
    """The issues' targets, judged on this run (n/a when a figure is missing)."""
    out = []

    def v(wid, col):
        return value(doc, wid, col)

    def at_least(issue, what, mine, other, factor=1.0, strict=False):
        if mine is None or other is None:
            out.append(_target(issue, what, None, "figure missing"))
            return
        ok = mine > other * factor if strict else mine >= other * factor
        out.append(_target(issue, what, ok, f"minerva {_fmt(mine)} vs {_fmt(other * factor)}"))

    for wid in ("seq_dd", "seq_fio"):
        mine = v(wid, MINERVA)
        best = [x for x in (v(wid, "boto3"), v(wid, "boto3-parallel")) if x is not None]
        at_least(3, f"{wid}: >= 0.8x best raw boto3", mine, max(best) if best else None, 0.8)
        for peer in ("s3fs", "rclone"):
            at_least(3, f"{wid}: ahead of {peer}", mine, v(wid, peer), strict=True)
    at_least(3, "warm re-read >= 5x minerva's cold dd", v("warm", MINERVA), v("seq_dd", MINERVA), 5.0)
    for wid in ("random", "heads"):
        at_least(3, f"{wid}: no slower than s3fs", v(wid, MINERVA), v(wid, "s3fs"))
    at_least(4, "write_big: >= 0.8x boto3 upload_file", v("write_big", MINERVA),
             v("write_big", "boto3-parallel"), 0.8)
    for peer in ("s3fs", "rclone"):
        at_least(4, f"write_small: ahead of {peer}", v("write_small", MINERVA), v("write_small", peer),
                 strict=True)
    for row in doc["workloads"]:
        if row["phase"] != "listings":
            continue
        mine = v(row["id"], MINERVA)
        for peer in ("s3fs", "rclone"):
            other = v(row["id"], peer)
            # seconds: faster means fewer; compare speeds so the same helper applies
            at_least(6, f"{row['id']}: ahead of {peer}", 1 / mine if mine else None,
                     1 / other if other else None, strict=True)
            out[-1]["detail"] = "figure missing" if mine is None or other is None else \
                f"minerva {_fmt(mine)} s vs {_fmt(other)} s"
    return out


def markdown(doc: dict) -> str:
    """The table as Markdown, for bench/README.md's results section."""
    info = doc["machine"]
    cols = doc["columns"]
    lines = [f"Command: `{doc['command']}` on `{info['checkout']}`, {doc['started']}, wall time "
             f"{doc['wall_seconds'] / 60:.1f} min.",
             f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, "
             f"kernel {info['kernel']}, {info['os']}; python {info['python']}, weed {info['weed']}, "
             f"{info['s3fs']}, {info['rclone']}, {info['fio']}. "
             f"Load average before {info['load_before']}, after {info.get('load_after', '?')}.",
             "", "| workload | unit | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in doc["workloads"]:
        cells = doc["results"].get(row["id"], {})
        base = value(doc, row["id"], MINERVA)
        out = []
        for col in cols:
            cell = cells.get(col)
            if cell is None:
                out.append("-")
            elif "failed" in cell:
                out.append("failed: " + cell["failed"].replace("|", "/")[:80])
            elif col == MINERVA or not base:
                out.append(f"**{_fmt(cell['value'])}**" if col == MINERVA else _fmt(cell["value"]))
            else:
                out.append(f"{_fmt(cell['value'])} ({cell['value'] / base:.2f}x)")
        lines.append(f"| {row['title']} | {row['unit']} | " + " | ".join(out) + " |")
    lines += ["", "Targets: " + "; ".join(f"{t['what']}: **{t['status']}**" for t in doc.get("targets", []))]
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    print(markdown(json.loads(path.read_text())))
