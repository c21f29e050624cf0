"""BitNet b1.58 in PyTorch: the reference every exported graph is checked against (docs/spec.md §4).

Read top to bottom like transformers' `modeling_bitnet.py`: RMSNorm → BitLinear → attention →
MLP → decoder layer → model → causal-LM head. Module names equal the checkpoint's tensor
names (`model.layers.0.self_attn.q_proj.weight`, `...weight_scale`), so loading is a walk
over `state_dict()` keys. Everything computes in float32, in the order the ONNX export uses:

- RMSNorm: `x / sqrt(mean(x·x) + eps) · weight`;
- BitLinear: `s = 127 / max|x|`, `q = round(x·s).clamp(-128, 127)`, `acc = q @ Wᵀ` (integers,
  exact in float32 below 2²⁴), `y = acc / s · weight_scale` (the loader's multiply convention);
  with `quantize_activations = False`: `y = (x @ Wᵀ) · weight_scale`;
- causal GQA attention with HF-convention RoPE, scale `head_dim ** -0.5`, softmax in float32;
- MLP: `down(ffn_sub_norm(relu(gate(u))² · up(u)))`; tied `lm_head = embed_tokens.weight`.

Positions are 0..S-1 on every call (no KV cache). Weights are int8 buffers: the 2b4t
preset takes about 2.1 GB of weights plus 1.3 GB of float32 embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tdpu_tui.engine.model.checkpoint import BitNetConfig, Checkpoint
from tdpu_tui.engine.core.errors import CheckpointError


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        var = (x * x).mean(-1, keepdim=True)
        return x / torch.sqrt(var + self.eps) * self.weight


class BitLinear(nn.Module):
    """Ternary weight [N, K] (int8 in {-1, 0, 1}) and one scale, multiply convention."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(1))
        self.quantize_activations = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float()
        if not self.quantize_activations:
            return (x @ w.T) * self.weight_scale
        amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        # A true division, as ONNX Div and kernels.bitlinear compute it: torch evaluates
        # `127 / tensor` as `127 * tensor.reciprocal()`, which can differ in the last bit.
        s = torch.full_like(amax, 127.0) / amax
        q = (x * s).round().clamp(-128, 127)
        return (q @ w.T) / s * self.weight_scale


def rope(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim] in the HF convention (emb = cat(freqs, freqs))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BitNetAttention(nn.Module):
    def __init__(self, c: BitNetConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = BitLinear(c.hidden_size, self.heads * self.head_dim)
        self.k_proj = BitLinear(c.hidden_size, self.kv_heads * self.head_dim)
        self.v_proj = BitLinear(c.hidden_size, self.kv_heads * self.head_dim)
        self.o_proj = BitLinear(self.heads * self.head_dim, c.hidden_size)
        self.attn_sub_norm = RMSNorm(self.heads * self.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads  # query head h reads kv head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
        o = (probs @ v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(self.attn_sub_norm(o))


class BitNetMLP(nn.Module):
    def __init__(self, c: BitNetConfig):
        super().__init__()
        self.gate_proj = BitLinear(c.hidden_size, c.intermediate_size)
        self.up_proj = BitLinear(c.hidden_size, c.intermediate_size)
        self.down_proj = BitLinear(c.intermediate_size, c.hidden_size)
        self.ffn_sub_norm = RMSNorm(c.intermediate_size, c.rms_norm_eps)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.gate_proj(u))
        return self.down_proj(self.ffn_sub_norm(r * r * self.up_proj(u)))


class BitNetDecoderLayer(nn.Module):
    def __init__(self, c: BitNetConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = BitNetAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = BitNetMLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetModel(nn.Module):
    def __init__(self, c: BitNetConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(BitNetDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        c = self.config
        cos, sin = rope(inputs_embeds.shape[1], c.head_dim, c.rope_theta)
        h = inputs_embeds.float()
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class BitNetForCausalLM(nn.Module):
    def __init__(self, c: BitNetConfig):
        super().__init__()
        self.config = c
        self.model = BitNetModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.requires_grad_(False)

    @property
    def quantize_activations(self) -> bool:
        return all(m.quantize_activations for m in self.modules() if isinstance(m, BitLinear))

    @quantize_activations.setter
    def quantize_activations(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.quantize_activations = bool(on)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits float32 [B, S, V] from `input_ids` [B, S] or `inputs_embeds` [B, S, H]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(torch.as_tensor(input_ids, dtype=torch.long))
        h = self.model(torch.as_tensor(inputs_embeds))
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, head)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> BitNetForCausalLM:
        """Build the model and fill it tensor by tensor: each state_dict key is a checkpoint name."""
        if ckpt.config.hidden_act != "relu2":
            raise CheckpointError(
                f"{ckpt.path}: hidden_act = {ckpt.config.hidden_act!r}: the reference implements 'relu2' only")
        with torch.device("meta"):
            model = cls(ckpt.config)
        state = {}
        for key in model.state_dict():
            module, leaf = key.rsplit(".", 1)
            if leaf == "weight" and isinstance(model.get_submodule(module), BitLinear):
                w, scale_mul = ckpt.ternary(module)
                state[key] = torch.from_numpy(w)
                state[f"{module}.weight_scale"] = torch.tensor([scale_mul], dtype=torch.float32)
            elif leaf != "weight_scale":
                state[key] = torch.from_numpy(ckpt.tensor(key))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
