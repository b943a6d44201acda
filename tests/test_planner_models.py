"""Model specs: the built-in table, local checkpoints and the offline Hugging Face cache."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from scripts.planner.models import BUILTIN_IDS, UnknownModelError, fp8_modules_not_converted, resolve_model, variants_to_try
from service.model_shapes import shape

GIB = 1024**3


def test_builtin_table_has_every_published_checkpoint():
    expected = {f"Qwen/Qwen3-VL-{s}-{v}{q}" for s in ("2B", "4B", "8B")
                for v in ("Instruct", "Thinking") for q in ("", "-FP8")}
    assert set(BUILTIN_IDS) == expected


@pytest.mark.parametrize("model, measured_gib", [
    # Measured on the GPU machine: random-weight models built from Qwen3VLConfig (notes/gpu-machine.md).
    ("Qwen/Qwen3-VL-2B-Instruct", 3.96),
    ("Qwen/Qwen3-VL-4B-Instruct", 8.27),
])
def test_bf16_weight_bytes_match_the_measured_models(model, measured_gib):
    assert resolve_model(model).weight_bytes / GIB == pytest.approx(measured_gib, abs=0.01)


def test_fp8_variants_hold_fewer_bytes_and_keep_the_shapes():
    for size in ("2B", "4B", "8B"):
        bf16, fp8 = resolve_model(f"Qwen/Qwen3-VL-{size}-Instruct"), resolve_model(f"Qwen/Qwen3-VL-{size}-Instruct-FP8")
        assert fp8.fp8_checkpoint and not bf16.fp8_checkpoint
        assert 0.5 * bf16.weight_bytes < fp8.weight_bytes < 0.7 * bf16.weight_bytes
        assert fp8.text == bf16.text and fp8.vision == bf16.vision


def test_kv_bytes_per_token_follow_the_config():
    spec = resolve_model("Qwen/Qwen3-VL-4B-Instruct")
    # K and V x 36 layers x 8 KV heads x 128 dims x 2 bytes
    assert spec.kv_bytes_per_token() == 2 * 36 * 8 * 128 * 2
    assert spec.kv_bytes_per_token(1) == spec.kv_bytes_per_token() // 2
    assert spec.kv_bytes_per_token(2, tp=2) == spec.kv_bytes_per_token() // 2


def test_lookup_ignores_case_and_returns_a_copy():
    a = resolve_model("qwen/qwen3-vl-2b-instruct")
    a.weight_bytes = 1
    assert resolve_model("Qwen/Qwen3-VL-2B-Instruct").weight_bytes > GIB


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real safetensors file (header + zero data); returns the data bytes."""
    sizes = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
    header, offset = {}, 0
    for name, (dtype, shp) in tensors.items():
        n = sizes[dtype]
        for d in shp:
            n *= d
        header[name] = {"dtype": dtype, "shape": shp, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return offset


def _checkpoint(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", **cfg}))
    return directory


def test_local_directory_reads_config_and_safetensors_headers(tmp_path):
    d = _checkpoint(tmp_path / "ckpt", shape("tiny"))
    data = _write_safetensors(d / "model.safetensors", {"a": ("BF16", [64, 128]), "b": ("F32", [10])})
    (d / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 1003520, "shortest_edge": 65536}}))
    spec = resolve_model(str(d))
    assert spec.weight_bytes == data == 64 * 128 * 2 + 40
    assert spec.text.layers == 2 and spec.text.kv_heads == 2 and spec.text.head_dim == 16
    assert spec.vision.depth == 2 and spec.vision.deepstack == 1
    assert spec.processor_max_pixels == 1003520


def test_local_directory_prefers_the_index_total(tmp_path):
    d = _checkpoint(tmp_path / "ckpt", shape("4b"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 5 * GIB}, "weight_map": {}}))
    assert resolve_model(str(d)).weight_bytes == 5 * GIB


