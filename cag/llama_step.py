"""A Llama forward step over a shared prefix in a few compiled calls a layer, without transformers' modules.

At one row a decode step is small work in many pieces: through transformers, SmolLM2's
step runs about 1,500 torch operations and 400 module calls, 15-18 ms of a 40 ms step on
this project's machine, against about 24 ms in the compiled loops themselves. This step
calls the same loops in the same order (the block products, the RMSNorms, the rotary
embedding and the shared-prefix attention) with nothing between them but views, and
fuses what shares an input: q|k|v and gate|up are one product each, each normalising its
rows first, and a decode step's rotary embedding, cache write and attention are one call
(``cpu_kernels.rotary_attend``). Every output row of a block product is summed alone, so
fusing changes no bit, and the rotary loop rounds as torch does: the logits are bit for bit
those of the model's own forward.

A question's prefill over the context takes the same step with more tokens a row: its
products go through BLAS, as the layers' own do for more than ``MAX_BLOCK_ROWS`` rows.

It covers what it checks: a Llama model whose linears are all ``BlockReadLinear`` of one
format and whose norms are ``CompiledRMSNorm``, no biases, a SiLU MLP, and a context
prefix the compiled attention reads. Anything else goes through transformers as before.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .block_linear import MAX_BLOCK_ROWS, BlockReadLinear, fuse_block_linears
from .rms_norm import CompiledRMSNorm

__all__ = ["LlamaStep", "llama_step"]

_steps: "weakref.WeakKeyDictionary[Any, LlamaStep | None]" = weakref.WeakKeyDictionary()


class _Layer:
    """One decoder layer's parts, the q|k|v and gate|up block products fused. At a few rows the
    step calls the kernels themselves, not the modules around them: a module call and its checks
    cost about as much as a small kernel, and a step makes 300 of them."""

    def __init__(self, layer: Any) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.qkv: Callable = fuse_block_linears([self.q_proj, self.k_proj, self.v_proj])
        self.gate_up: Callable = fuse_block_linears([self.gate_proj, self.up_proj])
        self.gate_up_sizes = [self.gate_proj.out_features, self.up_proj.out_features]
        self.scaling = attention.scaling

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A prefill's q, k and v of the layer's input, normalised here: each layer's own product,
        through BLAS as the layer does it."""
        x = self.input_norm(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def output(self, x: torch.Tensor, few: bool) -> torch.Tensor:
        return self.o_proj.product(x.contiguous()) if few else self.o_proj(x)

    def mlp(self, x: torch.Tensor, few: bool) -> torch.Tensor:
        """The MLP of the attention's residual, normalised here."""
        if not few:
            x = self.post_norm(x)
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up(x, self.post_norm.weight, self.post_norm.variance_epsilon).split(self.gate_up_sizes, dim=1)
        return self.down_proj.product(F.silu(gate) * up)


class LlamaStep:
    """``step(cache, ids, positions, mask) -> last logits`` over a ``SharedPrefixCache``; see the module."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.model = model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [_Layer(layer) for layer in model.model.layers]

    def __call__(self, cache: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``ids`` and ``positions`` ``[B, L]``; ``mask`` None or ``[B, 1, L, suffix]`` booleans over the
        suffix once these tokens are added (True attends). Returns the last token's logits, ``[B, vocab]``."""
        batch, tokens = ids.shape
        dim, group = self.head_dim, self.heads // self.kv_heads
        few = batch * tokens <= MAX_BLOCK_ROWS
        x = self.model.model.embed_tokens(ids)
        cos, sin = (t.contiguous() for t in self.model.model.rotary_emb(x, positions))
        x = x.view(batch * tokens, -1)
        visible = None if mask is None else mask[:, 0]
        for index, layer in enumerate(self.layers):
            suffix = cache.layers[index]
            if few:
                qkv = layer.qkv(x, layer.input_norm.weight, layer.input_norm.variance_epsilon)
                if not suffix.is_initialized:  # the buffers' shape, from a template with no columns
                    template = x.new_empty(batch, self.kv_heads, 0, dim)
                    suffix.lazy_initialization(template, template)
                key_buffer, value_buffer, start = suffix.open_columns(tokens)
                out = cpu_kernels.rotary_attend(qkv, batch, self.heads, self.kv_heads, cos, sin, layer.scaling, key_buffer,
                                                value_buffer, start, suffix.prefix_keys[0], suffix.prefix_values[0], visible)
            else:
                q, k, v = layer.projections(x)
                query = cpu_kernels.rotary(q.view(batch, tokens, self.heads, dim), cos, sin, layer.scaling, group)
                key = cpu_kernels.rotary(k.view(batch, tokens, self.kv_heads, dim), cos, sin)
                keys, values = suffix.update(key, v.view(batch, tokens, self.kv_heads, dim).transpose(1, 2))
                out = cpu_kernels.attend(query, suffix.prefix_keys[0], suffix.prefix_values[0], keys, values, visible, tokens)
            x = x + layer.output(cpu_kernels.rows_to_tokens(out, batch, tokens).reshape(batch * tokens, -1), few)
            x = x + layer.mlp(x, few)
        last = x.view(batch, tokens, -1)[:, -1]
        return self.model.get_output_embeddings()(self.model.model.norm(last)).float()

    def takes(self, cache: Any) -> bool:
        """Whether this step can run on ``cache``: a prefix in every layer that the compiled
        attention reads."""
        layer = cache.layers[0]
        return layer.prefix_keys is not None and cpu_kernels.usable(layer.prefix_keys, layer.prefix_values)


def llama_step(model: Any) -> LlamaStep | None:
    """The compiled step for ``model``, built once per model; None where it does not cover the model."""
    if model not in _steps:
        _steps[model] = LlamaStep(model) if _covered(model) else None
    return _steps[model]


def _covered(model: Any) -> bool:
    config = model.config
    if getattr(config, "model_type", None) != "llama" or not cpu_kernels.available():
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False) or config.hidden_act != "silu":
        return False
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return False
    for layer in model.model.layers:
        linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if not all(type(m) is BlockReadLinear for m in linears) or len({m.format for m in linears}) != 1:
            return False
        if not all(type(n) is CompiledRMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return False
    return type(model.model.norm) is CompiledRMSNorm
