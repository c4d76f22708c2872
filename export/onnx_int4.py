"""INT4 AWQ weights in the ONNX graphs: weight-only, blocks of 128 input channels, for Orin and Thor.

AWQ (activation-aware weight quantization) in its light form, as modelopt's awq_lite: for each linear
layer, input channels that carry large activations are scaled up before rounding (so they lose less)
and their activations scaled down by the same factor. The factor is s = mean|x|^alpha per channel,
alpha chosen per layer from 0, 0.1, ..., 1 to minimise the layer's output error on calibration
activations. In the graph a layer becomes

    Mul(x, 1/s) -> MatMul(., DequantizeLinear(W_int4, scales, axis=0, block_size=128))

in standard ONNX (opset 21, which added int4 and block-wise dequantization; TensorRT 10 builds it
into weight-only INT4 GEMMs). The layers quantized are the Mamba projections, the attention
projections and the MLPs; embeddings, the head, the conv and the norms stay in 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 128
ALPHAS = [i / 10 for i in range(11)]
LAYERS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass
class Int4Layer:
    """A linear layer's INT4 form: q (out, in) in -8..7, scales (out, in / block), the activation scale s (in,)."""

    q: torch.Tensor
    scales: torch.Tensor
    s: torch.Tensor
    alpha: float

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with, s folded back: W' = dq(q) / s (the slow twin of the graph)."""
        w = self.q.float() * self.scales.float().repeat_interleave(self.q.shape[1] // self.scales.shape[1], dim=1)
        return w / self.s.float()[None, :]


def quantize_rtn(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest INT4 over blocks of `block` input channels: q in -8..7 and scales."""
    out, width = w.shape
    blocks = w.float().reshape(out, width // block, block)
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-8) / 7
    q = torch.clamp(torch.round(blocks / scales[..., None]), -8, 7).reshape(out, width).to(torch.int8)
    return q, scales


def awq_layer(w: torch.Tensor, x: torch.Tensor, mean_abs: torch.Tensor, block: int = BLOCK) -> Int4Layer:
    """The alpha among ALPHAS whose scaling gives the smallest output error on activations `x` (T, in)."""
    reference = x.float() @ w.float().T
    best = None
    for alpha in ALPHAS:
        s = mean_abs.float().clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q, scales = quantize_rtn(w.float() * s[None, :], block)
        layer = Int4Layer(q, scales, s, alpha)
        error = (x.float() @ layer.dequantized().T - reference).pow(2).mean().item()
        if best is None or error < best[0]:
            best = (error, layer)
    return best[1]


def calibrate_awq(model, calibration: torch.Tensor, keep_tokens: int = 512) -> dict[str, Int4Layer]:
    """INT4 AWQ for every quantizable linear layer of a NemotronH model, from calibration token ids
    (samples, length): mean |x| per input channel over all tokens, the alpha search on the first
    `keep_tokens` of them."""
    modules = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n and n.rsplit(".", 1)[-1] in LAYERS
               and m.in_features % BLOCK == 0}
    sums, counts, kept = {}, {}, {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            have = kept.get(name)
            if have is None or have.shape[0] < keep_tokens:
                kept[name] = x[:keep_tokens] if have is None else torch.cat([have, x])[:keep_tokens]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for sample in calibration:
                model(input_ids=sample[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: awq_layer(m.weight.detach(), kept[n], sums[n] / counts[n]) for n, m in modules.items()}


def apply_to_graph(path, model, layers: dict[str, Int4Layer], dtype: torch.dtype) -> int:
    """Rewrite the ONNX graph at `path` (weights as external data) so each layer in `layers` runs from
    INT4: its transposed weight initializer (found by value) replaced by int4 values and scales
    through DequantizeLinear, its activation input multiplied by 1/s. Returns the layers rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
    modules = dict(model.named_modules())
    by_bytes = {}
    for name in layers:
        w = modules[name].weight.detach().to(dtype).T.contiguous().numpy()
        by_bytes[w.tobytes()] = name
    initializers = {i.name: i for i in graph.initializer}
    rewritten = 0
    new_nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            array = numpy_helper.to_array(initializers[node.input[1]])
            name = by_bytes.get(array.astype(np_dtype).tobytes()) if array.dtype == np_dtype else None
            if name is not None:
                layer, tag = layers[name], f"int4.{name}"
                q = layer.q.T.contiguous().numpy().astype(np.int8)  # (in, out), blocks along the input axis
                scales = layer.scales.T.contiguous().numpy().astype(np_dtype)  # (in / block, out)
                graph.initializer.extend([
                    helper.make_tensor(f"{tag}.q", TensorProto.INT4, list(q.shape), q.flatten().tolist()),
                    numpy_helper.from_array(scales, f"{tag}.scales"),
                    numpy_helper.from_array((1.0 / layer.s.float()).numpy().astype(np_dtype), f"{tag}.inverse_s"),
                ])
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", f"{tag}.scales"], [f"{tag}.w"],
                                                  axis=0, block_size=BLOCK))  # out in the scales' dtype
                new_nodes.append(helper.make_node("Mul", [node.input[0], f"{tag}.inverse_s"], [f"{tag}.x"]))
                node.input[0], node.input[1] = f"{tag}.x", f"{tag}.w"
                rewritten += 1
        new_nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    for opset in graph_model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)  # int4 and block-wise DequantizeLinear
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save(graph_model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    return rewritten
