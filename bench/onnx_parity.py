"""The ONNX export against the torch model on a tiny checkpoint: largest absolute logit error of the
prefill and of 32 decode steps run by onnxruntime, and whether a 32-token greedy generation through
onnxruntime equals the torch one; fp32 and fp16 graphs.

    python -m bench.onnx_parity
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


from bench.record import write

import nano
from export.onnx import export_onnx, greedy, onnx_sessions
from nano.reference import ReferenceDecoder
from nano.tiny import build_tiny_checkpoint


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_checkpoint(Path(tmp) / "tiny", seed=1)
        model = nano.load(folder, device="cpu")
        for dtype in ("fp32", "fp16"):
            bundle = Path(tmp) / dtype
            export_onnx(folder, bundle, dtype)
            prefill, decode = onnx_sessions(bundle)
            ids = torch.randint(3, 260, (3, 45), generator=torch.Generator().manual_seed(1))
            outputs = prefill.run(None, {"input_ids": ids.numpy()})
            with torch.no_grad():
                expected = model.model(input_ids=ids).logits
            prefill_error = float(np.abs(outputs[0].astype(np.float32) - expected.numpy()).max())
            reference = ReferenceDecoder(model.model)
            reference.prefill(ids, torch.ones_like(ids))
            names = [i.name for i in decode.get_inputs()][1:]
            step_error = 0.0
            for token in torch.randint(3, 260, (32, 3), generator=torch.Generator().manual_seed(2)):
                outputs = decode.run(None, {"input_ids": token[:, None].numpy(), **dict(zip(names, outputs[1:]))})
                step_error = max(step_error, float(np.abs(outputs[0][:, -1].astype(np.float32) - reference.step(token).numpy()).max()))
            prompt = model.chat.encode(model.chat.render("What is 2 + 2?")[0])
            with torch.no_grad():
                torch_tokens = model.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            rows.append(dict(dtype=dtype, prefill_max_abs_error=prefill_error, decode_32_steps_max_abs_error=step_error,
                             max_abs_logit=round(float(expected.abs().max()), 2),
                             greedy_32_equal=greedy(bundle, prompt, 32) == torch_tokens))
    write("onnx-parity-tiny", rows, list(rows[0]), "cpu", model="nano.tiny tiny_config (pattern M-M*-M-)")


if __name__ == "__main__":
    main()
