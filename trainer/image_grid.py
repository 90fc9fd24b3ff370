"""A labelled grid of equally sized pictures: column labels on top, row labels on the left (PIL only).

Not torchvision's ``make_grid``: it tiles tensors but draws no labels, and a comparison grid is read by
its labels (which LoRA, which strength, which prompt); the tiling itself is a few lines of numpy here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
MAX_LABEL_LINES = 3


@dataclass(frozen=True)
class GridGeometry:
    rows: int
    columns: int
    cell_width: int
    cell_height: int
    font_size: int
    gap: int
    left: int      # width of the row-label strip
    top: int       # height of the column-label strip

    @property
    def width(self) -> int:
        return self.left + self.columns * (self.cell_width + self.gap)

    @property
    def height(self) -> int:
        return self.top + self.rows * (self.cell_height + self.gap)

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a cell."""
        return self.left + column * (self.cell_width + self.gap), self.top + row * (self.cell_height + self.gap)


def grid_geometry(rows: int, columns: int, cell_width: int, cell_height: int) -> GridGeometry:
    """Labels scale with the pictures but stay readable on 64-pixel thumbnails."""
    font_size = max(11, min(28, cell_width // 12))
    line = font_size + 4
    gap = max(2, cell_width // 64)
    left = max(96, min(320, cell_width))
    top = MAX_LABEL_LINES * line + 6
    return GridGeometry(rows, columns, cell_width, cell_height, font_size, gap, left, top)


def compose_grid(cells: list[list[np.ndarray]], column_labels: list[str], row_labels: list[str]) -> np.ndarray:
    """``cells[row][column]`` are (H, W, 3) uint8 pictures of one size; returns the grid as uint8.

    Each picture is pasted unscaled at ``grid_geometry(...).cell_origin(row, column)``.
    """
    rows, columns = len(cells), len(cells[0]) if cells else 0
    if rows == 0 or columns == 0:
        raise ValueError("a grid needs at least one picture")
    if len(column_labels) != columns or len(row_labels) != rows:
        raise ValueError(f"{rows}x{columns} cells but {len(row_labels)} row and {len(column_labels)} column labels")
    height, width = cells[0][0].shape[:2]
    for row in cells:
        if len(row) != columns or any(cell.shape != (height, width, 3) or cell.dtype != np.uint8 for cell in row):
            raise ValueError(f"every cell must be a {height}x{width}x3 uint8 picture")
    geometry = grid_geometry(rows, columns, width, height)
    canvas = Image.new("RGB", (geometry.width, geometry.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(geometry.font_size)
    for column, label in enumerate(column_labels):
        x, _ = geometry.cell_origin(0, column)
        _text_block(draw, label, font, x + 2, 3, width - 4, MAX_LABEL_LINES, geometry.font_size + 4)
    lines_per_row = max(1, min(8, height // (geometry.font_size + 4)))
    for row, label in enumerate(row_labels):
        _, y = geometry.cell_origin(row, 0)
        _text_block(draw, label, font, 4, y + 2, geometry.left - 8, lines_per_row, geometry.font_size + 4)
    for row in range(rows):
        for column in range(columns):
            canvas.paste(Image.fromarray(cells[row][column]), geometry.cell_origin(row, column))
    return np.asarray(canvas, dtype=np.uint8).copy()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _text_block(draw, text: str, font, x: int, y: int, max_width: int, max_lines: int, line_height: int) -> None:
    for number, line in enumerate(wrap(draw, text, font, max_width, max_lines)):
        draw.text((x, y + number * line_height), line, fill=INK, font=font)


def wrap(draw, text: str, font, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap; over-long words are cut; the last line ends in '…' when text is left over."""
    def fits(candidate: str) -> bool:
        return draw.textlength(candidate, font=font) <= max_width

    words = " ".join(str(text).split()).split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while not fits(current) and len(current) > 1:
            cut = len(current) - 1
            while cut > 1 and not fits(current[:cut]):
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines[-1] = last + "…"
    return lines
