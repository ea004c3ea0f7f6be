// The loss chart inside the Train LoRA node: the run's memory plan before its first step, then raw and smoothed
// loss per step, the validation loss where it was evaluated, the step, learning rate, times and the planned memory. Plain canvas 2D drawing; the chart knows nothing of ComfyUI.
// The smoothed loss is lora_core's (training/plots.py `smooth`), as the server sends it: the chart draws no other.

const LINE_HEIGHT = 16;
const TEXT_LINES = 2;
const PLOT_HEIGHT = 150;
const PADDING = 8;
const AXIS_WIDTH = 48;
const STEP_LABEL_HEIGHT = 12;

export const CHART_HEIGHT = PADDING * 3 + TEXT_LINES * LINE_HEIGHT + PLOT_HEIGHT + STEP_LABEL_HEIGHT;

const COLORS = {
  background: "#1c1c1c",
  border: "#444",
  text: "#ddd",
  dim: "#999",
  grid: "#333",
  raw: "rgba(140, 170, 220, 0.6)",
  smoothed: "#ffa64d",
  best: "#7ee07e",
  validation: "#ff5fd2",
};

/** 75 → "1:15", 3725 → "1:02:05". */
function formatDuration(seconds) {
  const whole = Math.max(0, Math.round(seconds));
  const [hours, minutes, secs] = [Math.floor(whole / 3600), Math.floor(whole / 60) % 60, whole % 60];
  const pad = (value) => String(value).padStart(2, "0");
  return hours ? `${hours}:${pad(minutes)}:${pad(secs)}` : `${minutes}:${pad(secs)}`;
}

export class LossChart {
  constructor() {
    this.draws = 0;
    this.area = null; // where the last draw put the chart, in the node's coordinates
    this.plan = null; // the run's memory plan (`lora_lab.train.plan`), kept through its steps
    this.reset();
  }

  /** A run's memory plan, sent before its first step: it starts the run, and the chart shows it until steps come. */
  setPlan(text) {
    this.reset();
    this.plan = text;
  }

  /** "≈ 7.2 GiB" of the plan's text, or null. */
  get plannedTotal() {
    return this.plan?.match(/≈ [\d.]+ [MG]iB/)?.[0] ?? null;
  }

  /**
   * Forgets the previous run. `received` keeps the losses that arrived as step events, in arrival order;
   * `validation` holds [step, loss] pairs.
   */
  reset() {
    [this.steps, this.losses, this.smoothed, this.received, this.validation] = [[], [], [], [], []];
    Object.assign(this, { total: 0, lr: null, elapsed: 0, summary: null, halted: null, variant: null });
  }

  get lastStep() {
    return this.steps.at(-1) ?? 0;
  }

  /**
   * One `lora_lab.train.step` event; a step that does not follow the last one starts a new run.
   * `validation_loss` is a number on the steps where the validation loss was evaluated, else null or absent.
   */
  addStep({ step, total, loss, smoothed, lr, elapsed, validation_loss, variant }) {
    if (this.summary || step <= this.lastStep || (variant ?? null) !== this.variant) this.reset();
    this.variant = variant ?? null; // a sweep's "variant 2/3: learning_rate 0.0003"
    this.steps.push(step);
    this.losses.push(loss);
    this.smoothed.push(smoothed);
    this.received.push(loss);
    if (Number.isFinite(validation_loss)) this.validation.push([step, validation_loss]);
    Object.assign(this, { total, lr, elapsed });
  }

  /**
   * The run's summary (`lora_lab.train.done` or the node's `lora_lab_training` output). Long runs send the loss
   * at most at 500 steps (`loss_steps`, with `smoothed`); the chart keeps every step it received live and takes
   * the summary's points where steps were missed (a reload, a late tab).
   */
  finish(summary) {
    const { losses } = summary;
    const steps = summary.loss_steps ?? losses.map((_, index) => index + 1);
    // a sweep's summary is its best variant's, which need not be the variant whose steps came last
    const receivedAll = !summary.sweep && this.steps.length === summary.steps && this.lastStep === summary.steps;
    if (!receivedAll) {
      this.steps = [...steps];
      this.losses = [...losses];
      this.smoothed = [...summary.smoothed];
    }
    if (summary.validation) this.validation = summary.validation.map(([step, loss]) => [step, loss]);
    this.total = summary.sweep ? summary.total : Math.max(this.total, summary.steps);
    this.elapsed = summary.seconds;
    this.summary = summary;
    this.plan = summary.memory_plan || this.plan;
  }

  /** The run ended without a summary: `reason` is "error" or "interrupted". */
  halt(reason) {
    if (!this.summary) this.halted = reason;
  }

