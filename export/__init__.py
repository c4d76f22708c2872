"""Deployment exports: bundles sized by the memory planner, each with a manifest (`export.bundle`).

`export.trtllm` writes TensorRT-LLM bundles (the PyTorch backend's Hugging Face checkpoint; the
DeciLM family's rank files for `trtllm-build` in `export.trtllm_checkpoint`; the thinking-budget
packages in `export.trtllm_budget`) and `export.trtllm_quant` quantizes them through nvidia-modelopt;
`export.edgellm` runs TensorRT Edge-LLM's own exporter for Jetson; `export.onnx` writes standard-ONNX
prefill and decode graphs (`export.onnx_model`; INT4 AWQ in `export.onnx_int4`); `export.cli` is
`nanokit export` and `nanokit build`. `bundled/` holds the files bundles carry verbatim.
"""
