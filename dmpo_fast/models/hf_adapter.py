"""``DiffusionLM`` adapters for models this package does not implement: any HF model, and Dream.

The generic adapter needs two things from a model: its output projection (``get_output_embeddings()``, a
module with a ``weight [V, H]`` and maybe a ``bias``) and the hidden state that goes into it. It finds the
latter in one of two ways and keeps the first that it can *verify*, once, on a probe input, reproduces the
model's own logits:

1. ``"decoder"``: ``model.get_decoder()(...)``'s ``last_hidden_state`` — the Llama/Qwen layout, where the head
reads
   the decoder output directly. Cheapest: the ``[B, L, V]`` logits are never computed.
2. ``"hook"``: a forward pre-hook on the output projection captures its input during a full ``model(...)``
call —
   works for heads with a transform in front (BERT: dense + act + norm). The model's logits are computed and
   dropped.

The check is ``|hidden @ W.T + b - logits| <= tol`` (after fitting one constant factor, which becomes
``logit_scale``, for models that scale their logits); if neither path passes — soft-capping, a non-linear head
— construction raises ``ValueError`` rather than train against the wrong distribution.

Dream (``model_type "Dream"``, remote code) predicts token i at position i-1, like the AR model it was adapted
from. ``DreamAdapter`` shifts the hidden states right by one so position i predicts token i, as Dream's own
sampler shifts its logits (``cat([logits[:, :1], logits[:, :-1]])``; position 0 reuses its own state and
predicts nothing useful — keep position 0 a prompt token). With padding it passes Dream a boolean ``[B, 1, L,
L]`` key mask and positions that skip the pads (``cumsum(mask) - 1``), as Dream's sampler does.

The adapters have no KV cache (``supports_cache`` is False).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DiffusionLM, check_attention_mask, check_ids
from .peft_support import adapted_head_weight


class HFAdapter(DiffusionLM):
    """Wrap an HF model whose logits are a linear read-out of a hidden state. See the module docstring."""

    shift = False  # Dream-style models set True: position i - 1 predicts token i

    def __init__(self, model: nn.Module, *, mask_id: int, eos_id: int | None = None, check: bool = True):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"model ({type(model).__name__}) has no output projection: get_output_embeddings() must "
                f"return a module with a 2-D weight [V, H], got {type(head).__name__}"
            )
        bias = getattr(head, "bias", None)
        super().__init__(
            model,
            mask_id=mask_id,
            eos_id=eos_id,
            vocab_size=int(weight.shape[0]),
            hidden_size=int(weight.shape[1]) + int(bias is not None),
        )
        self.path = "hook"
        if check:
            self.path, self.logit_scale = self._verify()

    def _head(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    def _raw_head(self):
        head = self._head()
        return head.weight, getattr(head, "bias", None)

    def _call_kwargs(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if attention_mask is None:
            return {"input_ids": ids}
        return {"input_ids": ids, "attention_mask": attention_mask.long()}

    def _run(self, path: str, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Unshifted hidden states ``[B, L, H]`` fed to the output projection, by way of ``path``."""
        base = self.base_model
        kwargs = self._call_kwargs(ids, attention_mask)
        if path == "decoder":
            out = base.get_decoder()(**kwargs)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        captured = []

        def grab(module, args):
            captured.append(args[0])

        handle = self._head().register_forward_pre_hook(grab)
        try:
            base(**kwargs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(f"the output projection ran {len(captured)} times in one forward; expected once")
        return captured[0]

    def _verify(self) -> tuple[str, float]:
        """The hidden-state path whose linear read-out reproduces the model's logits, and the logit scale."""
        base = self.base_model
        weight, bias = self._raw_head()
        weight = adapted_head_weight(base, weight)  # a LoRA adapter already on the head is part of it
        n = 8
        ids = (torch.arange(2 * n, device=weight.device).view(2, n) * 7 + 3) % self.vocab_size
        ids[:, n // 2] = self.mask_id
        was_training = base.training
        base.eval()
        failures = []
        try:
            with torch.no_grad():
                ref = base(**self._call_kwargs(ids, None)).logits.float()
                candidates = ["decoder", "hook"] if hasattr(base, "get_decoder") else ["hook"]
                for path in candidates:
                    try:
                        h = self._run(path, ids, None)
                    # A decoder that does not take these arguments: try the next path.
                    except Exception as err:
                        failures.append(f"{path}: {type(err).__name__}: {err}")
                        continue
                    if tuple(h.shape) != (*ids.shape, weight.shape[1]):
                        failures.append(f"{path}: hidden shape {list(h.shape)}")
                        continue
                    mine = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
                    if mine.shape != ref.shape:
                        failures.append(f"{path}: logits shape {list(mine.shape)} vs {list(ref.shape)}")
                        continue
                    scale = 1.0
                    tol = _tolerance(weight.dtype) * (1.0 + ref.abs().max().item())
                    err = (mine - ref).abs().max().item()
                    if err > tol:  # maybe a constant logit scale (LLaDA's scale_logits, Granite, Cohere ...)
                        scale = ((mine * ref).sum() / (mine * mine).sum().clamp_min(1e-30)).item()
                        err = (mine * scale - ref).abs().max().item()
                    if err <= tol:
                        return path, scale
                    failures.append(f"{path}: max |hidden @ W.T (+ b) - logits| = {err:.3g} > {tol:.3g}")
        finally:
            base.train(was_training)
        raise ValueError(
            f"model ({type(base).__name__}): its logits are not (hidden @ output_embeddings.weight.T + bias) "
            "times a constant, so it cannot be used as a DiffusionLM (soft-capping or a non-linear head?). "
            "Tried " + "; ".join(failures)
        )

    def hidden(self, ids, attention_mask=None, *, cache=None, positions=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError(f"cache is not supported by {type(self).__name__} (supports_cache is False)")
        if positions is not None:
            raise ValueError(
                f"positions is not supported by {type(self).__name__}; the model places tokens itself"
            )
        check_ids(ids)
        check_attention_mask(attention_mask, ids)
        h = self._run(self.path, ids, attention_mask)
        if self.shift:
            # Position i now holds the state that predicts token i.
            h = torch.cat((h[:, :1], h[:, :-1]), dim=1)
        return self._with_bias_column(h)


class DreamAdapter(HFAdapter):
    """Dream-7B (remote code): shifted predictions and Dream's padding convention."""

    shift = True

    def _call_kwargs(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if attention_mask is None:
            return {"input_ids": ids}
        real = attention_mask.bool()
        # Keys only (every query row may attend all real keys): Dream's sampler masks query rows of pads too,
        # which gives NaN hidden states at pads; real positions are identical either way.
        mask = real[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # [B, 1, L, L]
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)  # pads take position 0; they are never attended
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _tolerance(dtype: torch.dtype) -> float:
    # Relative to the largest logit: the read-out is recomputed with the same operands, so float32 agrees to
    # rounding; half types round the model's own logits to ~3 significant digits.
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
