"""`nanokit plan`: the memory model from the command line, on the published shapes."""

from __future__ import annotations

import json

import pytest

from nano.cli import main
from nano.memory import GIB
from nano.shapes import shape_config


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for name in ("nano-9b-v2", "nano-12b-v2-base"):
        shape_config(name).save_pretrained(root / name)
        out[name] = root / name
    return out


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_9b_fits_an_a10g_at_128k_and_the_12b_does_not(configs, capsys):
    nine = plan_json(capsys, "--model", str(configs["nano-9b-v2"]), "--gpu", "a10g")
    assert nine["fits"] and nine["max_context"] == 131072 and nine["max_batch"] == 1
    # The brief: 16.56 GiB of weights + 2.0 GiB KV + 0.13 GiB SSM state, about 18.7 GiB.
    state = (nine["weights"] + nine["kv_cache"] + nine["ssm_state"] + nine["conv_state"]) / GIB
    assert abs(state - 18.7) / 18.7 < 0.02
    assert nine["total"] == sum(nine[k] for k in ("weights", "kv_cache", "ssm_state", "conv_state", "workspace",
                                                  "overhead"))
    twelve = plan_json(capsys, "--config", str(configs["nano-12b-v2-base"] / "config.json"), "--gpu", "a10g")
    assert not twelve["fits"] and twelve["max_context"] == 0
    fp8 = plan_json(capsys, "--model", str(configs["nano-12b-v2-base"]), "--gpu", "a10g", "--dtype", "fp8")
    assert fp8["fits"] and fp8["weights"] < twelve["weights"] / 1.9


def test_largest_context_and_batch_are_the_edges_of_fitting(configs, capsys):
    args = ["--model", str(configs["nano-9b-v2"]), "--gpu", "l4", "--context", "8192"]
    result = plan_json(capsys, *args)
    edge = plan_json(capsys, *args[:-1], "8192", "--batch", str(result["max_batch"]))
    beyond = plan_json(capsys, *args[:-1], "8192", "--batch", str(result["max_batch"] + 1))
    assert edge["fits"] and not beyond["fits"]