  statusLines() {
    const last = this.losses.length - 1;
    const planned = this.plannedTotal ? `   memory ${this.plannedTotal} planned` : "";
    if (!this.losses.length) {  // before the first step: the plan, its total first, then what makes it up
      const [, breakdown = ""] = this.plan.match(/\((.*)\)$/) ?? [];
      const when = this.halted ? `; ${this.halted} before the first step` : ", before the first step";
      return [`memory plan: ${this.plannedTotal ?? "?"} on the training device${when}`, breakdown];
    }
    if (this.summary) {
      const { steps, best_step, best_loss, stop_reason, seconds, sweep } = this.summary;
      const best = sweep?.find((variant) => variant.best);
      return [
        `${steps} / ${this.total} steps, ${stop_reason.replace("_", " ")} in ${formatDuration(seconds)}${planned}`,
        best ? `best of ${sweep.length} variants: ${best.variant}, validation ${best.validation_loss.toPrecision(4)}`
          : `best smoothed loss ${best_loss.toPrecision(4)} at step ${best_step}`,
      ];
    }
    const remaining = (this.elapsed / this.lastStep) * (this.total - this.lastStep);
    return [
      `step ${this.lastStep} / ${this.total}   loss ${this.losses[last].toPrecision(4)}   ` +
        `smoothed ${this.smoothed[last].toPrecision(4)}`,
      this.halted
        ? `${this.halted} after ${formatDuration(this.elapsed)}`
        : `${this.variant ? `${this.variant}   ` : ""}lr ${this.lr.toExponential(2)}   elapsed `
          + `${formatDuration(this.elapsed)}   ETA ${formatDuration(remaining)}`,
    ];
  }

  /** Draws the chart into the rectangle (x, y, width, CHART_HEIGHT) of `ctx`. */
  draw(ctx, x, y, width) {
    if (!this.losses.length && !this.plan) return;
    ctx.save();
    ctx.fillStyle = COLORS.background;
    ctx.strokeStyle = COLORS.border;
    ctx.beginPath();
    ctx.rect(x, y, width, CHART_HEIGHT);
    ctx.fill();
    ctx.stroke();
    ctx.clip();

    ctx.font = "12px sans-serif";
    ctx.textBaseline = "top";
    ctx.fillStyle = COLORS.text;
    this.statusLines().forEach((line, index) => ctx.fillText(line, x + PADDING, y + PADDING + index * LINE_HEIGHT));

    const plot = {
      left: x + AXIS_WIDTH,
      top: y + PADDING * 2 + TEXT_LINES * LINE_HEIGHT,
      width: width - AXIS_WIDTH - PADDING,
      height: PLOT_HEIGHT,
    };
    if (this.losses.length) this.drawPlot(ctx, plot);
    ctx.restore();
    this.draws += 1;
    this.area = { x, y, width, height: CHART_HEIGHT };
  }

  drawPlot(ctx, plot) {
    const values = this.losses.concat(this.smoothed, this.validation.map(([, loss]) => loss));
    const [lowest, highest] = [values.reduce((a, b) => Math.min(a, b)), values.reduce((a, b) => Math.max(a, b))];
    const margin = (highest - lowest || Math.abs(highest) || 1) * 0.05; // keeps the lines off the frame
    const [low, high] = [lowest - margin, highest + margin];
    const span = high - low;
    const stepCount = Math.max(this.total, this.lastStep, 2);
    const toX = (step) => plot.left + ((step - 1) / (stepCount - 1)) * plot.width;
    const toY = (loss) => plot.top + plot.height - ((loss - low) / span) * plot.height;

    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.strokeRect(plot.left, plot.top, plot.width, plot.height);
    ctx.fillStyle = COLORS.dim;
    ctx.font = "10px sans-serif";
    ctx.textAlign = "right";
    ctx.fillText(high.toPrecision(3), plot.left - 4, plot.top);
    ctx.textBaseline = "bottom";
    ctx.fillText(low.toPrecision(3), plot.left - 4, plot.top + plot.height);
    ctx.textBaseline = "top";
    ctx.fillText(`step ${stepCount}`, plot.left + plot.width, plot.top + plot.height + 2);
    ctx.textAlign = "left";
    ctx.fillText("1", plot.left, plot.top + plot.height + 2);

    this.drawLine(ctx, this.losses, toX, toY, COLORS.raw, 1);
    this.drawLine(ctx, this.smoothed, toX, toY, COLORS.smoothed, 2);
    this.drawValidation(ctx, toX, toY);
    // The best step once the run is done, else the step just taken.
    const marked = this.summary ? this.steps.indexOf(this.summary.best_step) : this.steps.length - 1;
    if (marked >= 0) {
      ctx.fillStyle = this.summary ? COLORS.best : COLORS.smoothed;
      ctx.beginPath();
      ctx.arc(toX(this.steps[marked]), toY(this.smoothed[marked]), 3.5, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  /** The validation loss: a line through its points, each marked with a square. */
  drawValidation(ctx, toX, toY) {
    if (!this.validation.length) return;
    ctx.strokeStyle = ctx.fillStyle = COLORS.validation;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    this.validation.forEach(([step, loss], index) => (index ? ctx.lineTo : ctx.moveTo).call(ctx, toX(step), toY(loss)));
    ctx.stroke();
    for (const [step, loss] of this.validation) ctx.fillRect(toX(step) - 3, toY(loss) - 3, 6, 6);
  }

  /** A polyline through (step, value) with at most one vertex per pixel column, so long runs stay cheap to draw. */
  drawLine(ctx, values, toX, toY, color, lineWidth) {
    ctx.strokeStyle = color;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    let lastColumn = null;
    values.forEach((value, index) => {
      const px = toX(this.steps[index]);
      const column = Math.round(px);
      if (column === lastColumn && index < values.length - 1) return;
      if (lastColumn === null) ctx.moveTo(px, toY(value));
      else ctx.lineTo(px, toY(value));
      lastColumn = column;
    });
    ctx.stroke();
  }
}
