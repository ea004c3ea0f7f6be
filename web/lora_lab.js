// LoRA Lab's front-end extension: a panel drawn with canvas at the bottom of the pack's nodes, after they run.
// - Train LoRA: the memory plan before the first step (`lora_lab.train.plan`), then a live loss chart, fed by the
//   `lora_lab.train.step` / `lora_lab.train.done` events the node sends;
// - Save LoRA: the saved file's name, size, the graph stored in it and its check; Check LoRA: its verdict and
//   blocks; Load Dataset: the image and caption counts.
// A LoRA file dropped on the canvas needs nothing here: Save LoRA stores the graph under the metadata keys that the
// front ends' own drop handler reads from a .safetensors file (`workflow`, else `prompt`).
// After a page reload, the tab's last run is read back from /history, since ComfyUI does not restore node outputs:
// into the first graph the page shows, which the legacy front end loads before `setup` and the current ones after.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { CHART_HEIGHT, LossChart } from "./loss_chart.js";

// Train LoRA, and its layout from before Training Options (LoraLab_TrainLoRA) that old workflows hold.
const TRAIN_NODES = new Set(["LoraLab_Train", "LoraLab_TrainLoRA"]);
const PANEL_WIDGET = "lora_lab_panel";
const MARGIN = 8;
const NOTE_LINE_HEIGHT = 16;
const MIN_CHART_WIDTH = 340;
const HISTORY_ITEMS = 32;
const WRAP_COLUMNS = 56;

/** The lines a Save LoRA, Check LoRA or Load Dataset node shows for its `ui` output, by node type. */
const NOTES = {
  LoraLab_SaveLoRA: (output) => {
    const saved = output.lora_lab_saved?.[0];
    return saved && [`saved ${saved.filename}`, formatSize(saved.bytes), ...wrapped(saved.workflow ?? ""),
                     ...wrapped(saved.verdict ?? "")];
  },
  LoraLab_CheckLoRA: (output) => {
    const check = output.lora_lab_check?.[0];
    return check && [
      ...wrapped(check.verdict),
      ...wrapped(`file: ${check.layout}; for ${check.families.join(" or ") || "an unknown family"}`),
      ...check.blocks.map((block) => `${block.name}: ${block.applied}/${block.modules}`
        + (block.relative_change === null ? "" : `, ‖ΔW‖/‖W‖ ${(100 * block.relative_change).toFixed(2)} %`)),
    ];
  },
  LoraLab_LoadDataset: (output) => {
    const found = output.lora_lab_dataset?.[0];
    return found && [
      `${found.images} images: ${found.captioned} captioned, ${found.defaulted} default caption`
        + (found.clips ? ` (${found.clips} video clips)` : ""),
      `${found.examples} per epoch` + (found.skipped ? `, ${found.skipped} skipped` : ""),
    ];
  },
};

/** A long line as lines of at most WRAP_COLUMNS characters, broken at spaces. */
function wrapped(text) {
  const lines = [];
  for (const word of text.split(" ").filter(Boolean)) {
    const last = lines.length - 1;
    if (last >= 0 && lines[last].length + 1 + word.length <= WRAP_COLUMNS) lines[last] += ` ${word}`;
    else lines.push(word);
  }
  return lines;
}

