"""Reports: rich tables on the terminal, Markdown + JSON files, and plots against bpw."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

COLUMNS = [
    # key, header, format
    ("label", "variant", "{}"),
    ("bpw", "bpw", "{:.3f}"),
    ("bpw_all", "bpw (all)", "{:.3f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("ppl_increase_pct", "Δppl %", "{:+.2f}"),
    ("kl", "KL", "{:.5f}"),
    ("top1", "top-1 %", "{:.2%}"),
    ("match", "token match", "{:.1%}"),
    ("identical", "identical", "{}"),
    ("first_divergence", "1st diverg.", "{:.1f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if key == "top1":
        return f"{100 * v:.2f}"
    if key == "match":
        return f"{100 * v:.1f}"
    if key == "identical" and row.get("sequences"):
        return f"{v}/{row['sequences']}"
    return fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def print_table(rows: list[dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None)
    for key, header, _ in COLUMNS:
        t.add_column(header, justify="left" if key == "label" else "right")
    for r in rows:
        t.add_row(*(_cell(r, k, f) for k, _, f in COLUMNS))
    Console(width=160 if not sys.stdout.isatty() else None).print(t)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(doc, indent=1, default=str))


def write_markdown(path: str | os.PathLike, title: str, meta: dict, rows: list[dict], command: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    for k in ("model", "eval_windows", "calibration_windows", "machine", "date"):
        if k in meta:
            lines.append(f"- {k.replace('_', ' ')}: {meta[k]}")
    if "ppl_ref" in meta:
        lines.append(f"- float reference perplexity: {meta['ppl_ref']:.3f}")
    lines += ["", "bpw counts everything stored for the quantized layers (codes, scales, offsets, "
              "curvatures, padding); bpw (all) counts every tensor of the model, float ones included "
              "(a `qins-mixed` row quantizes every tensor, embeddings too, so both are equal). KL = mean KL(p_float || p_variant) per token; token match = "
              "greedy tokens equal to the float model's, position by position.", "",
              markdown_table(rows), ""]
    mixes = [r for r in rows if r.get("mix")]
    for r in mixes:
        share = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["mix"].items())
        lines.append(f"- {r['label']}: weights per candidate: {share}; estimated KL {r.get('estimated_kl', 0):.4f}")
    if mixes:
        lines.append("")
    _atomic_write(path, "\n".join(lines))


def _family(r: dict) -> str:
    """Line of the frontier plot a row belongs to: format, group, calibration method."""
    if r.get("whole_model"):
        return f"{r.get('format')} (whole model)"
    g = r.get("group_size")
    fam = f"{r.get('format', r['label'])} " + ("ch" if g is None else f"g{g}")
    if r.get("rounding") == "gptq" or r["label"].endswith("-gptq"):
        return fam + " gptq"
    return fam + (" +act" if r.get("calibrated") else "")


def plot_frontier(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """KL and perplexity against bpw, one line per format family; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, ylabel, fname, logy in (("kl", "KL(float || variant), nats/token", "kl_vs_bpw.png", True),
                                     ("ppl", "perplexity", "ppl_vs_bpw.png", True)):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        fams: dict[str, list[dict]] = {}
        for r in rows:
            if r.get(key) is None or r.get("bpw") is None:
                continue
            fams.setdefault(_family(r), []).append(r)
        colors = plt.get_cmap("tab20").colors
        markers = "osD^v<>pX*"
        for i, (fam, rs) in enumerate(sorted(fams.items())):
            rs = sorted(rs, key=lambda r: r["bpw"])
            ax.plot([r["bpw"] for r in rs], [max(r[key], 1e-6) for r in rs], marker=markers[i % len(markers)],
                    color=colors[i % len(colors)], ls="--" if fam.endswith(("+act", "gptq")) else "-", label=fam)
        if key == "ppl" and rows:
            ax.axhline(rows[0].get("ppl_ref", 0), color="k", ls="--", lw=0.8, label="float")
        ax.set_xlabel("bits per weight (all stored)")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
