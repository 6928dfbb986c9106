"""Training options for transformers: AdamW's decay groups and decoupled decay, linear warm-up, and resume checks
that cover the new Schedule fields without invalidating checkpoints or bench manifests written before them."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import Batches, separable, tiny_net
from torch import nn

from netslim.errors import NetslimError
from netslim.train import STATE_JSON, STATE_TENSORS, Schedule, fit, lr_at, make_optimizer, recorded
from netslim.train.schedule import LATER_FIELDS
from netslim.zoo import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Parameter name -> the weight decay its group applies (each parameter in exactly one group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [(names[id(p)], g["weight_decay"]) for g in opt.param_groups for p in g["params"]]
    assert sorted(n for n, _ in decay) == sorted(names.values())
    return dict(decay)


def test_adamw_leaves_biases_norms_position_embedding_and_class_token_undecayed() -> None:
    model = build("vit_tiny")
    opt = make_optimizer(model, Schedule(optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decay = _groups(opt, model)
    block = "encoder.layers.encoder_layer_0."
    off = ["class_token", "encoder.pos_embedding", "conv_proj.bias", block + "ln_1.weight", block + "ln_1.bias",
           block + "self_attention.in_proj_bias", block + "mlp.0.bias", "encoder.ln.weight", "heads.head.bias"]
    on = ["conv_proj.weight", block + "self_attention.in_proj_weight", block + "self_attention.out_proj.weight",
          block + "mlp.0.weight", block + "mlp.3.weight", "heads.head.weight"]
    assert all(decay[n] == 0.0 for n in off) and all(decay[n] == 0.05 for n in on)
    assert {n for n, d in decay.items() if d} == {n for n, p in model.named_parameters()
                                                  if p.ndim > 1 and n not in ("class_token", "encoder.pos_embedding")}


def test_a_models_own_no_weight_decay_list_is_honoured() -> None:
    class Scaled(nn.Module):  # timm's convention: the model names parameters to leave undecayed
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.table = nn.Linear(4, 4), nn.Parameter(torch.ones(3, 4))

        def no_weight_decay(self) -> set[str]:
            return {"table"}

    model = Scaled()
    decay = _groups(make_optimizer(model, Schedule(optimizer="adamw", weight_decay=0.1)), model)
    assert decay == {"fc.weight": 0.1, "fc.bias": 0.0, "table": 0.0}


def test_adamw_decay_is_decoupled_and_sgd_is_unchanged() -> None:
    """With a zero gradient Adam's step is 0, so what moves is the decoupled decay alone: w (1 - lr wd)."""
    model = build("vit_tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, Schedule(optimizer="adamw", lr=0.01, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["heads.head.weight"], before["heads.head.weight"] * (1 - 0.01 * 0.5))
    assert torch.equal(after["encoder.pos_embedding"], before["encoder.pos_embedding"])
    assert torch.equal(after["class_token"], before["class_token"])
    sgd = make_optimizer(model, Schedule())  # today's recipe: one group, every parameter decayed, nesterov
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    assert sgd.param_groups[0]["weight_decay"] == 5e-4 and sgd.param_groups[0]["nesterov"]


def test_linear_warmup_then_cosine() -> None:
    assert [lr_at("cosine", 0.1, s, 100, warmup_steps=10) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert lr_at("cosine", 0.1, 10, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 55, 100, warmup_steps=10) == pytest.approx(0.05)  # half way through 90 steps
    assert lr_at("cosine", 0.1, 99, 100, warmup_steps=10) < 1e-4
    assert lr_at("constant", 0.1, 3, 100, warmup_steps=10) == pytest.approx(0.04)
    assert lr_at("constant", 0.1, 50, 100, warmup_steps=10) == 0.1
    for s in (0, 37, 99):  # no warm-up: the curve it always was
        assert lr_at("cosine", 0.1, s, 100, warmup_steps=0) == lr_at("cosine", 0.1, s, 100)


def test_fit_follows_the_warmup_per_step() -> None:
    x, y = separable()  # 8 steps per epoch at batch 32
    recipe = Schedule(epochs=3, lr=0.1, schedule="cosine", warmup_epochs=1, optimizer="adamw", weight_decay=0.05)
    seen: list[float] = []
    model = tiny_net()
    opt_step = torch.optim.AdamW.step

    def spy(self: torch.optim.Optimizer, *a: object, **k: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        assert all(g["lr"] == seen[-1] for g in self.param_groups)
        return opt_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        history = fit(model, Batches(x, y, 32), recipe, progress=False)
    assert seen == pytest.approx([lr_at("cosine", 0.1, s, 24, warmup_steps=8) for s in range(24)])
    assert seen[:8] == pytest.approx([0.1 * (s + 1) / 8 for s in range(8)])
    assert [h["lr"] for h in history] == pytest.approx([seen[7], seen[15], seen[23]])


def test_schedule_refuses_bad_optimizer_and_warmup() -> None:
    cases = [({"optimizer": "adam"}, "unknown optimizer 'adam'; choose one of sgd, adamw"),
             ({"warmup_epochs": 1, "epochs": 4}, "onecycle warms up on its own"),
             ({"warmup_epochs": 4, "epochs": 4, "schedule": "cosine"}, "leaves none of the 4 epochs"),
             ({"warmup_epochs": -1, "schedule": "cosine"}, "whole number"),
             ({"weight_decay": -0.1}, "weight decay must not be negative")]
    for kwargs, message in cases:
        with pytest.raises(NetslimError, match=message):
            Schedule(**kwargs)
    assert Schedule(epochs=0, warmup_epochs=3, schedule="cosine").warmup_epochs == 3  # 0 epochs: nothing to run


def test_new_fields_default_to_what_older_recipes_did() -> None:
    defaults = {f.name: f.default for f in fields(Schedule)}
    assert {k: defaults[k] for k in LATER_FIELDS} == LATER_FIELDS
    old = {k: v for k, v in asdict(Schedule(epochs=3)).items() if k not in LATER_FIELDS}
    assert recorded(Schedule(epochs=3)) == old  # what bench manifests held before these fields existed
    assert recorded(Schedule(epochs=3, optimizer="adamw"))["optimizer"] == "adamw"


def _stopped_at_2(ckpt: Path, recipe: Schedule) -> None:
    def stop(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_net(), Batches(*separable(), 32), recipe, checkpoint_dir=ckpt, progress=False, on_epoch=stop)


def test_resume_with_another_optimizer_or_warmup_is_refused(tmp_path: Path) -> None:
    sgd = Schedule(epochs=4, lr=0.1, schedule="cosine")
    _stopped_at_2(tmp_path, sgd)
    batches = Batches(*separable(), 32)
    with pytest.raises(NetslimError, match=r"optimizer='sgd'.*optimizer='adamw'"):
        fit(tiny_net(), batches, Schedule(epochs=4, lr=0.1, schedule="cosine", optimizer="adamw"),
            checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(NetslimError, match=r"warmup_epochs=0.*warmup_epochs=1"):
        fit(tiny_net(), batches, Schedule(epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1),
            checkpoint_dir=tmp_path, resume=True, progress=False)
    # a checkpoint written before these fields existed lacks them: it was SGD without warm-up
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    meta["recipe"] = {k: v for k, v in meta["recipe"].items() if k not in LATER_FIELDS}
    (tmp_path / STATE_JSON).write_text(json.dumps(meta))
    with pytest.raises(NetslimError, match=r"optimizer='sgd'.*optimizer='adamw'"):
        fit(tiny_net(), batches, Schedule(epochs=4, lr=0.1, schedule="cosine", optimizer="adamw"),
            checkpoint_dir=tmp_path, resume=True, progress=False)
    assert len(fit(tiny_net(), batches, sgd, checkpoint_dir=tmp_path, resume=True, progress=False)) == 4


def test_adamw_resume_after_crash_matches_straight_run(tmp_path: Path) -> None:
    """AdamW's moments and step count are checkpointed: a resumed run continues exactly where it stopped."""
    recipe = Schedule(epochs=4, lr=0.01, schedule="cosine", warmup_epochs=1, optimizer="adamw", weight_decay=0.05)
    straight = tiny_net()
    full = fit(straight, Batches(*separable(), 32), recipe, checkpoint_dir=tmp_path / "a", progress=False)
    _stopped_at_2(tmp_path / "b", recipe)
    tensors = load_file(str(tmp_path / "b" / STATE_TENSORS))
    assert tensors["optim/step/6.weight"].item() == 16 and tensors["optim/exp_avg_sq/6.weight"].abs().sum() > 0
    resumed = tiny_net(seed=99)
    rest = fit(resumed, Batches(*separable(), 32), recipe, checkpoint_dir=tmp_path / "b", resume=True,
               progress=False)
    assert rest[3]["train_loss"] == pytest.approx(full[3]["train_loss"], rel=1e-5)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_bench_manifests_written_before_the_new_fields_still_resume(tmp_path: Path) -> None:
    from netslim.workflows.bench_inputs import check_resume, write_manifest

    old = {k: v for k, v in asdict(Schedule(epochs=1)).items() if k not in LATER_FIELDS}
    write_manifest(tmp_path, {"schedule": old})
    check_resume(tmp_path, {"schedule": recorded(Schedule(epochs=1))})
    with pytest.raises(NetslimError, match="schedule.optimizer"):
        check_resume(tmp_path, {"schedule": recorded(Schedule(epochs=1, optimizer="adamw"))})
