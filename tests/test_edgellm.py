"""`nanokit export edgellm`: TensorRT Edge-LLM's own exporter (0.11.0, in a virtual environment with
its pins: tests/other_envs.py) really runs on nano-tiny, on a pruned tiny model and with its INT4
quantizer; the bundle holds the graph the board builds, sized by the planner. Bad input is refused
before anything is written, and a failing or incomplete export leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nano
from nano.cli import main
from nano.config import layer_pattern
from other_envs import EDGELLM, python_with

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "nano" / "models" / "nano-tiny"


@pytest.fixture(scope="module")
def exporter():
    return python_with("edgellm", EDGELLM).with_name("tensorrt-edgellm-export")


def _graph(folder: Path) -> dict:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in [*model.graph.input, *model.graph.output]}
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    return {"io": io, "ops": ops}


def _check_bundle(out: Path, source: Path, batch: int, context: int) -> dict:
    from export.bundle import read_manifest

    manifest = read_manifest(out)  # every file's sha256 checked
    assert manifest["kind"] == "tensorrt-edge-llm" and manifest["exporter"]["version"] == "0.11.0"
    llm = out / "onnx" / "llm"
    config = json.loads((source / "config.json").read_text())
    runtime = json.loads((llm / "config.json").read_text())
    pattern = layer_pattern(config)
    assert runtime["model"] == "nemotron_h" and runtime["num_hidden_layers"] == len(pattern)
    assert runtime["hidden_size"] == config["hidden_size"]
    assert runtime["num_linear_attn_layers"] == pattern.count("M") and runtime["num_attention_layers"] == pattern.count("*")
    assert runtime["recurrent_state_num_heads"] == config["mamba_num_heads"]
    graph = _graph(llm)
    conv_dim = config["mamba_num_heads"] * config["mamba_head_dim"] + 2 * config["n_groups"] * config["ssm_state_size"]
    assert graph["io"]["inputs_embeds"][1] == config["hidden_size"]
    assert graph["io"]["conv_state_0"][1:] == [conv_dim, config["conv_kernel"]]
    assert graph["io"]["recurrent_state_0"][1:] == [config["mamba_num_heads"], config["mamba_head_dim"],
                                                     config["ssm_state_size"]]
    assert sum(name.startswith("past_key_values_") for name in graph["io"]) == pattern.count("*")
    assert {("trt_edgellm", "causal_conv1d"), ("trt_edgellm", "update_ssm_state")} <= graph["ops"]
    # The runtime looks the tokens up in the exporter's embedding table: the checkpoint's, in fp16.
    embedding = load_file(llm / "embedding.safetensors")["embedding"]
    ours = nano.load(source, device="cpu").model.get_input_embeddings().weight
    assert embedding.dtype == torch.float16 and torch.equal(embedding, ours.to(torch.float16))
    assert (llm / "chat_template.jinja").read_text() == (source / "chat_template.jinja").read_text()
    build = (out / "build.sh").read_text()
    assert f"--maxBatchSize {batch} " in build and f"--maxKVCacheCapacity {context} " in build
    assert os.stat(out / "build.sh").st_mode & stat.S_IXUSR and os.stat(out / "run.sh").st_mode & stat.S_IXUSR
    request = json.loads((out / "input.json").read_text())
    assert request["requests"][1]["messages"][0]["content"] == "/no_think"
    return manifest


def test_nano_tiny_through_edgellms_exporter(exporter, tmp_path, capsys):
    out = tmp_path / "tiny-orin"
    assert main(["export", "edgellm", "--model", "nano-tiny", "--board", "orin-8", "--exporter", str(exporter),
                 "--out", str(out)]) == 0
    assert "exported by tensorrt-edgellm 0.11.0" in capsys.readouterr().out
    manifest = _check_bundle(out, TINY, batch=1, context=8192)
    assert manifest["target"] == {"board": "orin-8", "context": 8192, "batch": 1, "max_input": 4096}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["chosen"]["board"] == "orin-8" and plan["chosen"]["full_context"]
    assert "Loaded 85 tensors, skipped 0" in (out / "export.log").read_text()
    assert main(["build", "--bundle", str(out)]) == 3  # no llm_build here: the commands are printed
    assert "llm_build" in (out / "build.sh").read_text() and "sh build.sh" in capsys.readouterr().err


def test_a_pruned_tiny_model_through_edgellms_exporter(exporter, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--teacher", "nano-tiny", "--hidden", "192", "--ffn", "512", "--mamba-heads", "8",
                 "--calib", str(ROOT / "nano"), "--samples", "8", "--length", "128", "--device", "cpu",
                 "--out", str(pruned)]) == 0
    config = json.loads((pruned / "config.json").read_text())
    assert config["num_hidden_layers"] == 14 and config["hybrid_override_pattern"] == "M-M-M*-M-M-M*-"
    out = tmp_path / "pruned-bundle"
    assert main(["export", "edgellm", "--model", str(pruned), "--context", "2048", "--batch", "2",
                 "--exporter", str(exporter), "--out", str(out)]) == 0
    _check_bundle(out, pruned, batch=2, context=2048)


def test_int4_awq_through_edgellms_quantizer(exporter, tmp_path):
    out = tmp_path / "tiny-int4"
    assert main(["export", "edgellm", "--model", "nano-tiny", "--quant", "int4_awq", "--calib", str(ROOT / "README.md"),
                 "--calib-samples", "8", "--calib-len", "128", "--board", "orin-16", "--exporter", str(exporter),
                 "--out", str(out)]) == 0
    graph = _graph(out / "onnx" / "llm")
    assert ("trt_edgellm", "Int4GroupwiseGemmPluginV2") in graph["ops"]
    log = (out / "export.log").read_text()
    assert "tensorrt-edgellm-quantize llm" in log and ", skipped 0" in log.split("tensorrt-edgellm-export")[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"format": "int4_awq", "precision": "int4"}


def test_the_exporter_beside_nanokit(tmp_path):
    """`pip install "nanokit[edgellm]"` puts Edge-LLM's exporter in nanokit's own environment."""
    beside = Path(sys.executable).with_name("tensorrt-edgellm-export")
    if not beside.exists():
        pytest.skip("tensorrt-edgellm is not installed beside nanokit (the edgellm extra)")
    out = tmp_path / "beside"
    assert main(["export", "edgellm", "--model", "nano-tiny", "--out", str(out)]) == 0
    _check_bundle(out, TINY, batch=1, context=8192)


def _fake_exporter(folder: Path, script: str) -> Path:
    tool = folder / "tensorrt-edgellm-export"
    tool.write_text(f"#!{sys.executable}\nimport sys, pathlib\n{script}\n")
    tool.chmod(0o755)
    return tool


def test_a_failing_or_incomplete_export_leaves_nothing(tmp_path):
    failing = _fake_exporter(tmp_path, "print('KeyError: num_hidden_layers'); sys.exit(1)")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="tensorrt-edgellm-export exited with status 1:\nKeyError: num_hidden_layers"):
        from export.edgellm import export_edgellm

        export_edgellm("nano-tiny", out, exporter=failing)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    (tmp_path / "b").mkdir()
    skipping = _fake_exporter(tmp_path / "b", "out = pathlib.Path(sys.argv[2]) / 'llm'; out.mkdir(parents=True)\n"
                              "print('Loaded 1 tensors, skipped 148')")
    with pytest.raises(RuntimeError, match="loaded 1 tensors and skipped 148"):
        export_edgellm("nano-tiny", out, exporter=skipping)
    assert not out.exists()


def test_bad_input_is_refused_saying_what_would_work(tmp_path, capsys):
    def refused(*args):
        assert main(["export", "edgellm", *args]) == 2
        return capsys.readouterr().err

    assert "orin-8 does not run fp8 engines" in refused("--model", "nano-tiny", "--quant", "fp8", "--board", "orin-8",
                                                        "--out", str(tmp_path / "x"))
    assert "not a Jetson board; known: orin-8" in refused("--model", "nano-tiny", "--board", "a10g", "--out", "x")
    assert "--context 9000 is beyond the model's 8192 positions" in refused("--model", "nano-tiny", "--context", "9000",
                                                                             "--out", "x")
    assert "--exporter /nowhere: no such file" in refused("--model", "nano-tiny", "--exporter", "/nowhere",
                                                          "--out", str(tmp_path / "x"))
    no_template = tmp_path / "no-template"
    shutil.copytree(TINY, no_template)
    (no_template / "chat_template.jinja").unlink()
    assert "no chat template" in refused("--model", str(no_template), "--out", "x")
    (tmp_path / "exists").mkdir()
    assert "already exists; pass --force" in refused("--model", "nano-tiny", "--out", str(tmp_path / "exists"))
    assert "--quant int4_awq needs calibration text" in refused("--model", "nano-tiny", "--quant", "int4_awq",
                                                                "--out", str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_9b_on_each_board_from_its_config(tmp_path, capsys):
    from nano.shapes import shape_config

    folder = tmp_path / "nano-9b"
    shape_config("nano-9b-v2").save_pretrained(folder)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(TINY / name, folder / name)
    assert main(["export", "edgellm", "--model", str(folder), "--quant", "int4_awq", "--dry-run"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "weights   5.89 GiB  does not fit" in lines["orin-8"]  # embeddings and head stay fp16
    assert "up to 131072 tokens (all)" in lines["orin-16"]
    assert main(["export", "edgellm", "--model", str(folder), "--board", "orin-16", "--dry-run"]) == 2
    assert "it would fit with --quant int8_sq or --quant int4_awq" in capsys.readouterr().err
