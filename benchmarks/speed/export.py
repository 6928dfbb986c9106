"""Export a run to ONNX and torch.export, check predictions on CIFAR-10 test images, time both runtimes.

    python benchmarks/speed_export.py RUN_DIR [--threads 1] [--images 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from netslim.workflows.export import export_run
from netslim.workflows.stages import machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speed_export_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reports = []
    for fmt in ("onnx", "torch-export"):
        rep = export_run(args.run, fmt, data=str(DATA), images=args.images, threads=args.threads, max_seconds=20)
        reports.append(rep)
        for r in rep["latency"]:
            print(f"{fmt}: {r['runtime']:<24} batch {r['batch']:>3}: {r['median_ms']:9.2f} ms "
                  f"({r['speedup_vs_pytorch']:.2f}x PyTorch)", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "machine": machine(), "torch": torch.__version__, "threads": args.threads,
                                    "command": " ".join(["python", *sys.argv]), "exports": reports}, indent=1))


if __name__ == "__main__":
    main()
