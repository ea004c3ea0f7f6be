"""The naming and loading tests again, under the oldest libraries requirements.txt admits (transformers 4.x, whose
CLIPTextModel still has its `text_model` wrapper), installed by scripts/setup.sh into .cache/oldest-supported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLDEST = ROOT / ".cache" / "oldest-supported"
# kohya names of UNet and text encoder, a kohya file, diffusers' own loader as the oracle, every algorithm's file
SELECTION = "names_equal or kohya_text_encoder_file or diffusers_load_lora or round_trip or from_tensors"


def oldest_pins() -> dict[str, str]:
    lines = (ROOT / "requirements-oldest.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line)


def run_on_oldest(*args: str) -> subprocess.CompletedProcess:
    assert (OLDEST / "requirements-oldest.txt").is_file(), "run scripts/setup.sh: it installs .cache/oldest-supported"
    env = {**os.environ, "PYTHONPATH": str(OLDEST)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_naming_and_loading_pass_on_the_oldest_supported_libraries() -> None:
    pins = oldest_pins()
    probe = run_on_oldest("-c", "import diffusers, transformers; print(diffusers.__version__, transformers.__version__)")
    assert probe.stdout.split() == [pins["diffusers"], pins["transformers"]], probe.stderr
    result = run_on_oldest("-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "tests/pytest.ini",
                           "tests/engine/test_network.py", "tests/engine/formats/test_files.py", "-k", SELECTION)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_shipped_demo_base_loads_whole_on_the_oldest_supported_libraries() -> None:
    """The base in lora_core/demo/base/ was written by transformers 5; transformers 4 must get every weight and the same
    token ids (it reads vocab.json/merges.txt and the `text_model.`-prefixed keys), or the demo would run on a text
    encoder initialised at random."""
    script = (
        "import json, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers import CLIPTextModel\n"
        "_, info = CLIPTextModel.from_pretrained('lora_core/demo/base/text_encoder', output_loading_info=True)\n"
        "pipe = StableDiffusionPipeline.from_pretrained('lora_core/demo/base', safety_checker=None,"
        " requires_safety_checker=False)\n"
        "ids = pipe.tokenizer(['a red sks on a white background'], padding='max_length', max_length=77,"
        " return_tensors='pt').input_ids\n"
        "with torch.no_grad(): out = pipe.text_encoder(ids)[0]\n"
        "print(json.dumps({'missing': sorted(info['missing_keys']), 'unexpected': sorted(info['unexpected_keys']),"
        " 'ids': ids[0, :10].tolist(), 'sum': out.double().sum().item()}))\n"
    )
    oldest = run_on_oldest("-c", script)
    assert oldest.returncode == 0, oldest.stderr[-3000:]
    today = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert today.returncode == 0, today.stderr[-3000:]
    old, new = (json.loads(result.stdout.strip().splitlines()[-1]) for result in (oldest, today))
    assert old["missing"] == old["unexpected"] == [] and old["ids"] == new["ids"]
    assert abs(old["sum"] - new["sum"]) <= 1e-4 * abs(new["sum"])
