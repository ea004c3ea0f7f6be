"""The web extension in a real browser: headless Debian Chromium, driven by Playwright, on the test ComfyUI.

The shipped training workflow is loaded and queued through the page's own `app`, with the sizes that
test_workflows.py shrinks for the CPU; the page's `window.LoraLab` view tells what the nodes received and drew.
Needs `scripts/setup_browser.sh` (Chromium and Playwright); skipped without it, except in CI.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from lora_core.formats.files import read_safetensors

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # scripts/setup_browser.sh installs it
    sync_playwright = None

from .harness import CURRENT_COMFY_DIR, REPO_ROOT, ComfyServer
from .test_workflows import TRAINED, TRAINING_OVERRIDES, WORKFLOWS, shipped_names  # noqa: F401 (fixture)

CHROMIUM = Path("/usr/bin/chromium")
# The launch flags that work on this closed network; Playwright gives each launch a fresh profile directory.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_SCRIPTS = "/extensions/comfyui-lora-lab/"
ARTIFACTS = REPO_ROOT / "test-artifacts"
VIEWPORT = {"width": 1600, "height": 1000}
# The README's picture of the training workflow, remade by the training test on the 0.3.64 server with its own front
# end: the whole workflow fitted into the canvas at the top of this window, the chart readable; the room left below
# keeps the minimap and the zoom buttons of the current front ends off the nodes.
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "training_workflow.png"
DOCS_VIEWPORT = {"width": 2000, "height": 1200}
DOCS_MARGINS = {"left": 20, "top": 24, "right": 20, "bottom": 60}
TOLERANCE = 1e-6
SMOOTHED_RGB = (255, 166, 77)  # COLORS.smoothed in web/loss_chart.js
VALIDATION_RGB = (255, 95, 210)  # COLORS.validation
NODE_IDS = {"LoraLab_LoadDataset": "2", "LoraLab_Train": "4", "LoraLab_SaveLoRA": "5"}
TRAIN = NODE_IDS["LoraLab_Train"]


class PageLog:
    """Console messages and uncaught errors of a page; `pack_errors()` keeps those from the pack's scripts."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error.message}\n{error.stack}"))

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text} (at {message.location.get('url', '')})")

    def pack_errors(self) -> list[str]:
        return [error for error in self.errors if PACK_SCRIPTS in error]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if sync_playwright is None or not CHROMIUM.exists():
        reason = "Playwright or Chromium is missing: run scripts/setup_browser.sh"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_app(browser, comfy: ComfyServer):
    """A new tab on ComfyUI, once the app and the pack's extension are up; and the tab's error log."""
    page = browser.new_page(viewport=VIEWPORT)
    log = PageLog(page)
    page.goto(comfy.url)
    wait_for_app(page)
    return page, log


def wait_for_app(page) -> None:
    """Waits until the page shows its first graph, given the last run's outputs: the current front ends load it
    after `window.app` is up, and the extension reads `/history` for it."""
    page.wait_for_function("window.app?.graph && window.LoraLab?.lastRunRestored()", timeout=60_000)


def load_shrunk_workflow(page, steps: int = TRAINING_OVERRIDES["LoraLab_Train"]["steps"]) -> None:
    """Loads workflows/train_lora.json into the graph and sets the CPU sizes on its widgets, in the page."""
    workflow = json.loads((WORKFLOWS / "train_lora.json").read_text())
    overrides = {**TRAINING_OVERRIDES, "LoraLab_Train": {**TRAINING_OVERRIDES["LoraLab_Train"], "steps": steps}}
    page.evaluate("""async ([workflow, overrides]) => {
        await app.loadGraphData(workflow);
        for (const node of app.graph._nodes) {
            for (const [name, value] of Object.entries(overrides[node.type] ?? {})) {
                const widget = node.widgets.find((w) => w.name === name);
                if (!widget) throw new Error(`${node.type} has no widget ${name}`);
                widget.value = value;
            }
        }
    }""", [workflow, overrides])


def queue_in_page(page) -> tuple[str, dict]:
    """Presses Queue the way the button does (`app.queuePrompt`); returns the prompt id ComfyUI answered and the UI
    workflow the front end sent with the prompt."""
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        page.evaluate("app.queuePrompt(0)")
    sent = answer.value.request.post_data_json
    return answer.value.json()["prompt_id"], sent["extra_data"]["extra_pnginfo"]["workflow"]


