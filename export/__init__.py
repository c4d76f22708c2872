"""Deployment exports: bundles sized by the memory planner.

`export.trtllm` writes a TensorRT-LLM (PyTorch backend) bundle, `export.quantize` quantizes through
nvidia-modelopt with the exclusions hybrid models need, `export.bundle` holds the manifest, and
`export.cli` is `nanokit export` and `nanokit build`.
"""