def test_local_fp8_directory_without_weights_estimates_fp8_bytes(tmp_path):
    """Qwen's layout (the vision tower's linears named in modules_to_not_convert) is the built-in
    -FP8 spec; an ignore list that names them only as "visual" gets the tower quantized, as vLLM
    (exact-name matching) quantizes it."""
    builtin = resolve_model("Qwen/Qwen3-VL-4B-Instruct-FP8")
    qwen = {"quant_method": "fp8", "weight_block_size": [128, 128],
            "modules_to_not_convert": fp8_modules_not_converted(builtin.vision)}
    spec = resolve_model(str(_checkpoint(tmp_path / "qwen", {**shape("4b"), "quantization_config": qwen})))
    assert spec.fp8_checkpoint and not spec.vision_quantized
    assert spec.weight_bytes == builtin.weight_bytes
    short = {**qwen, "modules_to_not_convert": ["visual", "lm_head"]}
    tower = resolve_model(str(_checkpoint(tmp_path / "short", {**shape("4b"), "quantization_config": short})))
    assert tower.vision_quantized
    # the tower's linears in FP8: about half their bf16 bytes fewer
    saved = builtin.weight_bytes - tower.weight_bytes
    assert saved == pytest.approx(builtin.vision.linear_params, rel=0.01)


def test_hf_cache_is_read_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--my-qwen3-vl" / "snapshots" / "0123abcd"
    _checkpoint(snap, shape("2b"))
    (cache / "models--someone--my-qwen3-vl" / "refs").mkdir(parents=True)
    (cache / "models--someone--my-qwen3-vl" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    spec = resolve_model("someone/my-qwen3-vl")
    assert spec.id == "someone/my-qwen3-vl" and spec.text.layers == 28


@pytest.mark.parametrize("bad", ["Qwen/Qwen3-VL-5B-Instruct", "nobody/nothing", "", "../../etc"])
def test_unknown_model_is_a_clear_error(bad):
    with pytest.raises(UnknownModelError, match="unknown model|not supported|config.json"):
        resolve_model(bad)


def test_other_architectures_are_refused(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(UnknownModelError, match="model_type 'llama' is not supported"):
        resolve_model(str(d))


def test_malformed_config_is_a_clear_error(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(UnknownModelError, match="not readable JSON"):
        resolve_model(str(d))


def _text_config(**changes) -> dict:
    cfg = shape("tiny")
    return {**cfg, "text_config": {**cfg["text_config"], **changes}}


@pytest.mark.parametrize(("config", "said"), [
    ("[1, 2]", "is not a JSON object"),
    ("null", "is not a JSON object"),
    (json.dumps({"model_type": "qwen3_vl", "text_config": "x", "vision_config": {}}), "are not JSON objects"),
    (json.dumps({"model_type": "qwen3_vl", **_text_config(num_attention_heads=0, head_dim=None)}),
     "a value a Qwen3-VL config cannot have"),
    (json.dumps({"model_type": "qwen3_vl", **_text_config(hidden_size="wide")}), "a value a Qwen3-VL config cannot have"),
])
def test_a_config_of_the_wrong_shape_is_a_clear_error(tmp_path, config, said):
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(config)
    with pytest.raises(UnknownModelError, match=said):
        resolve_model(str(d))


def test_a_config_saved_as_utf16_is_told_to_be_utf8(tmp_path):
    d = tmp_path / "utf16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", **shape("tiny")}), encoding="utf-16")
    with pytest.raises(UnknownModelError, match="config.json is not UTF-8.*save it as UTF-8"):
        resolve_model(str(d))


def test_weights_cloned_without_git_lfs_are_named_with_the_fix(tmp_path):
    """A clone without git-lfs leaves pointer files where the weights should be: the planner says so
    (it read their first bytes as a header length and ran out of memory)."""
    d = _checkpoint(tmp_path / "clone", shape("tiny"))
    (d / "model-00001-of-00002.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 3986000000\n")
    with pytest.raises(UnknownModelError, match=r"model-00001-of-00002.safetensors is a Git LFS pointer.*git lfs pull"):
        resolve_model(str(d))
    # Sharded (4B, 8B): the index is a real file with the total size, only the shards are pointers.
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 8 * GIB}, "weight_map": {}}))
    with pytest.raises(UnknownModelError, match="Git LFS pointer"):
        resolve_model(str(d))


