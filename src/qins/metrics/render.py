"""The one renderer: tables (rich on the terminal, Markdown in files) from rows and column
specs, JSON and Markdown reports written atomically, and plots against bpw."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._files import atomic_write

@dataclass(frozen=True)
class Column:
    """One column of a table: `key` of the row, its header, and how a value prints (a format
    string or a function of the whole row). A missing value prints as an en dash."""

    key: str
    header: str
    fmt: str | Callable[[dict], str] = "{}"
    left: bool = False

    def cell(self, row: dict) -> str:
        if callable(self.fmt):
            return self.fmt(row)
        v = row.get(self.key)
        return "–" if v is None else self.fmt.format(v)


def _pct(key: str, digits: int) -> Callable[[dict], str]:
    return lambda r: "–" if r.get(key) is None else f"{100 * r[key]:.{digits}f}"


def _identical(r: dict) -> str:
    v = r.get("identical")
    if v is None:
        return "–"
    return f"{v}/{r['sequences']}" if r.get("sequences") else str(v)


# the quality table of compare, eval, demo and the KV report
COLUMNS = (
    Column("label", "variant", left=True),
    Column("bpw", "bpw", "{:.3f}"),
    Column("bpw_all", "bpw (all)", "{:.3f}"),
    Column("ppl", "ppl", "{:.3f}"),
    Column("ppl_increase_pct", "Δppl %", "{:+.2f}"),
    Column("kl", "KL", "{:.5f}"),
    Column("top1", "top-1 %", _pct("top1", 2)),
    Column("match", "token match %", _pct("match", 1)),
    Column("identical", "identical", _identical),
    Column("first_divergence", "1st diverg.", "{:.1f}"),
)


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    """A Markdown table with one line per row."""
    head = "| " + " | ".join(c.header for c in columns) + " |"
    sep = "|" + "|".join(":--" if c.left else "--:" for c in columns) + "|"
    body = ["| " + " | ".join(c.cell(r) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def print_table(rows: list[dict], title: str = "", columns=COLUMNS) -> None:
    """The same table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or None)
    for c in columns:
        t.add_column(c.header, justify="left" if c.left else "right")
    for r in rows:
        t.add_row(*(c.cell(r) for c in columns))
    Console(width=200 if not sys.stdout.isatty() else None).print(t)


def write_json(path: str | os.PathLike, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1, default=str))


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
    atomic_write(path, "\n".join(lines))


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
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'qins[plots]'") from None
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
