// LoRA Lab's front-end extension: shows what the pack's nodes report after they run.
import { app } from "../../scripts/app.js";

const SUMMARY_NODES = new Set(["LoraLab_SaveLoRA", "LoraLab_LoadDataset"]);

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === "lora_lab_summary");
  if (!widget) {
    widget = node.addWidget("text", "lora_lab_summary", "", () => {}, { serialize: false });
    widget.disabled = true;
  }
  widget.value = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "LoraLab.Summaries",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SUMMARY_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
  },
});
