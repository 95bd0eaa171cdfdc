"""Saving the analysis figures the same way everywhere: tight layout, 120 dpi, no software stamp (so a rebuilt PNG
is byte for byte the committed one), the figure closed."""

from __future__ import annotations

from pathlib import Path


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
