"""Export a run to ONNX and torch.export, check predictions on CIFAR-10 test images, time both runtimes.

    python -m benchmarks.speed.export RUN_DIR [--threads 1] [--images 2000]
"""

from __future__ import annotations

from pathlib import Path

from benchmarks._common import CIFAR10, log, parser, stamp, start, write
from netslim.workflows.export import export_run


def main() -> None:
    ap = parser(__doc__, out="speed_export_cpu.json", threads=1)
    ap.add_argument("run", type=Path)
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    start(args)
    reports = []
    for fmt in ("onnx", "torch-export"):
        rep = export_run(args.run, fmt, data=str(CIFAR10), images=args.images, threads=args.threads, max_seconds=20)
        reports.append(rep)
        for r in rep["latency"]:
            log(f"{fmt}: {r['runtime']:<24} batch {r['batch']:>3}: {r['median_ms']:9.2f} ms "
                f"({r['speedup_vs_pytorch']:.2f}x PyTorch)")
    write(args.out, {**stamp(args), "exports": reports})


if __name__ == "__main__":
    main()
