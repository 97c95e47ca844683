"""Figures of the paper reproductions, saved small enough to keep in the repository."""

import io


def save_small(fig, path, dpi=72, colors=64):
    """Save a matplotlib figure as a PNG with an adaptive palette of ``colors`` colours."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=colors).save(path, optimize=True)
