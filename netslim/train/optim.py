"""The optimizer a Schedule names: SGD, as netslim trains CNNs, or AdamW, as vision transformers are trained.

AdamW decays only weight matrices and kernels. Biases, norm scales, a ViT's position embedding and class
token are left undecayed, as ViT, DeiT and timm train them: decay pulls an embedding towards zero instead of
regularising a mapping. A model's own `no_weight_decay()` (timm's convention) names more such parameters.
SGD decays every parameter, as netslim always has (its recipes and checkpoints were made that way).
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.train.schedule import Schedule

# parameters that are embeddings or tokens, not mappings, by their last name component (torchvision, timm)
NO_DECAY_NAMES = ("class_token", "cls_token", "dist_token", "pos_embedding", "pos_embed", "absolute_pos_embed",
                  "relative_position_bias_table")


def no_decay(module: nn.Module) -> set[str]:
    """Names of the parameters AdamW leaves undecayed: every one of at most one dimension (biases, norm
    scales), the embeddings and tokens of NO_DECAY_NAMES, and what `module.no_weight_decay()` returns."""
    own = getattr(module, "no_weight_decay", None)
    named = {str(n) for n in own()} if callable(own) else set()
    return {n for n, p in module.named_parameters()
            if p.ndim <= 1 or n.rsplit(".", 1)[-1] in NO_DECAY_NAMES or n in named}


def make_optimizer(module: nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """`schedule.optimizer` over `module`'s parameters at `schedule.lr` (fit sets each step's rate)."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                               weight_decay=schedule.weight_decay,
                               nesterov=schedule.nesterov and schedule.momentum > 0)
    if schedule.optimizer == "adamw":
        skip = no_decay(module)
        named = list(module.named_parameters())
        groups = [{"params": [p for n, p in named if n not in skip], "weight_decay": schedule.weight_decay},
                  {"params": [p for n, p in named if n in skip], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=schedule.lr)
    raise NetslimError(f"unknown optimizer '{schedule.optimizer}'")
