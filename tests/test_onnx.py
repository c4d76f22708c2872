"""`nanokit export onnx`: the loop-free scan against the sequential one, and the exported graphs run by
onnxruntime against the torch model: prefill logits, 32 decode steps, and a greedy generation driven
entirely through onnxruntime. Tolerances: 1e-4 absolute on logits in fp32 (the graphs compute in a
different order than transformers), 5e-2 in fp16 (logits of magnitude about 6)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")

import nano  # noqa: E402
from nano.cli import main  # noqa: E402
from nano.tiny import build_tiny_checkpoint  # noqa: E402
from export.onnx import greedy, onnx_sessions  # noqa: E402
from export.onnx_model import ssd_scan  # noqa: E402
from twins.scan import chunk_scan_sequential  # noqa: E402

FP32_TOLERANCE, FP16_TOLERANCE = 1e-4, 5e-2
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


@pytest.mark.parametrize("length, chunk", [(1, 8), (7, 8), (16, 8), (37, 8), (37, 16)])
def test_the_loop_free_scan_is_the_sequential_scan(length, chunk):
    g = torch.Generator().manual_seed(length)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, dt, B, C = r(2, length, 4, 8), r(2, length, 4) - 2, r(2, length, 2, 16), r(2, length, 2, 16)
    A, D, bias, state = -torch.rand(4, generator=g) * 4, r(4), r(4) * 0.5, r(2, 4, 8, 16)
    for limit in ((0.0, math.inf), (0.05, 2.0)):
        y, final = ssd_scan(x, dt, A, B, C, D, bias, state, limit, chunk)
        y_ref, final_ref = chunk_scan_sequential(x, dt, A, B, C, D, bias, state, dt_limit=limit)
        assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(final, final_ref, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("onnx") / "tiny", seed=1)


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-bundle") / "fp32"
    assert main(["export", "onnx", "--model", str(tiny), "--dtype", "fp32", "--out", str(out)]) == 0
    return out


def test_the_manifest_describes_every_input_and_output(bundle):
    from export.bundle import read_manifest

    manifest = read_manifest(bundle)
    assert manifest["kind"] == "onnx-tensorrt" and {"prefill/model.onnx.data", "decode/model.onnx.data"} <= set(manifest["files"])
    for name, session in zip(("prefill", "decode"), onnx_sessions(bundle)):
        graph = manifest["graphs"][name]
        assert graph["opset"] >= 18
        for listed, actual in ((graph["inputs"], session.get_inputs()), (graph["outputs"], session.get_outputs())):
            assert [(e["name"], e["shape"]) for e in listed] == [(a.name, a.shape) for a in actual]
            assert [e["dtype"] for e in listed] == [ORT_TYPES[a.type] for a in actual]
    import onnx

    for name in ("prefill", "decode"):  # TensorRT's Einsum layer takes at most two inputs
        graph = onnx.load(str(bundle / name / "model.onnx"), load_external_data=False).graph
        assert all(len(n.input) <= 2 for n in graph.node if n.op_type == "Einsum")
    decode = manifest["graphs"]["decode"]
    names = [e["name"] for e in decode["inputs"]]
    # pattern M-M*-M-: Mamba layers 0, 2, 5 carry conv and SSM states, attention layer 3 its K and V
    assert names == ["input_ids", "past_conv.0", "past_ssm.0", "past_conv.2", "past_ssm.2", "past_key_values.3.key",
                     "past_key_values.3.value", "past_conv.5", "past_ssm.5"]
    assert [e["name"] for e in decode["outputs"]][:2] == ["logits", "present_conv.0"]
    assert decode["inputs"][5]["shape"] == ["batch", 2, "past_sequence", 16]
    ssm = decode["inputs"][2]
    assert ssm["dtype"] == "float32" and ssm["shape"] == ["batch", 8, 16, 16]
    assert manifest["graphs"]["prefill"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]


def test_prefill_and_32_decode_steps_match_the_torch_model(bundle, tiny):
    from nano.reference import ReferenceDecoder

    model = nano.load(tiny, device="cpu")
    prefill, decode = onnx_sessions(bundle)
    ids = torch.randint(3, 260, (3, 45), generator=torch.Generator().manual_seed(1))  # not the traced 2 x 21
    outputs = prefill.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
    errors = [float(np.abs(outputs[0] - expected.numpy()).max())]
    reference = ReferenceDecoder(model.model)
    reference.prefill(ids, torch.ones_like(ids))
    past_names = [i.name for i in decode.get_inputs()][1:]
    tokens = torch.randint(3, 260, (32, 3), generator=torch.Generator().manual_seed(2))
    for token in tokens:
        outputs = decode.run(None, {"input_ids": token[:, None].numpy(), **dict(zip(past_names, outputs[1:]))})
        errors.append(float(np.abs(outputs[0][:, -1] - reference.step(token).numpy()).max()))
    print(f"onnxruntime vs torch, fp32: prefill max abs error {errors[0]:.2e}, 32 decode steps {max(errors[1:]):.2e}")
    assert max(errors) < FP32_TOLERANCE


def test_a_greedy_generation_through_onnxruntime_equals_the_torch_one(bundle, tiny):
    model = nano.load(tiny, device="cpu")
    prompt = model.chat.encode(model.chat.render("What is 2 + 2?")[0])
    with torch.no_grad():
        expected = model.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy(bundle, prompt, 32) == expected


def test_fp16_graphs(tiny, tmp_path):
    out = tmp_path / "fp16"
    assert main(["export", "onnx", "--model", str(tiny), "--out", str(out)]) == 0
    prefill, _ = onnx_sessions(out)
    ids = torch.randint(3, 260, (1, 30), generator=torch.Generator().manual_seed(3))
    logits = prefill.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        expected = nano.load(tiny, device="cpu").model(input_ids=ids).logits.numpy()
    assert logits.dtype == np.float16 and np.abs(logits.astype(np.float32) - expected).max() < FP16_TOLERANCE


def test_build_and_bad_input(bundle, tiny, tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    missing = subprocess.run([sys.executable, "-m", "nano.cli", "build", "--bundle", str(bundle)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 3 and "TensorRT (trtexec)" in missing.stderr and "sh build.sh" in missing.stderr
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "trtexec").write_text("#!/bin/sh\nfor a in \"$@\"; do case $a in --onnx=*) test -f \"${a#--onnx=}\" || exit 9;; "
                                  "--saveEngine=*) touch \"${a#--saveEngine=}\";; esac; done\n")
    (fake / "trtexec").chmod(0o755)
    built = subprocess.run([sys.executable, "-m", "nano.cli", "build", "--bundle", str(bundle)], capture_output=True,
                           text=True, timeout=300, env=dict(env, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}"))
    assert built.returncode == 0, built.stderr
    assert (bundle / "prefill.engine").exists() and (bundle / "decode.engine").exists()
    assert main(["export", "onnx", "--model", str(tiny), "--out", str(bundle)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", str(tiny), "--quant", "int4_awq", "--out", str(tmp_path / "q")]) == 2
    assert "--quant int4_awq needs calibration text" in capsys.readouterr().err


def test_int4_awq_graphs_compute_what_their_dequantized_twin_does(tmp_path):
    import jinja2
    import onnx
    from transformers import AutoTokenizer

    from export.onnx_int4 import calibrate_awq
    from nano.data import token_samples

    folder = build_tiny_checkpoint(tmp_path / "m", seed=1, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                   head_dim=16)  # every linear layer's input a multiple of 128
    out = tmp_path / "int4"
    calib = ["--calib", jinja2.__path__[0], "--calib-samples", "8", "--calib-len", "64"]
    assert main(["export", "onnx", "--model", str(folder), "--dtype", "fp32", "--quant", "int4_awq", *calib,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["rewritten"] == {"prefill": 16, "decode": 16} and manifest["graphs"]["decode"]["opset"] == 21
    graph = onnx.load(str(out / "decode" / "model.onnx"), load_external_data=False).graph
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 16 and all({a.name: a.i for a in n.attribute}["block_size"] == 128 for n in dequantize)
    assert {i.data_type for i in graph.initializer if i.name.endswith(".q")} == {onnx.TensorProto.INT4}

    # The slow twin: the torch model with each layer's weight replaced by dq(q) / s, from the same calibration.
    model = nano.load(folder, device="cpu")
    samples = token_samples(jinja2.__path__[0], AutoTokenizer.from_pretrained(folder), 8, 64)
    layers = calibrate_awq(model.model, samples)
    assert sorted({n: layer.alpha for n, layer in layers.items()}.items()) == sorted(manifest["quantization"]["alphas"].items())
    modules = dict(model.model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[name].weight.copy_(layer.dequantized())
        ids = torch.randint(3, 260, (2, 40), generator=torch.Generator().manual_seed(1))
        expected = model.model(input_ids=ids).logits.numpy()
    prefill, _ = onnx_sessions(out, exact=True)
    assert np.abs(prefill.run(None, {"input_ids": ids.numpy()})[0] - expected).max() < FP32_TOLERANCE
    prompt = model.chat.encode(model.chat.render("hi")[0])
    with torch.no_grad():
        twin_tokens = model.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy(out, prompt, 16, exact=True) == twin_tokens


def test_the_int4_rounding_and_its_twin():
    from export.onnx_int4 import Int4Layer, awq_layer, quantize_rtn

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    q, scales = quantize_rtn(w)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7 and scales.shape == (16, 2)
    plain = Int4Layer(q, scales, torch.ones(256), 0.0).dequantized()
    assert (plain - w).abs().max() <= scales.max() / 2 + 1e-6  # round to nearest: half a step at most
    x = torch.randn(64, 256, generator=g) * torch.linspace(0.1, 10, 256)  # a few loud input channels
    chosen = awq_layer(w, x, x.abs().mean(0))
    error = lambda layer: (x @ layer.dequantized().T - x @ w.T).pow(2).mean()  # noqa: E731
    assert error(chosen) <= error(Int4Layer(q, scales, torch.ones(256), 0.0)) and chosen.alpha > 0
