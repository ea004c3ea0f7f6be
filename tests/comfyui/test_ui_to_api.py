"""ui_to_api on hand-written UI workflows and node definitions shaped like ComfyUI's `/object_info` (no server)."""
from __future__ import annotations

import pytest

from .harness import ui_to_api

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"]]}}},
    "LoraLoader": {"input": {"required": {
        "model": ["MODEL"], "clip": ["CLIP"], "lora_name": [["l.safetensors"]],
        "strength_model": ["FLOAT", {"default": 1.0}], "strength_clip": ["FLOAT", {"default": 1.0}]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}}},
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 20}],
        "positive": ["CONDITIONING"]}}},
    "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}}},
    "Mixer": {"input": {
        "required": {"text": ["STRING", {"forceInput": True}], "amount": ["FLOAT", {}],
                     "pick": [["a", "b"], {"control_after_generate": True}]},
        "optional": {"count": ["INT", {"control_after_generate": True}], "flag": ["BOOLEAN", {}]}}},
}


def ui_node(node_id: int, node_type: str, widgets_values=None, inputs=(), mode: int = 0) -> dict:
    node = {"id": node_id, "type": node_type, "mode": mode,
            "inputs": [{"name": name, "type": kind, "link": link} for name, kind, link in inputs]}
    if widgets_values is not None:
        node["widgets_values"] = widgets_values
    return node


def test_primitive_reroute_bypass_mute_and_note_resolve_like_the_frontend():
    checkpoint = ui_node(1, "CheckpointLoaderSimple", ["a.safetensors"])
    bypassed_lora = ui_node(2, "LoraLoader", ["l.safetensors", 1.0, 1.0], [("model", "MODEL", 1), ("clip", "CLIP", 2)],
                            mode=4)
    reroute = ui_node(3, "Reroute", inputs=[("", "*", 3)])
    text = ui_node(4, "CLIPTextEncode", ["a cat"], [("clip", "CLIP", 4)])
    muted_text = ui_node(5, "CLIPTextEncode", ["unused"], [("clip", "CLIP", None)], mode=2)
    primitive = ui_node(6, "PrimitiveNode", [42, "fixed"])
    sampler = ui_node(7, "KSampler", [0, "randomize", 3],
                      [("model", "MODEL", 5), ("positive", "CONDITIONING", 6), ("seed", "INT", 7)])
    sampler["inputs"][2]["widget"] = {"name": "seed"}
    second_sampler = ui_node(8, "KSampler", [1, "fixed", 4], [("model", "MODEL", 8), ("positive", "CONDITIONING", 9)])
    note = ui_node(9, "Note", ["hello"])
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CLIP"], [3, 2, 0, 3, 0, "*"], [4, 2, 1, 4, 0, "CLIP"],
             [5, 3, 0, 7, 0, "MODEL"], [6, 4, 0, 7, 1, "CONDITIONING"], [7, 6, 0, 7, 2, "INT"],
             [8, 1, 0, 8, 0, "MODEL"], [9, 5, 0, 8, 1, "CONDITIONING"]]
    workflow = {"nodes": [checkpoint, bypassed_lora, reroute, text, muted_text, primitive, sampler, second_sampler,
                          note], "links": links}

    assert ui_to_api(workflow, OBJECT_INFO) == {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "7": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 3, "model": ["1", 0],
                                                   "positive": ["4", 0]}},
        "8": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "model": ["1", 0]}},
    }


@pytest.mark.parametrize("widgets_values", [
    ["ignored: a socket", 0.5, "b", "fixed", "", 3, "increment", True],  # March 2024: forceInput makes a widget
    [0.5, "b", "fixed", "", 3, "increment", True],  # newer frontends: it does not
    {"amount": 0.5, "pick": "b", "count": 3, "flag": True, "text": "ignored: linked"},  # newer, as a dict
])
def test_widget_values_map_to_inputs_in_every_layout(widgets_values):
    source = ui_node(1, "CLIPTextEncode", ["x"], [("clip", "CLIP", None)])
    mixer = ui_node(2, "Mixer", widgets_values, [("text", "STRING", 1)])
    workflow = {"nodes": [source, mixer], "links": [[1, 1, 0, 2, 0, "STRING"]]}

    assert ui_to_api(workflow, OBJECT_INFO)["2"]["inputs"] == {
        "amount": 0.5, "pick": "b", "count": 3, "flag": True, "text": ["1", 0]}


def test_upload_button_value_is_skipped():
    workflow = {"nodes": [ui_node(1, "LoadImage", ["cat.png", "image"])], "links": []}

    assert ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"image": "cat.png"}


def test_widget_values_that_do_not_fit_are_an_error():
    workflow = {"nodes": [ui_node(1, "KSampler", [0, 3])], "links": []}

    with pytest.raises(ValueError, match=r"node 1 \(KSampler\): 2 widgets_values"):
        ui_to_api(workflow, OBJECT_INFO)


def test_unknown_node_type_is_an_error():
    workflow = {"nodes": [ui_node(1, "NotInstalled", [])], "links": []}

    with pytest.raises(ValueError, match="no node type 'NotInstalled'"):
        ui_to_api(workflow, OBJECT_INFO)


def test_values_saved_before_optional_inputs_were_added_fill_the_first_widgets():
    workflow = {"nodes": [ui_node(1, "Mixer", [0.5, "b", "fixed", ""], [("text", "STRING", None)])], "links": []}

    assert ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"amount": 0.5, "pick": "b"}