function formatSize(bytes) {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(2)} MB` : `${(bytes / 1e3).toFixed(1)} kB`;
}

function isPackNode(node) {
  return TRAIN_NODES.has(node?.type) || node?.type in NOTES;
}

// --- the panel -----------------------------------------------------------------------------------------------

function drawNote(ctx, lines, y, width) {
  ctx.save();
  ctx.beginPath();
  ctx.rect(MARGIN, y, width - MARGIN * 2, lines.length * NOTE_LINE_HEIGHT);
  ctx.clip();
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#ddd";
  lines.forEach((line, index) => ctx.fillText(line, MARGIN, y + index * NOTE_LINE_HEIGHT));
  ctx.restore();
}

/**
 * A canvas widget after the node's own widgets: both front ends lay it out below them (multiline text included)
 * and put image previews below it. It holds no value: it is left out of the prompt and of saved workflows.
 */
function panelOf(node) {
  return findPanel(node) ?? node.addCustomWidget({
    name: PANEL_WIDGET,
    type: PANEL_WIDGET,
    value: null,
    serialize: false,
    options: { serialize: false },
    chart: null,
    lines: null,
    computeSize(width) {
      return [width, this.chart ? CHART_HEIGHT : (this.lines?.length ?? 0) * NOTE_LINE_HEIGHT];
    },
    draw(ctx, _node, width, y) {
      if (this.chart) this.chart.draw(ctx, MARGIN, y, width - MARGIN * 2);
      else if (this.lines) drawNote(ctx, this.lines, y, width);
    },
  });
}

function findPanel(node) {
  return node?.widgets?.find((widget) => widget.name === PANEL_WIDGET);
}

/** Grows the node (never shrinks it) so that the panel fits below its widgets. */
function makeRoom(node) {
  const needed = node.computeSize();
  const width = Math.max(node.size[0], needed[0], TRAIN_NODES.has(node.type) ? MIN_CHART_WIDTH : 0);
  if (width > node.size[0] || needed[1] > node.size[1]) node.setSize([width, Math.max(node.size[1], needed[1])]);
  node.setDirtyCanvas(true, true);
}

function chartOf(node) {
  const panel = panelOf(node);
  panel.chart ??= new LossChart();
  return panel.chart;
}

function showOutput(node, output) {
  if (!output) return;
  if (TRAIN_NODES.has(node.type)) {
    const summary = output.lora_lab_training?.[0];
    if (summary) chartOf(node).finish(summary);
  } else {
    const lines = NOTES[node.type]?.(output);
    if (lines) panelOf(node).lines = lines;
  }
  makeRoom(node);
}

/** Shows the node's `ui` output when it has run, and keeps the panel out of the node's saved widget values. */
function addPanel(nodeType) {
  const { onExecuted, onSerialize } = nodeType.prototype;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    showOutput(this, message);
  };
  nodeType.prototype.onSerialize = function (serialized) {
    onSerialize?.apply(this, arguments);
    // The legacy front end writes every widget's value; the current one skips ours (it may leave a hole there).
    const index = this.widgets?.findIndex((widget) => widget.name === PANEL_WIDGET) ?? -1;
    if (index >= 0 && serialized.widgets_values?.length > index) serialized.widgets_values.splice(index, 1);
  };
}

// --- training events -----------------------------------------------------------------------------------------

function trainNode(nodeId) {
  const node = app.graph.getNodeById(nodeId);
  return TRAIN_NODES.has(node?.type) ? node : null;
}

api.addEventListener("lora_lab.train.step", ({ detail }) => {
  const node = trainNode(detail.node);
  if (!node) return;
  chartOf(node).addStep(detail);
  makeRoom(node);
});

api.addEventListener("lora_lab.train.plan", ({ detail }) => {
  const node = trainNode(detail.node);
  if (!node) return;
  chartOf(node).setPlan(detail.text);
  makeRoom(node);
});

api.addEventListener("lora_lab.train.done", ({ detail }) => {
  const node = trainNode(detail.node);
  if (node) showOutput(node, { lora_lab_training: [detail] });
});

for (const [event, reason] of [["execution_error", "error"], ["execution_interrupted", "interrupted"]]) {
  api.addEventListener(event, ({ detail }) => {
    const node = trainNode(detail.node_id);
    const chart = node && findPanel(node)?.chart;
    if (!chart) return;
    chart.halt(reason);
    node.setDirtyCanvas(true, false);
  });
}

// --- the last run after a page reload ------------------------------------------------------------------------

/** `{node id: {type, output}}` of the newest history entries that this browser tab queued. */
async function lastRunOutputs() {
  const clientId = api.initialClientId ?? api.clientId;
  let history;
  try {
    history = await (await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`)).json();
  } catch (error) {
    console.warn("LoRA Lab: could not read the last run from /history", error);
    return {};
  }
  // This tab's runs (a reload keeps the tab's client id); a new tab has none, and the newest runs stand in.
  const entries = Object.values(history);
  const mine = entries.filter((entry) => entry.prompt?.[3]?.client_id === clientId);
  const outputs = {};
  for (const entry of mine.length ? mine : entries) {
    const [, , prompt] = entry.prompt ?? [];
    for (const [nodeId, output] of Object.entries(entry.outputs ?? {})) {
      outputs[nodeId] = { type: prompt?.[nodeId]?.class_type, output };
    }
  }
  return outputs;
}

let pendingRestore = null; // the last run's outputs, read at setup, for the first graph shown
let graphShown = false; // a graph was configured (before setup on the legacy front end)
let lastRunRestored = false; // the first graph got the last run's outputs, or there were none

async function restoreLastRun() {
  const outputs = await pendingRestore;
  pendingRestore = null;
  for (const node of app.graph._nodes) {
    const last = outputs[node.id];
    if (isPackNode(node) && last?.type === node.type) showOutput(node, last.output);
  }
  lastRunRestored = true;
}

// --- read-only view for tests and debugging ------------------------------------------------------------------

function chartSnapshot(nodeId) {
  const chart = findPanel(app.graph.getNodeById(nodeId))?.chart;
  if (!chart) return null;
  const { steps, losses, smoothed, received, validation, total, summary, halted, draws, area, plan } = chart;
  return structuredClone({ steps, losses, smoothed, received, validation, total, summary, halted, draws, area, plan,
                           status: chart.plan || losses.length ? chart.statusLines() : [] });
}

window.LoraLab = Object.freeze({
  lastRunRestored: () => lastRunRestored,
  chart: chartSnapshot,
  note: (nodeId) => [...(findPanel(app.graph.getNodeById(nodeId))?.lines ?? [])],
});

app.registerExtension({
  name: "LoraLab.NodePanels",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TRAIN_NODES.has(nodeData.name) || nodeData.name in NOTES) addPanel(nodeType);
  },
  async setup() {
    pendingRestore = lastRunOutputs();
    if (graphShown) await restoreLastRun();
  },
  async afterConfigureGraph() {
    graphShown = true;
    if (pendingRestore) await restoreLastRun();
  },
  // Current front end: outputs put back on switching workflow tabs or loading a queue/history entry.
  onNodeOutputsUpdated(outputs) {
    for (const [nodeId, output] of Object.entries(outputs)) {
      const node = app.graph.getNodeById(nodeId);
      if (isPackNode(node)) showOutput(node, output);
    }
  },
});
