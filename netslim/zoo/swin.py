"""torchvision's Swin (v1) with a window attention that calls its Linear layers, so that it can be cut.

torchvision's ShiftedWindowAttention hands `qkv.weight` and `proj.weight` to a functional op: torch-pruning
cannot follow channels through weights that are never called as modules, so netslim refuses such a model.
OpenWindowAttention is the same module (same parameters, buffers and state-dict keys, same output to the last
bit) whose forward calls `qkv` and `proj`, and reads each width from the tensors rather than from the input
width (head_dim = qkv's outputs / 3 / heads, the output width from proj), so a cut residual width does not
break its reshapes. `tv:swin_t`, `tv:swin_s` and `tv:swin_b` are built with it (netslim.zoo); a torchvision
checkpoint loads into it unchanged. Its heads can be cut whole, with their column of the relative position bias.
Swin v2's attention (cosine attention, a bias MLP) is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention


def _window_mask(x: torch.Tensor, size: tuple[int, int], window: list[int], shift: list[int]) -> torch.Tensor:
    """The shifted windows' attention mask (windows, tokens, tokens): 0 within a region, −100 across regions."""
    ph, pw = size
    mask = x.new_zeros((ph, pw))
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _window_attention(attn: nn.Module, x: torch.Tensor, project: bool = True) -> torch.Tensor:
    """torchvision's shifted_window_attention (v1) for (B, H, W, C) input, with `qkv` and `proj` called; with
    `project` False, the concatenated head outputs in the output's layout (B, H, W, heads × head_dim)."""
    b, h, w, _ = x.shape
    window, shift = attn.window_size, list(attn.shift_size)
    x = F.pad(x, (0, 0, 0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))
    _, ph, pw, c = x.shape
    shift = [0 if window[i] >= (ph, pw)[i] else shift[i] for i in range(2)]  # one window: no shift
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (ph // window[0]) * (pw // window[1])
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * nw, window[0] * window[1], c)
    qkv = attn.qkv(x)
    d = qkv.shape[-1] // (3 * attn.num_heads)
    q, k, v = qkv.reshape(x.size(0), x.size(1), 3, attn.num_heads, d).permute(2, 0, 3, 1, 4)
    scores = (q * d ** -0.5).matmul(k.transpose(-2, -1)) + attn.get_relative_position_bias()
    if sum(shift) > 0:
        tokens = x.size(1)
        scores = scores.view(x.size(0) // nw, nw, attn.num_heads, tokens, tokens)
        scores = scores + _window_mask(x, (ph, pw), window, shift).unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, attn.num_heads, tokens, tokens)
    weights = F.dropout(F.softmax(scores, dim=-1), p=attn.attention_dropout, training=attn.training)
    out = weights.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), attn.num_heads * d)
    if project:
        out = F.dropout(attn.proj(out), p=attn.dropout, training=attn.training)
    c = out.shape[-1]
    out = out.view(b, ph // window[0], pw // window[1], window[0], window[1], c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, ph, pw, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


class OpenWindowAttention(ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttention whose forward calls its qkv and proj Linear layers.

    Its heads can be cut whole (netslim.surgery.heads.cut_qkv): `head_outputs` is what `proj` maps to the output
    (token by token, so in the output's layout), `per_head` names the tensors with one column per head (the
    relative position bias), which a head cut slices with qkv's rows and proj's columns, and `head_free` the
    ones a head cut leaves as they are (the position index)."""

    per_head = ("relative_position_bias_table",)
    head_free = ("relative_position_index",)

    @property
    def head_dim(self) -> int:
        return self.qkv.out_features // (3 * self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated head outputs (B, H, W, heads × head_dim) of a call on `x`: proj of them is the output."""
        return _window_attention(self, x, project=False)


def open_windows(model: nn.Module) -> int:
    """Turn (in place) every torchvision ShiftedWindowAttention (v1) of `model` into an OpenWindowAttention
    (the same module, its forward calling its Linear layers); how many."""
    n = 0
    for m in model.modules():
        if type(m) is ShiftedWindowAttention:
            m.__class__ = OpenWindowAttention
            n += 1
    return n
