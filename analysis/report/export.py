"""Write plotly figures to disk: self-contained HTML (plotly.js embedded, works offline) and PNG.

PNG export uses kaleido, which drives a local Chrome/Chromium; on Debian install ``chromium``.
Every file is written to a temporary file in the target directory, then moved into place with
``os.replace``, so a reader never sees a half-written figure.
"""

from __future__ import annotations

from pathlib import Path

from analysis.errors import UserError
from analysis.io import write_atomic

NO_CHROME = ("PNG export needs Chrome/Chromium for kaleido, and none was found: install Debian's "
             "chromium (apt-get install chromium) or pass --no-png")


def figure_png(fig, width: int = 1000, height: int = 600, scale: float = 2) -> bytes:
    """PNG bytes of ``fig``; raises UserError when kaleido finds no Chrome."""
    try:
        return fig.to_image(format="png", width=width, height=height, scale=scale)
    except Exception as e:  # kaleido raises plain RuntimeError/ChromeNotFoundError here
        if "chrome" in str(e).lower() or "chrome" in type(e).__name__.lower():
            raise UserError(NO_CHROME) from None
        raise


def write_figure(fig, out_dir, stem: str, png: bool = True) -> list[Path]:
    """Write ``out_dir/stem.html`` (plotly.js embedded) and, unless ``png=False``, ``stem.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    written = [write_atomic(out_dir / f"{stem}.html", html.encode("utf-8"))]
    if png:
        layout = fig.layout
        data = figure_png(fig, width=layout.width or 1000, height=layout.height or 600)
        written.append(write_atomic(out_dir / f"{stem}.png", data))
    return written