def test_odd_weight_files_fall_back_to_the_estimate(tmp_path):
    """An index whose metadata is not an object, a header longer than its file: the bytes are estimated."""
    d = _checkpoint(tmp_path / "odd", shape("tiny"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": [1]}))
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    assert resolve_model(str(d)).weight_bytes == resolve_model(str(_checkpoint(tmp_path / "plain", shape("tiny")))).weight_bytes


def test_alternatives_are_fp8_then_smaller():
    assert variants_to_try(resolve_model("Qwen/Qwen3-VL-8B-Instruct"))[:3] == [
        "Qwen/Qwen3-VL-8B-Instruct-FP8", "Qwen/Qwen3-VL-4B-Instruct-FP8", "Qwen/Qwen3-VL-4B-Instruct"]
    assert variants_to_try(resolve_model("Qwen/Qwen3-VL-2B-Thinking-FP8")) == []


def test_a_hub_model_is_found_in_the_cache_vlkit_uses(tmp_path, monkeypatch, tiny_model_dir):
    """A model id that is not built in resolves from VLKIT_HF_CACHE (the cache `make up` mounts and
    `make download` fills), not from huggingface_hub's default folder."""
    import shutil

    from scripts.planner.models import UnknownModelError, resolve_model

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--qwen3-vl-tiny" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", snapshot / "config.json")
    (cache / "models--someone--qwen3-vl-tiny" / "refs").mkdir()
    (cache / "models--someone--qwen3-vl-tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("VLKIT_HF_CACHE", str(cache))
    spec = resolve_model("someone/qwen3-vl-tiny")
    assert spec.id == "someone/qwen3-vl-tiny" and spec.source == str(snapshot)
    monkeypatch.setenv("VLKIT_HF_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(UnknownModelError):
        resolve_model("someone/qwen3-vl-tiny")


@pytest.mark.parametrize("typed, meant", [("Qwen/Qwen3-VL-2B-Instuct", "Qwen/Qwen3-VL-2B-Instruct"),
                                          ("Qwen3-VL-4B-Instruct-FP8", "Qwen/Qwen3-VL-4B-Instruct-FP8"),
                                          ("Qwen/Qwen3-VL-2B-Instruct@main", "Qwen/Qwen3-VL-2B-Instruct")])
def test_a_misspelt_model_is_told_the_id_it_is_close_to(typed, meant, monkeypatch):
    monkeypatch.delenv("VLKIT_VIA_MAKE", raising=False)
    with pytest.raises(UnknownModelError, match=f"did you mean --model {meant}\\?$"):
        resolve_model(typed)


@pytest.mark.parametrize("other", ["Qwen/Qwen3-VL-32B-Instruct", "someone/my-qwen3-vl-finetune"])
def test_another_hub_model_is_told_to_download_not_a_near_name(other, monkeypatch, tmp_path):
    """32B is another model, not a misspelt 2B: it is read once it is in the cache."""
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    monkeypatch.setenv("VLKIT_HF_CACHE", str(tmp_path))
    with pytest.raises(UnknownModelError) as refused:
        resolve_model(other)
    assert "did you mean" not in str(refused.value)
    assert f"`make download MODEL={other}`" in str(refused.value) and str(tmp_path) in str(refused.value)


def test_a_missing_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(UnknownModelError, match="no such folder"):
        resolve_model(str(tmp_path / "not-saved-yet") + "/")


def test_a_file_given_for_the_folder_names_the_folder(tiny_model_dir):
    with pytest.raises(UnknownModelError, match=f"that is a file; give the folder .*\\({tiny_model_dir}\\)"):
        resolve_model(str(tiny_model_dir / "config.json"))


def test_a_windows_path_is_told_where_wsl_sees_it(monkeypatch):
    monkeypatch.setenv("VLKIT_VIA_MAKE", "1")
    with pytest.raises(UnknownModelError) as refused:
        resolve_model(r"C:\Users\Jane Doe\models\Qwen3-VL-2B-Instruct")
    assert str(refused.value).endswith("in WSL that folder is MODEL='/mnt/c/Users/Jane Doe/models/Qwen3-VL-2B-Instruct'")
