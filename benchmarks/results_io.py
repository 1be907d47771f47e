"""Write a benchmark's results as JSON, a markdown table and (optionally) a PNG."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Sequence

import torch


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty or generic on many Linux hosts)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:  # virtual machines often show only "AMD EPYC"
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_results(out_dir: Path, name: str, payload: dict, table: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2))
    paths["md"].write_text(table + "\n")
    return paths


def plot_speedups(rows: Sequence[dict], path: Path, key: str, ylabel: str, title: str) -> None:
    """Grouped bars of ``row[key]`` (a speed ratio) per layer shape and implementation,
    one panel per batch size, with the 1.0 line: the layer benchmarks' PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    width = 0.8 / len(impls)
    for ax, batch in zip(axes[0], batches):
        for k, impl in enumerate(impls):
            vals = [
                next((r.get(key, 0) for r in rows if r["shape"] == s and r["batch"] == batch and r["impl"] == impl), 0)
                for s in shapes
            ]
            ax.bar([i + k * width for i in range(len(shapes))], vals, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(shapes))], [s.split()[0] for s in shapes], rotation=30, fontsize=8
        )
        ax.set_title(f"batch {batch}")
        ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(impls), 4), fontsize=8)  # below, off the bars
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 * -(-len(impls) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
