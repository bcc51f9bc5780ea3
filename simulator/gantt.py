"""Gantt charts of a step: one row per resource, ops coloured by kind, GPU memory over time underneath."""

from __future__ import annotations

from pathlib import Path

RESOURCE_ROWS = ("gpu", "opt", "h2d", "d2h", "cpu", "disk")  # drawn where a timeline has ops on them
COLOURS = {
    "load": "#4e79a7",
    "fwd": "#59a14f",
    "bwd": "#e15759",
    "head": "#b07aa1",
    "save": "#f28e2b",
    "fetch": "#edc948",
    "allreduce": "#ff9da7",
    "grad_out": "#76b7b2",
    "update": "#9c755f",
    "embed": "#bab0ac",
    "embed_bwd": "#bab0ac",
    "norm": "#000000",
    "state_in": "#1f3b73",
    "state_update": "#5c3d2e",
    "state_out": "#3b7f7a",
    "disk_read": "#8cd17d",
    "disk_write": "#499894",
    "act_read": "#d4a6c8",
    "act_write": "#9d7660",
}


def draw(
    timelines: list[tuple[str, list[dict], list[tuple[float, int]] | None]],
    path: str | Path,
    window: tuple[float, float] | None = None,
) -> None:
    """timelines: (title, spans as dicts with resource/kind/start/end, GPU memory [(t, bytes)] or None).
    Each gets a Gantt panel and, when it has memory, a memory panel; all share one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = sum(2 if mem else 1 for _, _, mem in timelines)
    fig, grid = plt.subplots(panels, 1, figsize=(14, 2.2 * panels), sharex=True, squeeze=False)
    axes = iter(grid[:, 0])
    for title, spans, memory in timelines:
        ax = next(axes)
        rows = [r for r in RESOURCE_ROWS if any(s["resource"] == r for s in spans)]
        for row, res in enumerate(rows):
            bars = [(s["start"], s["end"] - s["start"]) for s in spans if s["resource"] == res]
            colours = [COLOURS.get(s["kind"], "grey") for s in spans if s["resource"] == res]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=colours, linewidth=0)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        if memory:
            mx = next(axes)
            mx.step([t for t, _ in memory], [b / 2**30 for _, b in memory], where="post", color="black")
            mx.set_ylabel("GPU GiB")
    last = ax if not timelines[-1][2] else mx
    if window:
        last.set_xlim(*window)
    last.set_xlabel("seconds")
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in COLOURS.items() if k != "embed_bwd"],
        ncol=10,
        fontsize=7,
        loc="lower center",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
