"""Pictures of a run: the loss curve and a labelled grid of images, drawn with Pillow (no plotting library)."""
from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 28, 36


def smoothing_step(average: float, value: float, factor: float, count: int) -> tuple[float, float]:
    """One step of `smooth`: the running average with `value`, the `count`-th value, added, and its bias-corrected
    value."""
    average = factor * average + (1 - factor) * value
    return average, average / (1 - factor**count)


def smooth(values: Sequence[float], factor: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as training dashboards draw it: the smoothed loss training
    reports step by step, the loss curve draws and the node's chart is sent."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average, corrected = smoothing_step(average, value, factor, count)
        smoothed.append(corrected)
    return smoothed


VALIDATION_COLOR = (220, 90, 20)


def loss_curve(losses: Sequence[float], validation: Sequence[tuple[int, float]] = (), width: int = 640,
               height: int = 360, title: str = "training loss") -> Image.Image:
    """Raw training loss (light) and its smoothed line (dark) against the step, the validation loss (orange line
    with a dot per evaluation; step 0 is the untrained network) when there is one, with labelled axes."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT, height - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    heading = f"{title} ({len(losses)} steps)" + (", validation loss (orange)" if validation else "")
    draw.text((left, 8), heading, fill="black", font=font)
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill="gray", font=font)
        return image
    values = [*losses, *(loss for _, loss in validation)]
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def point(index: int, value: float) -> tuple[float, float]:
        """Index 0 is step 1; index -1 is step 0 (a validation loss before training)."""
        x = left + (right - left) * ((index + 1) / max(1, len(losses)))
        return x, bottom - (bottom - top) * (value - low) / span

    for fraction in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{low + span * fraction:.4g}", fill="black", font=font)
    draw.text((left, bottom + 8), "0", fill="black", font=font)
    draw.text((right - 24, bottom + 8), str(len(losses)), fill="black", font=font)
    draw.text(((left + right) // 2 - 12, bottom + 8), "step", fill="black", font=font)
    if len(losses) == 1:
        x, y = point(0, losses[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(30, 90, 200))
        draw_validation(draw, [point(step - 1, loss) for step, loss in validation])
        return image
    draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 200, 240), width=1)
    draw.line([point(i, v) for i, v in enumerate(smooth(losses))], fill=(30, 90, 200), width=2)
    draw_validation(draw, [point(step - 1, loss) for step, loss in validation])
    return image


def draw_validation(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]]) -> None:
    if len(points) > 1:
        draw.line(points, fill=VALIDATION_COLOR, width=2)
    for x, y in points:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=VALIDATION_COLOR)


def image_grid(images: Sequence[Image.Image], labels: Sequence[str], label_height: int = 16) -> Image.Image:
    """Images side by side, each with its label underneath."""
    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height + label_height), "white")
    draw = ImageDraw.Draw(grid)
    for column, (image, label) in enumerate(zip(images, labels)):
        grid.paste(image.convert("RGB").resize((width, height)), (column * width, 0))
        draw.text((column * width + 2, height + 2), label, fill="black", font=ImageFont.load_default())
    return grid


SERIES_COLORS = ((30, 90, 200), (220, 90, 20), (40, 150, 60), (180, 40, 160), (200, 30, 40), (20, 160, 170),
                 (120, 90, 40), (110, 110, 110))


def sweep_chart(series: Sequence[tuple[str, Sequence[tuple[int, float]]]], best: int, width: int = 640,
                height: int = 360) -> Image.Image:
    """Each variant's validation loss against the step (step 0: the untrained network), one colour each, with a
    legend of their labels; the `best`-th's line is drawn thicker and its label says so."""
    legend_height = 14 * len(series) + 4
    image = Image.new("RGB", (width, height + legend_height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, width - MARGIN_RIGHT, height - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    draw.text((left, 8), f"validation loss of {len(series)} variants", fill="black", font=font)
    points = [point for _, validation in series for point in validation]
    if not points:
        draw.text((left + 8, top + 8), "no validation loss yet", fill="gray", font=font)
        return image
    low, high = min(loss for _, loss in points), max(loss for _, loss in points)
    span, last = (high - low) or 1.0, max(step for step, _ in points) or 1
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{low + span * fraction:.4g}", fill="black", font=font)
    draw.text((left, bottom + 8), "0", fill="black", font=font)
    draw.text((right - 24, bottom + 8), str(last), fill="black", font=font)
    draw.text(((left + right) // 2 - 12, bottom + 8), "step", fill="black", font=font)
    for index, (label, validation) in enumerate(series):
        color = SERIES_COLORS[index % len(SERIES_COLORS)]
        line = [(left + (right - left) * step / last, bottom - (bottom - top) * (loss - low) / span)
                for step, loss in validation]
        if len(line) > 1:
            draw.line(line, fill=color, width=3 if index == best else 1)
        for x, y in line:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        y = height + 14 * index
        draw.rectangle((left, y + 3, left + 10, y + 11), fill=color)
        draw.text((left + 16, y), label + ("  (best)" if index == best else ""), fill="black", font=font)
    return image
