"""A stand-in for TensorRT-LLM 1.2.1's PyTorch engine loop, as far as logits processors see it.

What it does, from TensorRT-LLM's sources (read with the search tools; 1.2.1 is release/1.2.1,
commit 376f7e1bd8ed543f75014309e3fd4b237e9b0e73 by the Triton backend's submodule pin; the files
below were read at stored versions of the 1.2 line, which the index holds at other commits):

- `tensorrt_llm/sampling_params.py`: `LogitsProcessor.__call__(req_id, logits, token_ids,
  stream_ptr, client_id)`, "expected to inplace modify the logits"; `SamplingParams.logits_processor`
  is one processor or a list applied in order (PyTorch backend).
- `tensorrt_llm/executor/base_worker.py`: the processors travel to the executor by pickle, as
  `py_logits_post_processors` (always a list).
- `tensorrt_llm/_torch/pyexecutor/model_engine.py`, `PyTorchModelEngine._execute_logit_post_processors`,
  called from `forward()` after the eager step or the CUDA-graph replay: requests in
  `scheduled_requests.all_requests()` order (context first); `token_ids = request.get_tokens(0)`
  (prompt + generated, beam 0); a context request is skipped when `py_orig_prompt_len < len(token_ids)`;
  each processor is checked to take 4 or 5 parameters and called as
  `lp(request.py_request_id, logits[idx].view(1, 1, -1), [token_ids], None, None)`; logits are
  float32 (`modules/logits_processor.py` casts the head's output). Earlier chunks of a chunked
  prefill are context requests too and get the same call.
- With the overlap scheduler (`disable_overlap_scheduler: false`, the default) the next step's
  forward runs before the previous step's token is appended to the request: `overlap=True` here
  hands the processor ids one token behind on decode steps.

Sampling is greedy over what the processors leave.
"""

from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass, field

import torch


@dataclass
class Request:
    req_id: int
    prompt: list[int]
    processors: list
    max_tokens: int
    end_ids: tuple[int, ...]
    generated: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    """Runs requests to the end, calling their processors as TensorRT-LLM 1.2.1 does."""

    def __init__(self, logits_of, vocab: int, prefill_chunks: int = 1, overlap: bool = False, device: str = "cpu"):
        self.logits_of = logits_of  # (request index, generated ids) -> a logits row (vocab,)
        self.vocab, self.prefill_chunks, self.overlap, self.device = vocab, prefill_chunks, overlap, device
        self.calls: list[tuple[int, int, tuple]] = []  # (req_id, len(token_ids[0]), logits shape)

    def add(self, req_id: int, prompt: list[int], logits_processor, max_tokens: int, end_ids) -> Request:
        processors = logits_processor if isinstance(logits_processor, list) else [logits_processor]
        processors = pickle.loads(pickle.dumps(processors))  # as the executor worker receives them
        return Request(req_id, list(prompt), processors, max_tokens, tuple(end_ids))

    def _process(self, requests: list[Request], logits: torch.Tensor, visible: list[list[int]]) -> None:
        for idx, request in enumerate(requests):
            token_ids = request.prompt + visible[idx]
            row = logits[idx].view(1, 1, -1)
            for lp in request.processors:
                assert 4 <= len(inspect.signature(lp).parameters) <= 5
                lp(request.req_id, row, [token_ids], None, None)
                self.calls.append((request.req_id, len(token_ids), tuple(row.shape)))
            logits[idx] = row.view(-1)

    def run(self, requests: list[Request]) -> list[list[int]]:
        index = {id(r): i for i, r in enumerate(requests)}
        # Context phase: earlier prefill chunks are processed and their rows thrown away.
        for _ in range(self.prefill_chunks - 1):
            scratch = torch.stack([self.logits_of(index[id(r)], []) for r in requests]).float().to(self.device)
            self._process(requests, scratch, [[] for _ in requests])
        live = list(requests)
        first = True
        while live:
            logits = torch.stack([self.logits_of(index[id(r)], r.generated) for r in live]).float().to(self.device)
            lag = self.overlap and not first
            self._process(live, logits, [r.generated[:-1] if lag else r.generated for r in live])
            chosen = logits.argmax(dim=-1).tolist()
            for request, token in zip(live, chosen):
                assert logits[live.index(request), token] > float("-inf"), "every token was masked"
                request.generated.append(token)
                if token in request.end_ids or len(request.generated) >= request.max_tokens:
                    request.done = True
            live = [r for r in live if not r.done]
            first = False
        return [r.generated for r in requests]
