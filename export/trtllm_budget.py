"""The thinking budget a TensorRT-LLM bundle carries: two small packages written beside its checkpoint.

    nanokit_budget/       the logits processor (`ThinkingBudget`, from export/bundled/budget_processor.py),
                          its rule (`rule.py`: nano/budget.py verbatim) and the model's ids (`tokens.json`)
    nanokit_serve_hook/   loaded by `trtllm-serve --custom_module_dirs`: requests ask for a budget in
                          `chat_template_kwargs` (from export/bundled/serve_hook.py)

They need torch and TensorRT-LLM only, not nanokit, whose transformers 5 TensorRT-LLM's environment
(transformers 4.57.3) cannot hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUNDLED = Path(__file__).with_name("bundled")
PROCESSOR_PACKAGE = "nanokit_budget"
HOOK_PACKAGE = "nanokit_serve_hook"


def budget_tokens(chat, vocab_size: int) -> dict:
    """The ids the rule reads, from a model's chat format (`nano.load(...).chat`)."""
    tokenizer = chat.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    n = len(tokenizer)
    texts = (backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False) if backend is not None
             else [tokenizer.decode([i]) for i in range(n)])
    return {
        "open": chat.think.open,
        "close": chat.think.close,
        "close_sequence": list(chat.think.close_sequence),
        "eos": list(chat.think.eos),
        "line_end": chat.line_end_ids.tolist(),
        "blank": [i for i, text in enumerate(texts) if text and not text.strip()],
        "vocab": int(vocab_size),
    }


def write_budget_packages(folder: Path, chat, vocab_size: int) -> None:
    """Write both packages into the bundle folder `folder`."""
    import nano.budget

    processor = folder / PROCESSOR_PACKAGE
    processor.mkdir()
    shutil.copyfile(BUNDLED / "budget_processor.py", processor / "__init__.py")
    shutil.copyfile(nano.budget.__file__, processor / "rule.py")
    (processor / "tokens.json").write_text(json.dumps(budget_tokens(chat, vocab_size)) + "\n")
    hook = folder / HOOK_PACKAGE
    hook.mkdir()
    shutil.copyfile(BUNDLED / "serve_hook.py", hook / "__init__.py")
