"""Evaluation figures, returned as PIL images so callers log them with `mlflow.log_image` (or `image.save`).

Charts (confusion matrix, per-language bars, token alignment maps) are matplotlib figures drawn on the Agg
canvas directly, without pyplot: no global backend switch and no figure registry to leak. Retrieval grids are
drawn with PIL, like components/tracking/plots.py. Text is drawn with GNU Unifont where it is installed
(matplotlib falls back to it per glyph), because captions, class names and tokens may be in any script.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from components.eval.typographic import FontList, draw_text, text_width, unifont, wrap_text

CORRECT = (0, 150, 0)
WRONG = (200, 0, 0)
MUTED = (90, 90, 90)
FONT_SIZE = 16  # Unifont's native size
LINE_HEIGHT = FONT_SIZE + 2
THUMBNAIL = 96
ELLIPSIS = "…"


# -- shared helpers -------------------------------------------------------------------------------------------
@functools.cache
def _fonts() -> FontList:
    """Unifont for grid text; PIL's default font where Unifont is missing (plots must not fail over a font)."""
    try:
        return unifont(FONT_SIZE)
    except FileNotFoundError:
        return [(ImageFont.load_default(size=FONT_SIZE - 4), None)]


@functools.cache
def _matplotlib_families() -> tuple[str, ...]:
    """font.family for charts: DejaVu Sans, then Unifont (+ Upper) for glyphs DejaVu lacks (CJK, emoji)."""
    from matplotlib import font_manager

    families = ["DejaVu Sans"]
    try:
        from components.models.unifont import unifont_paths

        paths = [path for path in unifont_paths() if path]
    except FileNotFoundError:
        paths = []
    for path in paths:
        font_manager.fontManager.addfont(path)
        families.append(font_manager.FontProperties(fname=path).get_name())
    return tuple(families)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _chart_style():
    """rc settings for chart text; rc is read when artists are created, so wrap both drawing and saving."""
    import matplotlib

    return matplotlib.rc_context({"font.family": list(_matplotlib_families())})


def _to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def _thumbnail(image_bytes: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(image_bytes)) as image:
        thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    return thumb


def _fit(text: str, fonts: FontList, max_width: float) -> str:
    """`text` on one line, cut with an ellipsis where it is wider than max_width."""
    text = " ".join(text.split())
    if text_width(text, fonts) <= max_width:
        return text
    while text and text_width(text + ELLIPSIS, fonts) > max_width:
        text = text[:-1]
    return text + ELLIPSIS


def _check_rows(queries: Sequence, results: Sequence) -> None:
    if not queries:
        raise ValueError("no queries to draw")
    if len(queries) != len(results):
        raise ValueError(f"{len(queries)} queries but {len(results)} result lists")


