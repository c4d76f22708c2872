"""Run inside transformers 4.57.3's environment (TensorRT-LLM 1.2.1's pin): read a checkpoint folder's
config, tokenizer and generation config the way TensorRT-LLM's PyTorch backend does, and print what
came back as JSON. No TensorRT-LLM or nanokit code is imported; what it does is from its sources
(tests/data/trtllm_1_2_1_reads.json, "config_loading" and "tokenizer"):

- `ModelLoader` loads the config with `trust_remote_code=True` whatever the user passed, through
  `AutoConfig.from_pretrained`; TensorRT-LLM's `modeling_nemotron_h` first registers an empty
  `NemotronHConfig` for "nemotron_h", which serves when the folder has no `auto_map`;
- `NemotronHForCausalLM.__init__` takes `rms_norm_eps` (else `layer_norm_epsilon`) and assigns it back;
- the tokenizer: `AutoTokenizer.from_pretrained(folder, legacy=False, padding_side="left",
  truncation_side="left", trust_remote_code=False, use_fast=True)`;
- `GenerationConfig.from_pretrained(folder)`.

    python trtllm_config_probe.py FOLDER '["hidden_size", ...]' '[{"role": "user", "content": "Hi"}]'
"""

import json
import math
import sys

import transformers
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig


class _StubNemotronHConfig(PretrainedConfig):
    model_type = "nemotron_h"


def _plain(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def read(folder: str, names: list[str], messages: list[dict]) -> dict:
    AutoConfig.register("nemotron_h", _StubNemotronHConfig)
    report = {"transformers": transformers.__version__, "configs": {}}
    for trust in (True, False):
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        except Exception as e:  # reported, not raised: the test says which path failed
            report["configs"][str(trust)] = {"error": f"{type(e).__name__}: {e}"}
            continue
        values = {name: _plain(getattr(config, name)) for name in names if hasattr(config, name)}
        entry = {"class": f"{type(config).__module__}.{type(config).__name__}", "values": values,
                 "missing": [name for name in names if not hasattr(config, name)]}
        try:
            eps = config.rms_norm_eps if hasattr(config, "rms_norm_eps") else config.layer_norm_epsilon
            config.rms_norm_eps = eps
            entry["eps_assigned"] = eps
        except Exception as e:
            entry["eps_error"] = f"{type(e).__name__}: {e}"
        report["configs"][str(trust)] = entry
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, legacy=False, padding_side="left", truncation_side="left",
                                                  trust_remote_code=False, use_fast=True)
        ids = tokenizer.encode("<think>\nstep\n</think>\nanswer", add_special_tokens=False)
        report["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "prompt": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            "prompt_ids": tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True),
            "decoded": tokenizer.decode(ids, skip_special_tokens=True),
            "eos_token_id": tokenizer.eos_token_id,
        }
    except Exception as e:
        report["tokenizer"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        report["generation_config"] = _plain(GenerationConfig.from_pretrained(folder).to_dict())
    except Exception as e:
        report["generation_config"] = {"error": f"{type(e).__name__}: {e}"}
    return report


if __name__ == "__main__":
    print(json.dumps(read(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
