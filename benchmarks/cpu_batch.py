"""Images per forward pass on CPU: speed and peak memory of `extract_descriptors` by batch size.

Each (torch threads, batch size) point runs in a fresh child process (so its peak resident
memory, VmHWM, is its own): EfficientNet-Lite0 ImageNet + GeM at 512 px, a warm-up of 8
images, then the timed images of the demo database. The batch of 1 is
`raytrieval.retrieval.extract.default_batch_size` on CPU; 8 was the default before.
Writes benchmarks/cpu_batch.md.

    .venv/bin/python benchmarks/cpu_batch.py            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.baseline import machine, write_markdown  # noqa: E402

_CHILD = """
import json, sys, time
import torch
from raytrieval.evaluation.datasets import prepare_benchmark
from raytrieval.retrieval.extract import extract_descriptors
from raytrieval.retrieval.model import ModelSpec, RetrievalNet
threads, batch, n, size, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
images = prepare_benchmark("demo", root).images
model = RetrievalNet(ModelSpec(max_size=size)).eval()
extract_descriptors(model, images[:8], max_size=size, batch_size=batch, progress=False)
t0 = time.perf_counter()
extract_descriptors(model, images[8:8 + n], max_size=size, batch_size=batch, progress=False)
seconds = time.perf_counter() - t0
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"images_per_s": n / seconds, "peak_rss": int(status["VmHWM"].split()[0]) * 1024}))
"""


def measure(threads: int, batch: int, n: int, size: int, root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(batch), str(n), str(size), root],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-root", default="runs/data")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default=str(_HERE / "cpu_batch.md"))
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for batch in batches:
            r = measure(threads, batch, args.images, args.max_size, args.demo_root)
            rows.append({"threads": threads, "batch": batch, **r})
            print(f"threads {threads}, batch {batch}: {r['images_per_s']:.2f} img/s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB")
    by = {(r["threads"], r["batch"]): r for r in rows}
    load_after = os.getloadavg()
    lines = [
        "# Images per forward pass on CPU", "",
        f"- Machine: {machine()}",
        f"- Date: {started} UTC; load average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end",
        f"- Command: `.venv/bin/python benchmarks/cpu_batch.py --images {args.images} --max-size {args.max_size}`",
        f"- `extract_descriptors` of {args.images} demo database images (EfficientNet-Lite0 ImageNet, GeM, longer side "
        f"{args.max_size}), each point in a fresh process after an 8-image warm-up; peak RSS is the process's VmHWM "
        "(model, decoded images and the activations of one batch).", "",
        "| torch threads | batch | images / s | peak RSS (GiB) |", "|---|---|---|---|",
        *[f"| {r['threads']} | {r['batch']} | {r['images_per_s']:.2f} | {r['peak_rss'] / 2**30:.2f} |" for r in rows],
        "",
    ]
    for threads in sorted({r["threads"] for r in rows}):
        one, eight = by.get((threads, 1)), by.get((threads, 8))
        if one and eight:
            lines.append(f"- {threads} thread(s): batch 1 runs at {one['images_per_s'] / eight['images_per_s']:.2f}x the "
                         f"speed of batch 8 with {one['peak_rss'] / eight['peak_rss']:.2f}x its peak memory.")
    lines += ["", "On CPU one image per forward pass is the default (`default_batch_size`); an accelerator keeps "
              "batches of 16.", ""]
    return write_markdown(args.out, lines)


if __name__ == "__main__":
    sys.exit(main())
