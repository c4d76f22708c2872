"""The Jetson chat on the CPU: board detection from a faked device tree, the planner's choice, and a
conversation through torch and through an ONNX bundle, with the budget and tokens/s shown."""

from __future__ import annotations

import io

import pytest

from demos.jetson.chat import choose, detect_board, main
from nano.shapes import shape_config


def fake_proc(root, compatible: str, model: str, memory_kib: int):
    tree = root / "device-tree"
    tree.mkdir(parents=True)
    (tree / "compatible").write_bytes(compatible.encode() + b"\0")
    (tree / "model").write_bytes(model.encode() + b"\0")
    (root / "meminfo").write_text(f"MemTotal:       {memory_kib} kB\nMemFree:        1000 kB\n")
    return root


@pytest.mark.parametrize("compatible, model, memory_kib, board", [
    ("nvidia,p3767-0005\0nvidia,tegra234", "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7_800_000, "orin-8"),
    ("nvidia,p3767-0000\0nvidia,tegra234", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15_655_000, "orin-16"),
    ("nvidia,p3701-0004\0nvidia,tegra234", "Jetson AGX Orin", 31_000_000, "orin-32"),
    ("nvidia,p3701-0005\0nvidia,tegra234", "Jetson AGX Orin Developer Kit", 64_000_000, "orin-64"),
    ("nvidia,p3834-0008\0nvidia,tegra264", "NVIDIA Jetson AGX Thor Developer Kit", 128_000_000, "thor"),
    ("raspberrypi,5-model-b\0brcm,bcm2712", "Raspberry Pi 5", 8_000_000, None),
])
def test_the_board_from_the_device_tree(tmp_path, compatible, model, memory_kib, board):
    assert detect_board(fake_proc(tmp_path, compatible, model, memory_kib)) == board


def test_the_planner_chooses_the_most_precise_option_that_fits():
    nine = shape_config("nano-9b-v2").to_dict()
    assert choose(nine, "orin-16", 8192, torch_backend=False)["precision"] == "int8"  # fp16 does not fit 12.5 GiB
    assert choose(nine, "orin-16", 8192, torch_backend=True) is None  # torch runs 16-bit weights only
    assert choose(nine, "orin-32", 131072, torch_backend=True)["precision"] == "fp16"
    assert choose(nine, "orin-8", 8192, torch_backend=False) is None  # int4 holds about 3.8k tokens there


def chat(args, lines):
    out = io.StringIO()
    status = main(args, stdin=io.StringIO("".join(f"{line}\n" for line in lines)), out=out)
    return status, out.getvalue()


def test_a_conversation_on_the_torch_backend(tmp_path):
    proc = fake_proc(tmp_path, "nvidia,p3767-0000\0nvidia,tegra234", "Jetson Orin NX", 15_655_000)
    status, text = chat(["--proc", str(proc)], ["What is 12 + 7?", "/budget 8", "What is 345 - 67?", "/quit"])
    assert status == 0
    assert text.startswith("orin-16: fp16 weights") and "[thinking]" in text and "\\boxed{19}" in text
    assert "budget: 8" in text and "budget reached" in text and "tokens/s)" in text


def test_a_conversation_through_an_onnx_bundle(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from export.onnx import export_onnx

    bundle = tmp_path / "bundle"
    export_onnx("nano-tiny", bundle, "fp32")
    status, text = chat(["--device", "orin-8", "--bundle", str(bundle), "--context", "2048"],
                        ["What is 12 + 7?", "/think off", "What is 2 + 2?", "/quit"])
    assert status == 0 and "ONNX graphs on onnxruntime (CPUExecutionProvider)" in text  # no TensorRT here
    assert "\\boxed{19}" in text and "reasoning off" in text
    last = text.split("reasoning off", 1)[1]
    assert "[thinking]" not in last and "0 reasoning +" in last


def test_a_context_that_does_not_fit_is_told_what_would():
    status, text = chat(["--device", "orin-8", "--context", "100000"], [])  # nano-tiny was built for 4096
    assert status == 2
    assert "orin-8: the model does not fit at 100000 tokens with this backend; the planner allows fp16 up to" in text