def drop_file(page, path: Path) -> None:
    """Drops the file on the empty canvas, as dragging it from the desktop does."""
    page.evaluate("""async ([name, encoded]) => {
        const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name));
        const canvas = app.canvas.canvas;
        for (const type of ["dragenter", "dragover", "drop"]) {
            canvas.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true,
                                                      clientX: 5, clientY: canvas.getBoundingClientRect().bottom - 5}));
        }
    }""", [path.name, base64.b64encode(path.read_bytes()).decode()])


def graph_nodes(workflow: dict) -> list[tuple]:
    """A UI workflow's nodes as (id, type, widget values), and its links, to compare two graphs by."""
    nodes = sorted((node["id"], node["type"], json.dumps(node.get("widgets_values"))) for node in workflow["nodes"])
    return [nodes, sorted(map(tuple, workflow["links"]))]


def show_nodes(page) -> None:
    """Frames the dataset, training and save nodes at a readable scale, Train LoRA on top, and draws the canvas now."""
    page.evaluate("""(trainId) => {
        app.canvas.ds.scale = 0.75;
        app.canvas.ds.offset = [-10, 40];
        app.canvas.bringToFront(app.graph.getNodeById(trainId));  // as a click on it does
        app.canvas.draw(true, true);
    }""", TRAIN)


def fit_workflow(page, margins: dict[str, int]) -> None:
    """Scales and moves the canvas so that every node, title bar included, fits inside the canvas's visible part
    (the page's window less the front end's bars) less `margins`, at its top and centred across, and draws it now."""
    page.evaluate("""([margins, trainId]) => {
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        const nodes = app.graph._nodes;
        const left = Math.min(...nodes.map((n) => n.pos[0]));
        const top = Math.min(...nodes.map((n) => n.pos[1] - title));
        const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
        const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
        const canvas = app.canvas.canvas.getBoundingClientRect();
        const visible = {x: Math.max(canvas.left, 0), y: Math.max(canvas.top, 0),
                         right: Math.min(canvas.right, window.innerWidth),
                         bottom: Math.min(canvas.bottom, window.innerHeight)};
        const width = visible.right - visible.x - margins.left - margins.right;
        const height = visible.bottom - visible.y - margins.top - margins.bottom;
        const scale = Math.min(width / (right - left), height / (bottom - top));
        // LiteGraph draws graph point p at (p + offset) * scale from the canvas's corner
        const x = visible.x - canvas.left + margins.left + (width - (right - left) * scale) / 2;
        const y = visible.y - canvas.top + margins.top;
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [x / scale - left, y / scale - top];
        app.canvas.bringToFront(app.graph.getNodeById(trainId));
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
    }""", [margins, TRAIN])


def close_dialogs(page) -> None:
    """Closes what covers the canvas, as Escape does: 1.27.10 greets a new user with its templates dialog."""
    visible = """() => [...document.querySelectorAll('[role="dialog"], .p-dialog')]
        .some((element) => element.getClientRects().length > 0)"""
    for _ in range(3):
        if not page.evaluate(visible):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert not page.evaluate(visible), "a dialog of the front end covers the workflow"


def save_docs_screenshot(page, comfy: ComfyServer) -> None:
    """On the 0.3.64 server with its own front end, saves the README's picture of the trained workflow with its chart
    (docs/training_workflow.png), then puts the test's window back as it was."""
    if comfy.comfy_dir != CURRENT_COMFY_DIR or comfy.front_end_root is not None:
        return
    close_dialogs(page)
    page.set_viewport_size(DOCS_VIEWPORT)
    page.wait_for_timeout(500)  # the front end resizes its canvas on the window's resize event
    fit_workflow(page, DOCS_MARGINS)
    page.wait_for_timeout(500)  # DOM widgets (prompts, previews) follow the canvas on the next frames
    fit_workflow(page, DOCS_MARGINS)
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    # 256 colours keep the front end's text and lines sharp at a third of the bytes (the previews are noise)
    shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(DOCS_SCREENSHOT, optimize=True)
    page.set_viewport_size(VIEWPORT)
    page.wait_for_timeout(500)
    show_nodes(page)


def saved_widget_values(page) -> dict[str, list]:
    """The `widgets_values` that saving the workflow would write for the pack's nodes."""
    return page.evaluate("(ids) => Object.fromEntries(ids.map((id) => [id, app.graph.getNodeById(id).serialize()"
                         ".widgets_values]))", list(NODE_IDS.values()))