def test_plan_prints_a_table_and_names_bad_input(configs, capsys):
    assert main(["plan", "--model", str(configs["nano-9b-v2"]), "--gpu", "a10g"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "weights and caches alone: 18.69 GiB" in out
    assert main(["plan", "--model", str(configs["nano-9b-v2"]), "--gpu", "a11g"]) == 2
    assert "unknown GPU 'a11g'" in capsys.readouterr().err
    assert main(["plan", "--model", "/nonexistent", "--gpu", "a10g"]) == 2
    assert "not found" in capsys.readouterr().err


def test_parameter_groups_sum_to_the_count_and_recipes_quantize_theirs():
    from nano.hardware import RECIPES
    from nano.memory import Shape, quantized_groups

    shape = Shape.of(shape_config("nano-12b-v2-base"))
    groups = shape.parameter_groups()
    assert sum(groups.values()) == shape.parameters() == 12310001152
    bf16 = shape.weight_bytes()
    for recipe, quantized in RECIPES.items():
        share = sum(groups[g] for g in quantized)
        assert shape.weight_bytes("bf16", "fp8", recipe) == int(bf16 - share)  # 2 bytes -> 1 byte each
    assert shape.weight_bytes("bf16", "int4_awq", "mamba-mlp") < shape.weight_bytes("bf16", "int4_awq", "mlp")
    assert quantized_groups("int4_awq", "mamba-mlp") == ("mlp", "mamba_out_proj")  # AWQ packing: not the in_proj


def test_a_12b_that_does_not_fit_says_by_how_much_and_what_would(configs, capsys):
    args = ["--model", str(configs["nano-12b-v2-base"]), "--gpu", "a10g"]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "short by 5.18 GiB: it would fit with --quant int4_awq --recipe mamba-mlp" in out
    result = plan_json(capsys, *args)
    assert ["int4_awq", "mamba-mlp"] in result["quantizations_that_fit"]
    assert all(q != "fp8" for q, _ in result["quantizations_that_fit"])  # no FP8 kernels on an A10G (Ampere)
    quantized = plan_json(capsys, *args, "--quant", "int4_awq")
    assert quantized["fits"] and quantized["max_context"] == 131072
    assert main(["plan", *args, "--quant", "fp8"]) == 2
    assert "fp8 does not run on a10g (Ampere: no kernels for it); quantizations that do: int4_awq" in capsys.readouterr().err
    assert plan_json(capsys, "--model", str(configs["nano-12b-v2-base"]), "--gpu", "l40s", "--quant", "fp8")["fits"]


def test_prefill_calls_stay_under_the_scan_kernels_32_bit_offsets():
    from nano.hardware import PREFILL_TOKENS, prefill_chunk

    assert prefill_chunk(1) == 4096 and prefill_chunk(16) == 4096
    assert prefill_chunk(32) == 2048 and prefill_chunk(1000) == 128  # at least one scan chunk per row
    assert all(prefill_chunk(rows) * rows <= PREFILL_TOKENS for rows in range(1, 513))
    assert 22656 * PREFILL_TOKENS < 2**31  # the Nano 9B's Mamba in_proj width


def test_tensor_parallel_figures_are_per_gpu_and_bad_sizes_name_the_dimensions(configs, capsys):
    args = ["--model", str(configs["nano-12b-v2-base"]), "--gpu", "a10g"]
    one, two = plan_json(capsys, *args), plan_json(capsys, *args, "--tp", "2")
    assert two["kv_cache"] == one["kv_cache"] // 2 and two["ssm_state"] == one["ssm_state"] // 2
    embeddings = 131072 * 5120 * 2  # bytes of the input embeddings, whole on every GPU
    assert two["weights"] == pytest.approx((one["weights"] - embeddings) / 2 + embeddings, rel=1e-4)
    assert two["fits"] and not one["fits"]  # the 12B at 128k fits two A10Gs
    assert main(["plan", *args, "--tp", "16"]) == 2
    assert "tensor-parallel size 16 does not divide the attention heads 40, KV heads 8, Mamba groups 8\n" in capsys.readouterr().err


def test_ultra_in_the_configurations_nvidia_tested(capsys):
    from pathlib import Path

    ultra = str(Path(__file__).parent / "data" / "ultra_config.json")
    bf16 = plan_json(capsys, "--config", ultra, "--gpu", "h100", "--tp", "8")
    assert bf16["fits"] and bf16["max_context"] == 131072 and bf16["max_batch"] == 2
    assert bf16["ssm_state"] == 0 and bf16["kv_cache"] == 64 * 2 * 1 * 128 * 2 * 131072  # 64 GQA layers, 1 KV head per GPU
    fp8 = plan_json(capsys, "--config", ultra, "--gpu", "h100", "--tp", "4", "--quant", "fp8")
    assert fp8["fits"] and fp8["max_batch"] == 1
    half = plan_json(capsys, "--config", ultra, "--gpu", "h100", "--tp", "4")
    assert not half["fits"] and ["fp8", None] in half["quantizations_that_fit"]
    assert main(["plan", "--config", ultra, "--gpu", "h100", "--tp", "16"]) == 2
    assert "tensor-parallel size 16 does not divide layer 0's 8 KV heads" in capsys.readouterr().err


def test_which_jetson_boards_hold_the_9b_at_which_precision_and_context(configs, capsys):
    rows = plan_json(capsys, "--model", str(configs["nano-9b-v2"]), "--jetson")
    table = {(r["board"], r["precision"]): r for r in rows}
    assert {p for b, p in table if b.startswith("orin")} == {"fp16", "int8", "int4"}  # Orin: no FP8
    assert {p for b, p in table if b == "thor"} == {"fp16", "fp8", "int4", "nvfp4"}
    # Linear layers at the precision; the embeddings and head (131072 x 4480 each), norms, conv and the
    # Mamba heads' own parameters in fp16: 5.89 GiB at int4, over the Orin 8 GB's 5.5 GiB usable.
    vocab, hidden, linear = 131072, 4480, 8_888_000_000
    sixteen_bit = 2 * vocab * hidden + hidden * 57 + 27 * (12288 * 4 + 12288 + 3 * 128 + 10240)
    linear = table["thor", "fp16"]["weights_gib"] * 2**30 / 2 - sixteen_bit
    int4 = (linear * (0.5 + 2 / 128) + 2 * sixteen_bit) / 2**30
    assert abs(table["orin-8", "int4"]["weights_gib"] - int4) < 0.01 and 5.8 < int4 < 5.95
    assert table["orin-8", "fp16"]["max_context"] == 0 and table["orin-8", "int8"]["max_context"] == 0
    assert table["orin-8", "int4"]["max_context"] == 0  # 9B does not fit an Orin 8 GB even at int4
    assert table["orin-16", "int4"]["full_context"] and 100_000 < table["orin-16", "int8"]["max_context"] < 131072
    assert not table["orin-16", "fp16"]["max_context"]
    assert all(r["full_context"] for r in rows if r["board"] == "thor")
    assert main(["plan", "--model", str(configs["nano-9b-v2"]), "--jetson"]) == 0
    assert "orin-16    12.5G      int8     9.37G  124193" in capsys.readouterr().out


def test_the_engine_slots_fit_the_target_and_one_more_would_not():
    from nano.memory import GIB, engine_plan, engine_slots, plan
    from nano.shapes import shape_config

    config = shape_config("nano-9b-v2")
    for target, context in (("a10g", 131072), ("a10g", 8192), ("h100", 32768), (30.0, 65536)):
        slots = engine_slots(config, target, context, most=4096)
        assert slots >= 1
        assert engine_plan(config, target, context, slots).fits
        assert not engine_plan(config, target, context, slots + 1).fits
    # The slots' state is what a batch of that size holds, its KV as wide as the engine's caches (the context,
    # the scratch column, aligned); one request's prefill at a time, not all of theirs.
    engine, batch = engine_plan(config, "h100", 8192, 16), plan(config, "h100", 8192, 16)
    assert (engine.ssm_state, engine.weights) == (batch.ssm_state, batch.weights)
    assert engine.kv_cache == plan(config, "h100", 8256, 16).kv_cache == batch.kv_cache * 8256 // 8192
    assert engine.workspace < batch.workspace
    # A prefix cache is memory the slots cannot have.
    assert engine_slots(config, "h100", 32768, prefix_cache=8 * GIB, most=4096) < engine_slots(config, "h100", 32768,
                                                                                                  most=4096)
    assert engine_slots(config, "h100", 32768) == 64  # at most 64 by default
    # Prompts prefilled together hold their state until it moves into their slots: memory one at a time does not.
    together = engine_plan(config, "h100", 8192, 16).workspace - engine_plan(config, "h100", 8192, 16, prefill_rows=1).workspace
    # ... twice over: the eager call's, and the caches the short-prompt buckets keep for as many rows.
    assert together > 2 * plan(config, "h100", 1, 8).ssm_state
    assert engine_slots(config, "a10g", 131072, prefill_rows=8) < engine_slots(config, "a10g", 131072, prefill_rows=1)


def test_serve_sizes_its_engine_by_the_planner_and_refuses_what_cannot_fit():
    from types import SimpleNamespace

    import torch

    from demos.workstation.cli import engine_size
    from nano.shapes import shape_config

    model = SimpleNamespace(config=shape_config("nano-9b-v2"), device=torch.device("cpu"))
    assert engine_size(model, 131072, 0)[:2] == (8, 8)  # the CPU's default
    slots, rows, why = engine_size(model, 131072, 0, gpu="a10g")
    # Two slots of 128k, with one prompt prefilled at a time: prefilling two together would leave one.
    assert (slots, rows) == (2, 1) and "a10g" in why and "one prompt prefilled at a time" in why
    assert engine_size(model, 8192, 0, gpu="h200")[:2] == (64, 8)
    with pytest.raises(ValueError, match="not one request of 131072 tokens fits 18 GiB: it needs"):
        engine_size(model, 131072, 0, gpu="18")
