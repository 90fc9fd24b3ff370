"""A labelled grid of equally sized pictures: column labels on top, row labels on the left (PIL only).

Not torchvision's ``make_grid``: it tiles tensors but draws no labels, and a comparison grid is read by
its labels (which LoRA, which strength, which prompt); the tiling itself is a few lines of numpy here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .fonts import label_font, wrap

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
    font = label_font(geometry.font_size)
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


def _text_block(draw, text: str, font, x: int, y: int, max_width: int, max_lines: int, line_height: int) -> None:
    for number, line in enumerate(wrap(draw, text, font, max_width, max_lines)):
        draw.text((x, y + number * line_height), line, fill=INK, font=font)
