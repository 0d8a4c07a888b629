"""A lean prefill/decode path for plain Llama causal LMs, used by :func:`alignflow.rollout.generation.sample`.

Why: on CPU a decode step of a small model (e.g. 8 layers, hidden 256) is overhead-bound. The HF forward spends
most of its time in Python module dispatch, mask construction and the cache object, not in FLOPs. Here each
layer is ~15 tensor ops: a fused QKV projection, RoPE on q and k together, a write into a preallocated KV cache,
one ``scaled_dot_product_attention`` over the filled part of the cache, a fused gate+up projection.

Numerics follow ``transformers`` 5.x ``modeling_llama``: RMSNorm in float32 then cast back and scaled by the
weight, ``rotate_half`` RoPE with the model's own cos/sin (so ``rope_parameters`` scaling is whatever the model
computes), attention scale ``head_dim ** -0.5``, SiLU-gated MLP. Logits agree with the HF forward to float
rounding (tested at ``atol=1e-5`` in float32).

Weights: the policy is trained between rollouts (in place), so a :class:`FastLlama` must not outlive one
:func:`sample` call. Unfused weights (o_proj, down_proj, norms, embedding, lm_head) are the live parameter
tensors; the fused QKV and gate+up weights are concatenated fresh by :func:`build_fast_llama` (a copy of ~70% of
the parameters; cheap next to the decode loop — ~1.5 ms per call at 10M parameters, into buffers kept per model).

Eligibility is deliberately narrow (:func:`fast_ineligibility`): exactly ``LlamaForCausalLM`` with unmodified
submodules. Anything else — PEFT/LoRA wrappers or injected adapter layers, biases in attention/MLP, hooks,
dropout active in training mode, RoPE types whose frequencies depend on the sequence length, dtypes other than
float32/bfloat16 — falls back to the HF forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# RoPE types whose inverse frequencies are fixed at construction; "dynamic" and "longrope" change them with the
# sequence length (``dynamic_rope_update``), which a precomputed table cannot follow.
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
_DTYPES = (torch.float32, torch.bfloat16)


def fast_ineligibility(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the fast path, or None when it can."""
    try:
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaDecoderLayer,
            LlamaForCausalLM,
            LlamaMLP,
            LlamaModel,
            LlamaRMSNorm,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers Llama classes unavailable"

    if hasattr(model, "peft_config"):
        return "PEFT-wrapped model"
    # Exact types: a subclass may override forward, and adapter libraries replace nn.Linear in place.
    if type(model) is not LlamaForCausalLM or type(getattr(model, "model", None)) is not LlamaModel:
        return f"not a plain LlamaForCausalLM ({type(model).__name__})"
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r}"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope.get('rope_type')!r}"
    if model.training and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout active (training mode)"
    inner = model.model
    if len(inner.layers) != cfg.num_hidden_layers:
        return "layer count differs from config"
    if type(inner.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        return "non-standard embedding or lm_head"
    if type(inner.norm) is not LlamaRMSNorm:
        return "non-standard final norm"
    for layer in inner.layers:
        if (
            type(layer) is not LlamaDecoderLayer
            or type(layer.self_attn) is not LlamaAttention
            or type(layer.mlp) is not LlamaMLP
            or type(layer.input_layernorm) is not LlamaRMSNorm
            or type(layer.post_attention_layernorm) is not LlamaRMSNorm
        ):
            return "non-standard decoder layer"
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if type(lin) is not nn.Linear:
                return f"adapter or custom linear ({type(lin).__name__})"
            if lin.bias is not None:
                return "attention/MLP bias"
    for mod in model.modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return "forward hooks registered"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        return f"parameter dtypes {sorted(map(str, dtypes))}"
    if len({p.device for p in model.parameters()}) != 1:
        return "parameters on several devices"
    return None


# Per model: the fused weight buffers (QKV, gate+up per layer), reused across builds; dropped with the model.
_FUSED: weakref.WeakKeyDictionary[nn.Module, list[Tensor]] = weakref.WeakKeyDictionary()


def _fused_buffers(model: nn.Module) -> list[Tensor]:
    """``[qkv_0, gate_up_0, qkv_1, ...]`` buffers shaped for ``model``'s current weights (contents undefined)."""
    shapes = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        shapes.append(
            (
                a.q_proj.weight.shape[0] + a.k_proj.weight.shape[0] + a.v_proj.weight.shape[0],
                a.q_proj.weight.shape[1],
            )
        )
        shapes.append((m.gate_proj.weight.shape[0] + m.up_proj.weight.shape[0], m.gate_proj.weight.shape[1]))
    w = model.model.embed_tokens.weight
    bufs = _FUSED.get(model)
    if (
        bufs is None
        or [tuple(b.shape) for b in bufs] != shapes
        or any(b.dtype != w.dtype or b.device != w.device for b in bufs)
    ):
        bufs = [torch.empty(shape, dtype=w.dtype, device=w.device) for shape in shapes]
        _FUSED[model] = bufs
    return bufs


@dataclass
class _Layer:
    ln1: Tensor  # (H,)
    wqkv: Tensor  # ((Nq + 2 Nkv) * D, H), fused copy
    wo: Tensor  # (H, Nq * D), live parameter
    ln2: Tensor  # (H,)
    wgu: Tensor  # (2 I, H), fused copy
    wdown: Tensor  # (H, I), live parameter


class FastLlama:
    """Prefill + decode for one batch with a preallocated KV cache; build with :func:`build_fast_llama`.

    Cache slots are columns of the padded sequence (prompt column ``j`` -> slot ``j``, ``t``-th generated token
    -> slot ``P + t``), so every row writes the same slot each step; left padding is handled by masking the
    padded slots and by the per-row position ids (which drive RoPE only).
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        cfg = model.config
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = float(cfg.rms_norm_eps)
        self.max_len = max_len
        w = inner.embed_tokens.weight
        self.dtype, self.device = w.dtype, w.device
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_w, self.lm_b = model.lm_head.weight, model.lm_head.bias
        buffers = _fused_buffers(model)
        self.layers = [
            _Layer(
                ln1=layer.input_layernorm.weight,
                # Re-copied on every build (never stale); into buffers kept across calls, because a fresh
                # allocation of ~23 MB costs ~10 ms of page faults per call against ~1.5 ms for the copy itself.
                wqkv=torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ],
                    out=buffers[2 * i],
                ),
                wo=layer.self_attn.o_proj.weight,
                ln2=layer.post_attention_layernorm.weight,
                wgu=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], out=buffers[2 * i + 1]),
                wdown=layer.mlp.down_proj.weight,
            )
            for i, layer in enumerate(inner.layers)
        ]
        self.inter = self.layers[0].wdown.shape[1] if self.layers else 0
        n_layers = len(self.layers)
        shape = (n_layers, batch, self.n_kv, max_len, self.head_dim)
        # Uninitialised is safe: attention only ever reads slots below the current one, all written already
        # (padded prompt slots get finite keys/values from the prefill and are masked).
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        # The model's own rotary module gives the exact cos/sin HF uses (rope scaling, attention_scaling, dtype).
        pos = torch.arange(max_len, device=self.device).unsqueeze(0)
        cos, sin = inner.rotary_emb(self.embed[:1].unsqueeze(0), position_ids=pos)  # (1, max_len, D) each
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one roll instead of two slices, neg and cat.
        sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.rope = torch.stack([cos[0], sin_signed], dim=1)  # (max_len, 2, D)
        self.rope_t = self.rope.permute(
            1, 2, 0
        ).contiguous()  # (2, D, max_len): decode's feature-major layout
        # Additive key mask per slot, (B * Nkv, 1, max_len) for the decode's batched matmuls: 0 where a key may
        # be attended, -inf on left padding. Filled by prefill.
        self.key_bias = torch.zeros(batch * self.n_kv, 1, max_len, dtype=self.dtype, device=self.device)
        self.scale = self.head_dim**-0.5
        self.gqa = self.n_kv != self.n_heads

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # HF order for reduced precision: normalise in fp32, round to the input dtype, then scale by the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def _logits(self, x: Tensor) -> Tensor:
        return F.linear(self._rms(x, self.norm), self.lm_w, self.lm_b)

    def prefill(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Fill the cache with the prompts; returns the last position's logits ``(B, V)``.

        The projections and MLPs run on the real tokens only, packed into ``(N, H)`` (left padding is ~20-30% of
        a ``(B, P)`` batch of mixed-length prompts, and the prefill is a large share of a rollout's FLOPs);
        attention runs in the padded ``(B, P)`` layout, where the cache and the mask already are. In the last
        layer only the last column needs a hidden state, so its attention output and MLP run on ``B`` rows.

        Args:
            ids: ``(B, P)`` left-padded prompt ids (the last column is real for every row).
            mask: ``(B, P)`` 0/1 attention mask.
            positions: ``(B, P)`` position ids (``prompt_position_ids``).
        """
        b, p = ids.shape
        if p > self.max_len:
            raise ValueError(f"prompt length {p} exceeds the cache length {self.max_len}")
        nq, nkv, d, inter = self.n_heads, self.n_kv, self.head_dim, self.inter
        real = mask.reshape(-1) != 0
        flat = real.nonzero().squeeze(1)  # (N,) indices into the flattened (B, P) grid
        rows, cols = flat // p, flat % p
        last = torch.arange(b, device=ids.device) * p + (p - 1)  # the last column, real in every row
        last_packed = torch.searchsorted(flat, last)  # its place among the packed tokens
        self.key_bias.zero_()
        pad = (mask == 0).repeat_interleave(nkv, dim=0)  # (B * Nkv, P), row b * Nkv + j is batch row b
        self.key_bias[:, 0, :p].masked_fill_(pad, float("-inf"))
        causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril_()
        allowed = causal & (mask != 0)[:, None, None, :]  # (B, 1, P, P)
        # A padded query would see no key at all (all -inf: NaN). Its output is discarded, but let it see itself
        # so nothing non-finite is ever produced.
        allowed |= torch.eye(p, dtype=torch.bool, device=ids.device)
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=ids.device).masked_fill_(
            ~allowed, float("-inf")
        )
        # Padded slots are never written below but are read (masked) by attention: they must be finite.
        self.k_cache[:, :, :, :p].zero_()
        self.v_cache[:, :, :, :p].zero_()
        q_pad = torch.zeros(b * p, nq, d, dtype=self.dtype, device=ids.device)
        rope = self.rope[positions.reshape(-1)[flat]]  # (N, 2, D)
        cos, sin = rope[:, None, 0], rope[:, None, 1]  # (N, 1, D)
        x = F.embedding(ids.reshape(-1)[flat], self.embed)  # (N, H)
        n_layers = len(self.layers)
        for li, layer in enumerate(self.layers):
            qkv = F.linear(self._rms(x, layer.ln1), layer.wqkv)  # (N, (Nq + 2 Nkv) D)
            qk = qkv[:, : (nq + nkv) * d].view(-1, nq + nkv, d)
            qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * sin
            self.k_cache[li, rows, :, cols] = qk[:, nq:]
            self.v_cache[li, rows, :, cols] = qkv[:, (nq + nkv) * d :].view(-1, nkv, d)
            keys, values = self.k_cache[li, :, :, :p], self.v_cache[li, :, :, :p]
            if li < n_layers - 1:
                q_pad[flat] = qk[:, :nq]
                attn = F.scaled_dot_product_attention(
                    q_pad.view(b, p, nq, d).transpose(1, 2),
                    keys,
                    values,
                    attn_mask=bias,
                    scale=self.scale,
                    enable_gqa=self.gqa,
                )  # (B, Nq, P, D)
                attn = attn.transpose(1, 2).reshape(b * p, nq * d)[flat]  # (N, Nq D)
            else:  # only the last column feeds the logits
                x = x[last_packed]  # (B, H)
                attn = F.scaled_dot_product_attention(
                    qk[last_packed, :nq].unsqueeze(2),  # (B, Nq, 1, D)
                    keys,
                    values,
                    attn_mask=self.key_bias[:, :, :p].view(b, nkv, 1, p)[:, :1],
                    scale=self.scale,
                    enable_gqa=self.gqa,
                ).reshape(b, nq * d)
            x = x + F.linear(attn, layer.wo)
            gu = F.linear(self._rms(x, layer.ln2), layer.wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], layer.wdown)
        if n_layers == 0:
            x = x[last_packed]
        return self._logits(x)

    def step(self, token: Tensor, positions: Tensor, slot: int) -> Tensor:
        """Feed one token per row at cache slot ``slot``; returns logits ``(B, V)``.

        Activations of the projections are kept feature-major (``(features, B)``): ``mm(W, h.T)`` multiplies the
        row-major ``(out, in)`` parameter as stored, which MKL runs ~1.5x faster at small batch than
        ``F.linear``'s ``h @ W.T`` — without a transposed copy of the weights. The residual stream stays
        ``(B, H)``; each residual add transposes back for free.

        Args:
            token: ``(B,)`` ids.
            positions: ``(B, 1)`` position ids.
            slot: cache column, ``P + t`` for the ``t``-th generated token.
        """
        if slot >= self.max_len:
            raise ValueError(f"slot {slot} is past the cache length {self.max_len}")
        b = token.shape[0]
        nq, nkv, d, inter = self.n_heads, self.n_kv, self.head_dim, self.inter
        rep = nq // nkv
        end = slot + 1
        cs = self.rope_t[:, :, positions[:, 0]]  # (2, D, B)
        cos, sin = cs[0], cs[1]
        bias = self.key_bias[:, :, :end]
        x = F.embedding(token, self.embed)  # (B, H)
        for li, layer in enumerate(self.layers):
            qkv = torch.mm(layer.wqkv, self._rms(x, layer.ln1).t())  # ((Nq + 2 Nkv) D, B)
            qk = qkv[: (nq + nkv) * d].view(nq + nkv, d, b)
            # q and k rotated together (same positions); roll along D is rotate_half up to the signed sin.
            qk = qk * cos + torch.roll(qk, d // 2, dims=1) * sin
            self.k_cache[li, :, :, slot].copy_(qk[nq:].permute(2, 0, 1))
            self.v_cache[li, :, :, slot].copy_(qkv[(nq + nkv) * d :].view(nkv, d, b).permute(2, 0, 1))
            # GQA without repeating keys: the `rep` query heads sharing a KV head become rows of one matmul.
            q = qk[:nq].permute(2, 0, 1).reshape(b * nkv, rep, d)
            k = self.k_cache[li, :, :, :end].reshape(b * nkv, end, d)
            v = self.v_cache[li, :, :, :end].reshape(b * nkv, end, d)
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)  # (B Nkv, rep, end)
            if scores.dtype == torch.float32:
                weights = scores.softmax(dim=-1)
            else:  # as HF eager attention: softmax in float32 for reduced precision
                weights = scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
            attn = torch.bmm(weights, v).view(b, nq * d)
            x = x + torch.mm(layer.wo, attn.t()).t()
            gu = torch.mm(layer.wgu, self._rms(x, layer.ln2).t())  # (2 I, B)
            x = x + torch.mm(layer.wdown, F.silu(gu[:inter]) * gu[inter:]).t()
        logits = torch.mm(self.lm_w, self._rms(x, self.norm).t()).t()
        if self.lm_b is not None:
            logits = logits + self.lm_b
        return logits.contiguous()


@torch.no_grad()
def build_fast_llama(model: nn.Module, batch: int, max_len: int) -> FastLlama | None:
    """A :class:`FastLlama` over ``model``'s current weights, or None if the model is not eligible.

    Build one per :func:`~alignflow.rollout.generation.sample` call: the fused QKV / gate+up weights are copies
    and would go stale once the model is trained.
    """
    if fast_ineligibility(model) is not None:
        return None
    return FastLlama(model, batch, max_len)
