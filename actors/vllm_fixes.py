"""A fix applied to vLLM inside the engine process, for a case vLLM 0.32 gets wrong.

Prompt log-probs with LoRA enabled (teacher.placement=engines under model.lora): vLLM computes them one request at a
time, one logits row per prompt token, but its CPU LoRA path for the logits (`PunicaWrapperCPU.add_lora_logits`)
indexes the rows with the batch's per-*sequence* adapter indices, so the shapes disagree and the engine fails
(vLLM issues #16668, #29955). Every prompt token of a request uses that request's adapter; the engine's scoring calls
put one adapter (or none) in a batch, so the rows all take the batch's one index. A batch of several adapters still
fails, with a message. The GPU path does not fail; it leaves out an lm_head adapter's delta (vLLM issue #51594), which
the config refuses (no lm_head in model.lora.target_modules with the teacher on the engines).
"""

from __future__ import annotations


def patch_lora_prompt_logprobs() -> None:
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, "per_token_rows", False):
        return

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        import torch

        rows, indices = x.view(-1, x.shape[-1]).size(0), self.sampler_indices
        if rows == indices.numel():  # one row per sequence: sampling, as vLLM means it
            return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        if not bool((indices == indices[0]).all()):
            raise RuntimeError("prompt log-probs of a batch that mixes LoRA adapters: score one adapter per call")
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        per_row = indices[:1].expand(rows)
        buffer = torch.zeros((rows, lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        bgmv_shrink(flat_x, lora_a_stacked, buffer, per_row, scale)
        bgmv_expand(buffer, lora_b_stacked, flat_y, per_row, add_inputs=True)

    add_lora_logits.per_token_rows = True
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