# -- confusion matrix -----------------------------------------------------------------------------------------
def confusion_matrix_plot(matrix: np.ndarray, class_names: list[str], max_classes: int = 40) -> Image.Image:
    """Heat map of a [C, C] confusion matrix (rows: true class, columns: predicted), each row divided by its
    count, so a cell is the fraction of that class predicted as the column's class.

    With more than max_classes classes, only the max_classes most frequent true classes are drawn (rows and
    columns), still normalised by their full row counts, and the title says so.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {matrix.shape}")
    n_classes = matrix.shape[0]
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for a {n_classes}-class matrix")
    counts = matrix.sum(axis=1).astype(np.float64)
    normalised = matrix / np.maximum(counts, 1)[:, None]  # a class with no samples: an empty row, not NaN
    title = "confusion matrix (row-normalised)"
    shown = np.arange(n_classes)
    if n_classes > max_classes:
        shown = np.sort(np.argsort(-counts, kind="stable")[:max_classes])
        normalised = normalised[np.ix_(shown, shown)]
        title += f"\n{max_classes} most frequent of {n_classes} true classes"
    names = [_short(class_names[i]) for i in shown]
    n = len(shown)
    side = max(4.0, 0.28 * n + 2.0)
    with _chart_style():
        figure = _new_figure(side + 1.0, side)
        axis = figure.add_subplot()
        cells = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(cells, ax=axis, fraction=0.046, pad=0.04)
        axis.set_xticks(range(n), names, rotation=90, fontsize=7)
        axis.set_yticks(range(n), names, fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(title)
        if n <= 15:  # numbers stay legible only in small matrices
            for row in range(n):
                for column in range(n):
                    value = normalised[row, column]
                    if value > 0:
                        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                  color="white" if value > 0.5 else "black")
        return _to_image(figure)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[:limit - 1] + ELLIPSIS


# -- retrieval examples ---------------------------------------------------------------------------------------
def retrieval_grid(queries: list[tuple[bytes, str]], results: list[list[tuple[str, bool]]],
                   text_width_px: int = 420) -> Image.Image:
    """Image -> text retrieval examples: one row per query image (thumbnail, its own caption in grey), then
    its top results in rank order, green when the text belongs to the image, red when it does not."""
    _check_rows(queries, results)
    fonts = _fonts()
    pad = 6
    heights = [max(THUMBNAIL, (1 + len(row)) * LINE_HEIGHT) + 2 * pad for row in results]
    grid = Image.new("RGB", (THUMBNAIL + text_width_px + 3 * pad, sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for (image_bytes, caption), row, height in zip(queries, results, heights):
        thumb = _thumbnail(image_bytes, THUMBNAIL)
        grid.paste(thumb, (pad + (THUMBNAIL - thumb.width) // 2, top + pad))
        x, y = THUMBNAIL + 2 * pad, top + pad
        draw_text(draw, (x, y), _fit(f"query: {caption}", fonts, text_width_px), fonts, fill=MUTED)
        for rank, (text, correct) in enumerate(row, start=1):
            y += LINE_HEIGHT
            line = _fit(f"{rank}. {text}", fonts, text_width_px)
            draw_text(draw, (x, y), line, fonts, fill=CORRECT if correct else WRONG)
        top += height
        draw.line((0, top - 1, grid.width, top - 1), fill=(220, 220, 220))
    return grid


def text_query_grid(queries: list[str], results: list[list[tuple[bytes, bool]]],
                    caption_width_px: int = 240) -> Image.Image:
    """Text -> image retrieval examples: one row per caption, then its top images in rank order, each framed
    green when it belongs to the caption, red when it does not."""
    _check_rows(queries, results)
    fonts = _fonts()
    pad, border = 6, 4
    cell = THUMBNAIL + 2 * border
    max_lines = max(1, cell // LINE_HEIGHT)
    n_columns = max(len(row) for row in results)
    grid = Image.new("RGB", (caption_width_px + 2 * pad + n_columns * (cell + pad), len(queries) * (cell + 2 * pad)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for index, (caption, row) in enumerate(zip(queries, results)):
        top = index * (cell + 2 * pad) + pad
        lines = wrap_text(caption, fonts, caption_width_px)
        if len(lines) > max_lines:
            lines = lines[:max_lines - 1] + [_fit(" ".join(lines[max_lines - 1:]), fonts, caption_width_px)]
        for line_index, line in enumerate(lines):
            draw_text(draw, (pad, top + line_index * LINE_HEIGHT), line, fonts, fill="black")
        for column, (image_bytes, correct) in enumerate(row):
            left = caption_width_px + 2 * pad + column * (cell + pad)
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=CORRECT if correct else WRONG)
            thumb = _thumbnail(image_bytes, THUMBNAIL)
            grid.paste(thumb, (left + border + (THUMBNAIL - thumb.width) // 2,
                               top + border + (THUMBNAIL - thumb.height) // 2))
    return grid


# -- per-language metric --------------------------------------------------------------------------------------
def language_bar_chart(values: dict[str, float], metric_name: str) -> Image.Image:
    """One bar per language, highest first, each labelled with its value."""
    return model_language_chart({"": values}, metric_name)


def model_language_chart(series: dict[str, dict[str, float]], metric_name: str) -> Image.Image:
    """Grouped bars: per language (ordered by the first model, highest first) one bar per model, labelled with
    its value when there is one model, with a legend when there are several."""
    if not series or not any(series.values()):
        raise ValueError("no languages to plot")
    first = next(iter(series.values()))
    languages = [language for language, _ in sorted(first.items(), key=lambda item: (-item[1], item[0]))]
    languages += sorted({lang for values in series.values() for lang in values} - set(languages))
    width = 0.8 / len(series)
    with _chart_style():
        figure = _new_figure(max(4.0, 0.45 * len(languages) * max(1, len(series) * 0.6) + 1.5), 3.5)
        axis = figure.add_subplot()
        for index, (model, values) in enumerate(series.items()):
            numbers = [float(values.get(lang, 0.0)) for lang in languages]
            offsets = [i + (index - (len(series) - 1) / 2) * width for i in range(len(languages))]
            bars = axis.bar(offsets, numbers, width=width, label=model or None)
            if len(series) == 1:
                axis.bar_label(bars, labels=[f"{value:.3g}" for value in numbers], fontsize=7, padding=2)
        axis.set_xticks(range(len(languages)), languages, rotation=90 if len(languages) > 12 else 0)
        axis.set_ylabel(metric_name)
        axis.set_title(f"{metric_name} per language")
        axis.margins(y=0.12)  # room for the value labels above the tallest bar
        axis.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=8)
        return _to_image(figure)


def score_histogram(scores: np.ndarray, threshold: float, wrong: np.ndarray | None = None) -> Image.Image:
    """Pair scores with the filter's threshold; split into known-wrong and other pairs when the truth is known."""
    with _chart_style():
        figure = _new_figure(6.0, 3.5)
        axis = figure.add_subplot()
        bins = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, 40) if len(scores) else 10
        if wrong is None:
            axis.hist(scores, bins=bins, color="tab:blue", label="pairs")
        else:
            axis.hist([scores[~wrong], scores[wrong]], bins=bins, stacked=True, color=["tab:blue", "tab:red"],
                      label=["matched captions", "known-wrong captions"])
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
        axis.set_xlabel("image-text cosine similarity")
        axis.set_ylabel("pairs")
        axis.legend(fontsize=8)
        return _to_image(figure)


