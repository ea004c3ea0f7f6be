"""kohya-format files: read back, opened by diffusers with the same outputs, deterministic, atomic, safe."""
from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch

from lora_core import LoRAFileError, LoRANetwork, kohya_metadata, load_file, load_lora, save_lora
from lora_core.demo.tiny_model import build_tiny_pipeline
from lora_core.families.sd1 import DiffusersBackend


def trained_looking(network: LoRANetwork, seed: int = 3) -> LoRANetwork:
    """Random non-zero adapter weights, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network


def outputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipeline.tokenizer(["a photo of sks"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipeline.text_encoder(ids)[0]
        unet = pipeline.unet(latents, torch.tensor([300]), encoder_hidden_states=text).sample
    return unet, text


def test_diffusers_load_lora_weights_gives_the_same_outputs(tmp_path) -> None:
    """(diffusers drops `dora_scale` from kohya files with a warning, so DoRA is checked against PEFT instead.)"""
    algorithm = "lora"
    ours = build_tiny_pipeline(seed=0)
    backend = DiffusersBackend(ours)
    network = trained_looking(LoRANetwork.create(backend.adapter_targets("transformer", True), algorithm, rank=4, alpha=2))
    path = save_lora(tmp_path / "lora.safetensors", network, kohya_metadata(network), dtype="float32")

    theirs = build_tiny_pipeline(seed=0)
    theirs.load_lora_weights(str(path), adapter_name="lab")
    loaded, _ = load_lora(path, backend.loadable_modules())
    for strength in (1.0, 0.5):
        theirs.set_adapters(["lab"], adapter_weights=[strength])
        with loaded.applied(strength):
            expected_unet, expected_text = outputs(ours)
        unet, text = outputs(theirs)
        torch.testing.assert_close(text, expected_text, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(unet, expected_unet, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected_unet, outputs(ours)[0], atol=1e-4), "the LoRA must change the output"


@pytest.mark.parametrize("algorithm", ["lora", "dora", "loha", "lokr"])
def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path, pipeline, algorithm: str) -> None:
    backend = DiffusersBackend(pipeline)
    network = trained_looking(LoRANetwork.create(backend.adapter_targets("full", False), algorithm, rank=4))
    metadata = kohya_metadata(network, training={"steps": 12, "seed": 5}, model={"name": "tiny", "hash": "ab" * 32},
                              dataset={"tag_frequency": {"10_sks": {"sks": 3}}}, title="t", resolution=64)
    path = save_lora(tmp_path / "x.safetensors", network, metadata, dtype="float32")
    tensors, read_metadata = load_file(path)
    for key, value in network.kohya_tensors().items():
        assert torch.equal(tensors[key], value), key
    assert read_metadata["ss_network_dim"] == "4" and read_metadata["ss_steps"] == "12"
    assert read_metadata["ss_sd_model_hash"] == "abababab" and json.loads(read_metadata["ss_tag_frequency"]) == {"10_sks": {"sks": 3}}
    assert read_metadata["ss_network_module"] == ("networks.lora" if algorithm == "lora" else "lycoris.kohya")
    assert read_metadata["modelspec.resolution"] == "64x64"
    assert len(read_metadata["sshs_model_hash"]) == 64
    loaded, _ = load_lora(path, backend.loadable_modules())
    assert loaded.algorithm == algorithm
    for name, adapter in network.items():
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight(), rtol=0, atol=0)


def test_suffixes_are_kohya_and_lycoris_names(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    targets = backend.adapter_targets("attention", False)
    expected = {
        "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    }
    for algorithm, suffixes in expected.items():
        keys = LoRANetwork.create(targets, algorithm, rank=4).kohya_tensors()
        assert {key.split(".", 1)[1] for key in keys} == suffixes


def test_same_network_gives_byte_identical_files(tmp_path, pipeline, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    targets = DiffusersBackend(pipeline).adapter_targets("attention", False)
    paths = []
    for index in range(2):
        network = trained_looking(LoRANetwork.create(targets, rank=4, seed=1))
        metadata = kohya_metadata(network, training={"seed": 1}, title="same")
        paths.append(save_lora(tmp_path / f"{index}.safetensors", network, metadata))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_fp16_file_size_is_parameters_times_two_plus_header(tmp_path, pipeline) -> None:
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=4)
    path = save_lora(tmp_path / "half.safetensors", network, kohya_metadata(network))
    weights = sum(p.numel() for p in network.parameters()) * 2 + 4 * len(network.adapters)  # alphas stay fp32
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + weights


def test_existing_file_is_not_overwritten_unless_asked(tmp_path, pipeline) -> None:
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=4)
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(LoRAFileError, match="exists already"):
        save_lora(path, network, {})
    assert path.read_bytes() == b"precious"
    save_lora(path, network, {}, overwrite=True)
    assert load_file(path)[0]
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"], "no temporary file may stay behind"


def test_pickles_are_refused_unopened(tmp_path) -> None:
    for name in ("lora.pt", "lora.ckpt", "disguised.safetensors"):
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / name)
        with pytest.raises(LoRAFileError, match="pickled PyTorch file.*never unpickles"):
            load_file(tmp_path / name)


def test_broken_and_foreign_files_are_clear_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    truncated = tmp_path / "truncated.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(64, 64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(LoRAFileError, match="truncated.safetensors is not a valid safetensors file"):
        load_file(truncated)
    peft_style = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 2)}, peft_style)
    with pytest.raises(LoRAFileError, match="not in kohya format"):
        load_file(peft_style)
    with pytest.raises(LoRAFileError, match="no such LoRA file"):
        load_file(tmp_path / "missing.safetensors")


def test_metadata_says_what_was_asked_in_kohya_and_modelspec_words(pipeline) -> None:
    backend = DiffusersBackend(pipeline)
    attention = backend.adapter_targets("attention", False)
    lokr = LoRANetwork.create(backend.adapter_targets("full", False), "lokr", rank=16, alpha=8, factor=4)
    metadata = kohya_metadata(lokr, model=backend.model_info())
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("16", "8")
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "conv_dim": "16", "conv_alpha": "8", "factor": "4"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    plain = kohya_metadata(LoRANetwork.create(attention, rank=4))
    assert "ss_network_args" not in plain and "ss_clamped_ranks" not in plain  # kohya omits them when empty
    dora = kohya_metadata(LoRANetwork.create(attention, "dora", rank=4))
    assert json.loads(dora["ss_network_args"]) == {"algo": "lora", "dora_wd": "True"}


@pytest.mark.parametrize("version, prediction_type, architecture", [
    ("sd_v1", "epsilon", "stable-diffusion-v1/lora"),
    ("sd_v2", "epsilon", "stable-diffusion-v2-512/lora"),
    ("sd_v2", "v_prediction", "stable-diffusion-v2-768-v/lora"),
    ("sdxl_base_v1-0", "epsilon", "stable-diffusion-xl-v1-base/lora"),
])
def test_modelspec_architecture_ids_are_kohyas(pipeline, version: str, prediction_type: str, architecture: str) -> None:
    """The ids of kohya's library/sai_model_spec.py (`determine_architecture` with lora=True)."""
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=4)
    metadata = kohya_metadata(network, model={"version": version}, prediction_type=prediction_type)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_v2"] == str(version == "sd_v2")


