"""Pictures: a genotype's cells as graphs, and how mixing weights evolved over a search."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_das import io_utils
from keras_das.space.genotype import Genotype


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _node_positions(steps: int) -> dict:
    positions = {0: (0.0, 0.75), 1: (0.0, 0.25)}
    for node in range(steps):
        positions[2 + node] = (1.0 + node, 0.5 + (0.3 if node % 2 else -0.3) * (node > 0))
    positions["out"] = (steps + 1.0, 0.5)
    return positions


def _draw_cell(ax, gene, concat, inputs_per_node: int, title: str) -> None:
    steps = len(gene) // inputs_per_node
    pos = _node_positions(steps)
    labels = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"}
    for node in range(steps):
        labels[2 + node] = str(node)
    for position, (op, index) in enumerate(gene):
        target = 2 + position // inputs_per_node
        (x0, y0), (x1, y1) = pos[index], pos[target]
        color = "tab:blue" if "conv" in op else "tab:red"
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(arrowstyle="->", color=color, shrinkA=14, shrinkB=14),
        )
        # Labels sit at different points along their edges so that crossing edges stay legible.
        t = 0.35 + 0.3 * (position % inputs_per_node) / max(1, inputs_per_node - 1)
        ax.text(
            x0 + t * (x1 - x0),
            y0 + t * (y1 - y0),
            op,
            fontsize=7,
            ha="center",
            va="center",
            color=color,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"),
        )
    for index in concat:
        (x0, y0), (x1, y1) = pos[index], pos["out"]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(arrowstyle="->", color="0.75", shrinkA=14, shrinkB=14),
        )
    for key, (x, y) in pos.items():
        color = "lightgreen" if key in (0, 1) else "lightyellow" if key == "out" else "lightblue"
        ax.text(
            x,
            y,
            labels[key],
            ha="center",
            va="center",
            fontsize=8,
            bbox=dict(boxstyle="round", facecolor=color, edgecolor="0.3"),
        )
    ax.set_title(title)
    ax.set_xlim(-0.5, steps + 1.5)
    ax.set_ylim(-0.05, 1.05)
    ax.axis("off")


def plot_genotype(genotype: Genotype, path: str, title: str | None = None) -> None:
    """Draws the normal and reduction cells of ``genotype`` to a PNG at ``path`` (atomically).

    Edges are labelled with their op: convolutions in blue, parameter-free ops in red.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(2.2 * (genotype.steps + 2), 7))
    _draw_cell(
        axes[0], genotype.normal, genotype.normal_concat, genotype.inputs_per_node, "normal cell"
    )
    _draw_cell(
        axes[1], genotype.reduce, genotype.reduce_concat, genotype.inputs_per_node, "reduction cell"
    )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_weight_history(
    history: Sequence[np.ndarray],
    op_names: Sequence[str],
    path: str,
    edge_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """One small plot per edge of how each op's mixing weight moved over epochs.

    Args:
        history: mixing weights per epoch, each ``[num_edges, num_ops]``.
        op_names: names of the ops (the legend).
        path: the PNG to write (atomically).
        edge_labels: a title per edge.
    """
    plt = _pyplot()
    weights = np.stack([np.asarray(w) for w in history])  # [epochs, edges, ops]
    epochs, edges, _ = weights.shape
    cols = min(edges, 5)
    rows = -(-edges // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False, sharex=True, sharey=True
    )
    x = np.arange(epochs)
    for e in range(rows * cols):
        ax = axes[e // cols][e % cols]
        if e >= edges:
            ax.axis("off")
            continue
        for o, name in enumerate(op_names):
            ax.plot(x, weights[:, e, o], label=name, linewidth=1.2)
        ax.set_title(edge_labels[e] if edge_labels else f"edge {e}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
