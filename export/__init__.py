"""Deployment exports: TensorRT-LLM (A10G to 8 x H100) and ONNX for Jetson.

Not built yet: see the export issues. Nothing here is importable API.
"""
