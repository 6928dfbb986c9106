"""Training and evaluation: fit, fine-tune and score a model, alone or under torchrun."""

from netslim.train.bn import recalibrate_bn, restore_scale
from netslim.train.evaluation import evaluate, unwrap
from netslim.train.loop import fit
from netslim.train.optim import make_optimizer, no_decay
from netslim.train.schedule import OPTIMIZERS, SCHEDULES, Schedule, lr_at, recorded
from netslim.train.state import STATE_JSON, STATE_TENSORS, read_meta
from netslim.train.tune import finetune

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "STATE_JSON", "STATE_TENSORS", "Schedule", "evaluate", "finetune", "fit", "lr_at",
    "make_optimizer", "no_decay", "read_meta", "recalibrate_bn", "recorded", "restore_scale", "unwrap",
]