def chart_pixels(page, rgb: tuple[int, int, int]) -> int:
    """How many canvas pixels where Train LoRA's chart was last drawn have (nearly) the colour `rgb`."""
    return page.evaluate("""([nodeId, [r, g, b]]) => {
        const node = app.graph.getNodeById(nodeId);
        const { area } = LoraLab.chart(nodeId);
        const canvas = app.canvas.canvas;
        const ratio = canvas.width / canvas.getBoundingClientRect().width;
        const scale = app.canvas.ds.scale;
        const [left, top] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + area.x, node.pos[1] + area.y]);
        const { data } = canvas.getContext("2d").getImageData(
            left * ratio, top * ratio, area.width * scale * ratio, area.height * scale * ratio);
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 30) count += 1;
        }
        return count;
    }""", [TRAIN, list(rgb)])


def overlapping_nodes(page) -> list[list[str]]:
    """Pairs of nodes of the graph whose boxes overlap, each with its box (x, y, width, height; the title bar, which
    LiteGraph draws above `pos`, included), as the canvas has them now."""
    return page.evaluate("""() => {
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        const boxes = app.graph._nodes.map((node) => ({
            name: `${node.type} #${node.id}`, x: node.pos[0], y: node.pos[1] - title, w: node.size[0],
            h: node.size[1] + title}));
        const text = (b) => `${b.name} at ${[b.x, b.y, b.w, b.h].map(Math.round).join(",")}`;
        const pairs = [];
        boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
            if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) pairs.push([text(a), text(b)]);
        }));
        return pairs;
    }""")


def size_text(size: int) -> str:
    """How web/lora_lab.js writes a file size."""
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= TOLERANCE for a, e in zip(actual, expected)), (actual, expected)


def test_the_pack_scripts_load_without_console_errors(browser, comfy: ComfyServer) -> None:
    assert {f"{PACK_SCRIPTS}lora_lab.js", f"{PACK_SCRIPTS}loss_chart.js"} <= set(comfy.extensions())
    page, log = open_app(browser, comfy)
    try:
        load_shrunk_workflow(page)  # creates the pack's nodes, which the default graph does not have
        show_nodes(page)
        assert page.evaluate("(id) => LoraLab.chart(id)", TRAIN) is None
        assert log.pack_errors() == []
    finally:
        page.close()


def test_no_shipped_workflow_has_a_node_over_another(browser, comfy: ComfyServer) -> None:
    """Every workflow in workflows/ as the front end lays it out on loading (train_lora.json is checked again at its
    size after training, above)."""
    page, _ = open_app(browser, comfy)
    try:
        overlaps = {}
        for path in sorted(WORKFLOWS.glob("*.json")):
            page.evaluate("(workflow) => app.loadGraphData(workflow)", json.loads(path.read_text()))
            overlaps[path.name] = overlapping_nodes(page)
        assert overlaps == dict.fromkeys(overlaps, []), json.dumps(overlaps, indent=1)
    finally:
        page.close()


