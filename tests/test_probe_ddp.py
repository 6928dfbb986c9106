"""Sharded collection summed with torch.distributed equals single-process statistics."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from netslim.probe import collect, stats_from_tensors

WORKER = Path(__file__).with_name("ddp_probe_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_probe_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_two_rank_all_reduce_matches_single_process(tmp_path: Path) -> None:
    out = tmp_path / "stats.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reduced = stats_from_tensors(load_file(str(out)))

    worker = _load_worker()
    model, batches = worker.make_setup()
    expected = {}
    for mode in ("max", "spatial"):
        stats = collect(model, batches, reduce=mode, per_class=True, num_classes=worker.NUM_CLASSES)
        expected.update({f"{mode}:{k}": v for k, v in stats.items()})
    expected["mean:0"] = collect(model, batches, layers=["0"], reduce="mean")["0"]

    assert set(reduced) == set(expected)
    for name, want in expected.items():
        got = reduced[name]
        assert (got.class_count is None) == (want.class_count is None), name
        for a, b in zip(got.tensors(), want.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(got.cov, want.cov, rtol=1e-9, atol=1e-12, msg=name)