def test_clamped_ranks_are_recorded_in_the_file(tmp_path, pipeline) -> None:
    with pytest.warns(UserWarning, match="rank 48 is more than"):
        network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=48)
    path = save_lora(tmp_path / "clamped.safetensors", network, kohya_metadata(network))
    tensors, metadata = load_file(path)
    recorded = json.loads(metadata["ss_clamped_ranks"])
    assert recorded and recorded == network.clamped_ranks
    assert all(tensors[f"{name}.lora_down.weight"].shape[0] == rank for name, rank in recorded.items())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, pipeline, umask: int, mode: int) -> None:
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=4)
    previous = os.umask(umask)
    try:
        path = save_lora(tmp_path / "shared.safetensors", network, {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_saving_works_where_the_filesystem_has_no_hard_links(tmp_path, pipeline, monkeypatch) -> None:
    """exFAT and some network mounts refuse link(2) (EPERM, ENOTSUP, EXDEV…); the save must still be atomic and
    must still never overwrite a file it was not asked to."""
    network = LoRANetwork.create(DiffusersBackend(pipeline).adapter_targets("attention", False), rank=4)
    expected = save_lora(tmp_path / "reference.safetensors", network, {}).read_bytes()
    refusals = iter([errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM])

    def no_hard_links(source, destination, *args, **kwargs):
        raise OSError(next(refusals), "hard links are not supported here")

    monkeypatch.setattr(os, "link", no_hard_links)
    for name in ("exfat.safetensors", "smb.safetensors", "other_device.safetensors"):
        assert save_lora(tmp_path / name, network, {}).read_bytes() == expected
    with pytest.raises(LoRAFileError, match="exists already"):
        save_lora(tmp_path / "exfat.safetensors", network, {})

    def taken_meanwhile(source, destination, *args, **kwargs):  # another writer takes the name, then link fails
        Path(destination).write_bytes(b"theirs")
        no_hard_links(source, destination)

    monkeypatch.setattr(os, "link", taken_meanwhile)
    with pytest.raises(LoRAFileError, match="created by someone else meanwhile; nothing was overwritten"):
        save_lora(tmp_path / "race.safetensors", network, {})
    assert (tmp_path / "race.safetensors").read_bytes() == b"theirs"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")], "no temporary file may stay behind"