def test_training_is_charted_live_in_the_node_and_restored_after_a_reload(browser, comfy: ComfyServer,
                                                                          shipped_names) -> None:
    page, log = open_app(browser, comfy)
    try:
        load_shrunk_workflow(page)
        widget_values = saved_widget_values(page)
        prompt_id, sent_workflow = queue_in_page(page)
        page.wait_for_function("(id) => LoraLab.chart(id)?.received.length > 0", arg=TRAIN, timeout=600_000)
        live = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert live["summary"] is None, "the chart must fill while the node trains, not only at the end"
        ARTIFACTS.mkdir(exist_ok=True)
        show_nodes(page)
        page.screenshot(path=str(ARTIFACTS / "train_lora_browser_live.png"))

        entry = comfy.wait(prompt_id, timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]
        outputs = entry["outputs"]
        summary = outputs[TRAIN]["lora_lab_training"][0]
        page.wait_for_function("(ids) => ids.every((id) => LoraLab.chart(id)?.summary ?? LoraLab.note(id).length)",
                               arg=list(NODE_IDS.values()), timeout=60_000)
        show_nodes(page)

        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["plan"] == summary["memory_plan"] and summary["memory_plan"].startswith("memory plan: ≈ ")
        planned = re.search(r"≈ [\d.]+ [MG]iB", summary["memory_plan"]).group(0)
        assert chart["status"][0].endswith(f"memory {planned} planned"), chart["status"]
        assert len(summary["losses"]) == TRAINING_OVERRIDES["LoraLab_Train"]["steps"]
        assert_close(chart["received"], summary["losses"])  # every step's event arrived
        assert_close(chart["losses"], summary["losses"])
        assert chart["steps"] == list(range(1, len(summary["losses"]) + 1))
        assert chart["draws"] > 0
        assert chart_pixels(page, SMOOTHED_RGB) > 50, "the smoothed loss line is not on the canvas"

        saved = outputs[NODE_IDS["LoraLab_SaveLoRA"]]["lora_lab_saved"][0]
        assert saved["filename"] == TRAINED
        assert saved["bytes"] == (comfy.loras_dir / TRAINED).stat().st_size
        note = page.evaluate("(id) => LoraLab.note(id)", NODE_IDS["LoraLab_SaveLoRA"])
        assert note[:2] == [f"saved {TRAINED}", size_text(saved["bytes"])]
        assert " ".join(note[2:4]) == saved["workflow"]
        assert " ".join(note[4:]) == saved["verdict"] and saved["verdict"].startswith("checked: ")  # the workflow's
        # Save LoRA has the trained MODEL and CLIP: it checks the file
        found = outputs[NODE_IDS["LoraLab_LoadDataset"]]["lora_lab_dataset"][0]
        assert found["images"] == 4
        dataset_note = page.evaluate("(id) => LoraLab.note(id)", NODE_IDS["LoraLab_LoadDataset"])
        assert dataset_note == [f"4 images: {found['captioned']} captioned, {found['defaulted']} default caption",
                                f"{found['examples']} per epoch"]

        page.screenshot(path=str(ARTIFACTS / "train_lora_browser.png"))
        assert overlapping_nodes(page) == [], "a node covers another at its size after training (the chart grows)"
        save_docs_screenshot(page, comfy)
        assert saved_widget_values(page) == widget_values, "the panels must not change what a saved workflow holds"
        assert log.pack_errors() == []

        # No ComfyUI front end keeps node outputs over a reload: the extension reads the tab's last run back.
        page.reload()
        wait_for_app(page)
        restored = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert restored is not None, "the chart did not come back after the reload"
        assert restored["received"] == []  # drawn from the run's result, not from events
        assert_close(restored["losses"], summary["losses"])
        assert_close(restored["smoothed"], chart["smoothed"])  # the summary smooths as the steps did (plots.smooth)
        assert page.evaluate("(id) => LoraLab.note(id)", NODE_IDS["LoraLab_SaveLoRA"])[0] == f"saved {TRAINED}"
        show_nodes(page)
        assert chart_pixels(page, SMOOTHED_RGB) > 50
        page.screenshot(path=str(ARTIFACTS / "train_lora_browser_reloaded.png"))
        assert log.pack_errors() == []

        # The file holds the workflow it was trained with: dropped on an empty canvas, it loads that graph.
        assert saved["workflow"] == "stored the workflow (drop the file on the canvas to load it)"
        assert json.loads(read_safetensors(comfy.loras_dir / TRAINED)[1]["workflow"]) == sent_workflow
        page.evaluate("app.graph.clear()")
        drop_file(page, comfy.loras_dir / TRAINED)
        page.wait_for_function("(id) => app.graph.getNodeById(id)?.type === 'LoraLab_Train'", arg=TRAIN,
                               timeout=30_000)
        assert graph_nodes(page.evaluate("app.graph.serialize()")) == graph_nodes(sent_workflow)
        assert log.pack_errors() == []
    finally:
        page.close()


def test_a_cancelled_training_keeps_its_chart_and_says_so(browser, comfy: ComfyServer, shipped_names) -> None:
    page, log = open_app(browser, comfy)
    try:
        load_shrunk_workflow(page, steps=500)
        prompt_id, _ = queue_in_page(page)
        page.wait_for_function("(id) => LoraLab.chart(id)?.received.length >= 2", arg=TRAIN, timeout=600_000)
        assert comfy.cancel(prompt_id)["status"]["status_str"] == "error"
        page.wait_for_function("(id) => LoraLab.chart(id).halted", arg=TRAIN, timeout=60_000)
        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["halted"] == "interrupted"
        assert chart["summary"] is None
        assert 2 <= len(chart["losses"]) < 500
        assert log.pack_errors() == []
    finally:
        page.close()


def send_events(page, events: list[tuple[str, dict]]) -> None:
    """Dispatches server events through the page's own `api`, as its websocket handler does."""
    page.evaluate("""async (events) => {
        const { api } = await import("/scripts/api.js");
        for (const [type, detail] of events) api.dispatchEvent(new CustomEvent(type, { detail }));
    }""", events)


