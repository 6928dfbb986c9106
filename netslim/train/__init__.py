"""Training and evaluation: fit, fine-tune and score a model, alone or under torchrun."""

from netslim.train.bn import recalibrate_bn, restore_scale
from netslim.train.evaluation import evaluate, unwrap
from netslim.train.loop import fit
from netslim.train.schedule import SCHEDULES, Schedule, lr_at
from netslim.train.state import STATE_JSON, STATE_TENSORS, read_meta
from netslim.train.tune import finetune

__all__ = [
    "SCHEDULES", "STATE_JSON", "STATE_TENSORS", "Schedule", "evaluate", "finetune", "fit", "lr_at", "read_meta",
    "recalibrate_bn", "restore_scale", "unwrap",
]