# -- token / patch alignment ----------------------------------------------------------------------------------
def alignment_map_figure(image: bytes, tokens: list[str], maps: np.ndarray, columns: int = 6) -> Image.Image:
    """The image, then one panel per token (titled with the token) with its patch-alignment map
    ([n_tokens, grid_h, grid_w], e.g. from components.eval.alignment.alignment_maps) upsampled bilinearly to
    the image size and overlaid on it."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] != len(tokens):
        raise ValueError(f"need one [grid_h, grid_w] map per token: {len(tokens)} tokens, maps {maps.shape}")
    with Image.open(io.BytesIO(image)) as opened:
        picture = opened.convert("RGB")
    panels = 1 + len(tokens)
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    with _chart_style():
        figure = _new_figure(2.2 * columns, 2.4 * rows)
        for panel in range(panels):
            axis = figure.add_subplot(rows, columns, panel + 1)
            axis.imshow(picture)
            axis.set_axis_off()
            if panel == 0:
                axis.set_title("image", fontsize=9)
                continue
            heat = Image.fromarray(maps[panel - 1], mode="F").resize(picture.size, Image.Resampling.BILINEAR)
            axis.imshow(np.asarray(heat), cmap="jet", alpha=0.5)
            axis.set_title(_short(tokens[panel - 1] or " ", 16), fontsize=9)
        return _to_image(figure)