def test_the_validation_loss_is_drawn_and_a_long_run_comes_back_from_its_bounded_summary(browser, comfy) -> None:
    page, log = open_app(browser, comfy)
    try:
        load_shrunk_workflow(page)
        plan = ("memory plan: ≈ 7.2 GiB on the device (weights 5.0 GiB, other models 0 MiB, LoRA + gradients + "
                "optimizer 96 MiB, activations 2.1 GiB (4,096 tokens × 3072 × 57 blocks, with gradient "
                "checkpointing); planned, not measured)")
        send_events(page, [("lora_lab.train.plan", {"node": TRAIN, "text": plan})])
        show_nodes(page)
        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["plan"] == plan and chart["draws"] > 0, "the plan is drawn before the first step"
        assert chart["status"] == ["memory plan: ≈ 7.2 GiB on the training device, before the first step",
                                   plan[plan.index("(") + 1:-1]]
        steps = [{"node": TRAIN, "step": step, "total": 40, "loss": 1 / step, "smoothed": 1.5 / step, "lr": 1e-4,
                  "elapsed": step, "validation_loss": 0.2 + 1 / step if step % 5 == 0 else None}
                 for step in range(1, 21)]
        send_events(page, [("lora_lab.train.step", step) for step in steps])
        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["validation"] == [[step, 0.2 + 1 / step] for step in (5, 10, 15, 20)]
        show_nodes(page)
        assert chart_pixels(page, VALIDATION_RGB) > 30, "the validation loss is not on the canvas"

        # A 2000-step run, as a tab that missed its steps gets it: the loss at 500 steps at most (nodes/progress.py)
        loss_steps = [1, *range(5, 2001, 5)]
        summary = {"steps": 2000, "total": 2000, "loss_steps": loss_steps, "losses": [1 / s for s in loss_steps],
                   "smoothed": [2 / s for s in loss_steps], "best_step": 2000, "best_loss": 0.001,
                   "stop_reason": "completed", "seconds": 100.0, "validation": [[1000, 0.3], [2000, 0.25]]}
        send_events(page, [("lora_lab.train.done", {"node": TRAIN, **summary})])
        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["status"][0].endswith("memory ≈ 7.2 GiB planned")  # the run's plan, beside its result
        assert chart["steps"] == loss_steps and chart["total"] == 2000
        assert_close(chart["losses"], summary["losses"])
        assert_close(chart["smoothed"], summary["smoothed"])
        assert chart["validation"] == summary["validation"]
        show_nodes(page)
        assert chart_pixels(page, SMOOTHED_RGB) > 50 and chart_pixels(page, VALIDATION_RGB) > 10
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"validation_chart_{comfy.run_dir.name}.png"))
        assert log.pack_errors() == []
    finally:
        page.close()


def test_a_sweep_charts_each_variant_in_turn_and_names_the_best(browser, comfy) -> None:
    """The events Train LoRA sends for a sweep: each variant's steps from 1 with its label, then the best's summary."""
    page, log = open_app(browser, comfy)
    try:
        load_shrunk_workflow(page)
        labels = ["learning_rate 0.0001", "learning_rate 0.001"]
        for index, label in enumerate(labels):
            variant = f"variant {index + 1}/2: {label}"
            send_events(page, [("lora_lab.train.step", {
                "node": TRAIN, "step": step, "total": 6, "loss": 2 / step, "smoothed": 2 / step, "lr": 1e-4,
                "elapsed": step, "validation_loss": None, "variant": variant}) for step in range(1, 4 + 3 * index)])
            chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
            assert chart["steps"] == list(range(1, 4 + 3 * index)), "each variant's chart starts from its step 1"
            assert chart["status"][1].startswith(f"{variant}   lr 1.00e-4"), chart["status"]
        sweep = [{"variant": label, "validation_loss": loss, "steps": 6, "stop_reason": "completed", "best": best}
                 for label, loss, best in ((labels[0], 0.5, False), (labels[1], 0.25, True))]
        summary = {"steps": 6, "total": 6, "losses": [1 / s for s in range(1, 7)], "smoothed": [1 / s for s in range(1, 7)],
                   "best_step": 6, "best_loss": 0.25, "stop_reason": "completed", "seconds": 6.0,
                   "validation": [[0, 1.0], [6, 0.25]], "sweep": sweep}
        send_events(page, [("lora_lab.train.done", {"node": TRAIN, **summary})])
        chart = page.evaluate("(id) => LoraLab.chart(id)", TRAIN)
        assert chart["status"][1] == f"best of 2 variants: {labels[1]}, validation 0.2500", chart["status"]
        assert_close(chart["losses"], summary["losses"])  # the best variant's curve, though the last one sent 6 steps
        assert chart["total"] == 6
        assert log.pack_errors() == []
    finally:
        page.close()
