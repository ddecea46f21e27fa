"""Pipeline benchmark: the README's main command on the embedded demo, timed per stage.

Runs `raytrieval pipeline` (what `bash scripts/demo.sh` runs after setting up) in a fresh run
directory until the endpoint is up and the example query is printed, then stops it; samples
the memory of the whole process tree (driver, Ray's raylet/GCS and every worker) twice a
second; then runs it a second time to show that every stage is skipped. Writes
benchmarks/pipeline.md.

    .venv/bin/python benchmarks/pipeline.py                 # ~10-20 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --fresh-clone   # plus a clone and scripts/setup.sh
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from benchmarks.baseline import machine  # noqa: E402


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _memory(pid: int) -> tuple[int, int, str]:
    """(RSS, PSS) in bytes and the process title; zeros for a process that is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return 0, 0, ""
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:] if line.split()[1:]}
    return values.get("Rss", 0), values.get("Pss", 0), title


def tree_memory(root: int) -> tuple[int, int, dict[str, int], list[tuple[str, int]]]:
    """Summed RSS and PSS (bytes) of `root` and all its descendants, the largest RSS per
    process title (``ray::RayTrainWorker...``, ``ray::MapWorker(MapBatches(EmbedBatch))...``, the driver, ...)
    and (title, PSS) of every process.

    RSS counts the pages a process shares with others (the CUDA and torch libraries every
    worker maps, read from the page cache once) in full for each; PSS splits them between the
    processes that share them, so the PSS sum is the machine memory the tree really uses.
    """
    rss = pss = 0
    per_title: dict[str, int] = {}
    each: list[tuple[str, int]] = []
    for pid in _descendants(root):
        r, p, title = _memory(pid)
        rss, pss = rss + r, pss + p
        key = title.split(".")[0] if title.startswith("ray::") else Path(title).name
        per_title[key] = max(per_title.get(key, 0), r)
        if p:
            each.append((key, p))
    return rss, pss, per_title, each


class PeakSampler(threading.Thread):
    """Samples `tree_memory(pid)` every `every` seconds; keeps the peaks, also per stage (the
    stage the command last said it was running, `stage`, set by the reader of its output), and
    every process's PSS at the moment of the tree's peak PSS (`at_peak`)."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.stopped = pid, every, threading.Event()
        self.peak = self.peak_pss = 0
        self.per_title: dict[str, int] = {}
        self.stage = "start"
        self.stage_pss: dict[str, int] = {}
        self.at_peak: list[tuple[str, int]] = []

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            rss, pss, titles, each = tree_memory(self.pid)
            if pss > self.peak_pss:
                self.at_peak = sorted(each, key=lambda kv: -kv[1])
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.stage_pss[self.stage] = max(self.stage_pss.get(self.stage, 0), pss)
            for k, v in titles.items():
                self.per_title[k] = max(self.per_title.get(k, 0), v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(run_dir: Path, log: Path, timeout: float, checkout: Path = ROOT) -> dict:
    """Run the pipeline of `checkout` (with its .venv) until the example query is printed;
    returns wall time, peak RSS, output."""
    cmd = [str(checkout / ".venv" / "bin" / "python"), "-m", "raytrieval.cluster.cli", "pipeline",
           "--run-dir", str(run_dir), "--port", str(free_port())]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=checkout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    lines, served = [], None
    with log.open("w") as sink:
        for line in proc.stdout:
            sink.write(line)
            lines.append(line.rstrip("\n"))
            running = re.match(r"\[(\w+)\] running$", line.strip())
            if running:
                sampler.stage = running.group(1)
            elif line.startswith("report:"):  # the stages are done: Serve starts
                sampler.stage = "serve"
            if line.startswith("example query"):
                served = time.perf_counter() - t0
            if served is not None and line.startswith("  5."):
                break
            if time.perf_counter() - t0 > timeout:
                break
    interrupted = time.perf_counter()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    sampler.stopped.set()
    sampler.join()
    if served is None:
        raise RuntimeError(f"the pipeline did not reach the example query; see {log}")
    return {"wall_s": served, "peak_rss": sampler.peak, "peak_pss": sampler.peak_pss,
            "per_title": sampler.per_title, "at_peak": sampler.at_peak, "stage_pss": sampler.stage_pss,
            "lines": lines, "exit": proc.returncode,
            "stop_s": time.perf_counter() - interrupted}


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def stage_table(lines: list[str]) -> list[dict]:
    """Per stage: seconds and whether it was skipped, from the command's `[stage] ...` lines."""
    rows = []
    for line in lines:
        m = re.match(r"\[(\w+)\] (?:done in ([\d.]+) s|current .*skipped)$", line)
        if m:
            rows.append({"stage": m.group(1), "seconds": float(m.group(2) or 0.0), "skipped": m.group(2) is None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/bench/pipeline")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--md", default=str(_HERE / "pipeline.md"))
    p.add_argument("--fresh-clone", action="store_true",
                   help="clone HEAD under runs/bench/fresh, time scripts/setup.sh there (a new .venv) and run "
                        "that clone's pipeline (its demo generated anew): the README's fresh clone to endpoint")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    checkout, setup_s = ROOT, None
    if args.fresh_clone:
        checkout = ROOT / "runs" / "bench" / "fresh"
        shutil.rmtree(checkout, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(checkout)], check=True)
        subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        setup_s = time.perf_counter() - t0
        print(f"fresh clone and setup: {setup_s:.0f} s")
    run_dir = (checkout / args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    first = run_once(run_dir, run_dir.parent / "pipeline-first.log", args.timeout, checkout)
    stages = stage_table(first["lines"])
    second = run_once(run_dir, run_dir.parent / "pipeline-second.log", args.timeout, checkout)
    again = stage_table(second["lines"])
    start = next(i for i, line in enumerate(first["lines"]) if line.startswith("model "))
    end = next(i for i, line in enumerate(first["lines"]) if i > start and line.startswith("report:"))
    maps = first["lines"][start:end]
    skipped = ", ".join(r["stage"] for r in again if r["skipped"])
    command = ".venv/bin/python benchmarks/pipeline.py" + (" --fresh-clone" if args.fresh_clone else "")
    fresh = [] if setup_s is None else [
        f"- Fresh clone: `git clone` of HEAD and `bash scripts/setup.sh` (a new .venv from local wheels) took "
        f"{setup_s:.0f} s; with the pipeline's {first['wall_s']:.0f} s (its demo collection generated anew), "
        f"**{setup_s + first['wall_s']:.0f} s ({(setup_s + first['wall_s']) / 60:.1f} min) from clone to the "
        "example query**."]
    lines = [
        "# Pipeline benchmark: the README's main command on the embedded demo", "",
        f"- Machine: {machine()}",
        f"- Date: {started} UTC. Command: `{command}` (runs "
        "`raytrieval pipeline --run-dir runs/bench/pipeline --port <free>`, the command `scripts/demo.sh` "
        "runs after setting up, in a fresh run directory, until the endpoint answers the example query).",
        *fresh,
        "- Peak memory: summed over the whole process tree (driver, Ray's raylet and GCS, every Ray "
        "worker, the Serve replicas), sampled every 0.5 s: RSS (each process's resident pages, shared "
        "library pages counted in every process that maps them) and PSS (shared pages split between "
        "the processes sharing them: the memory the tree really takes).",
        f"- Load average (1, 5, 15 min) at the start {', '.join(f'{x:.1f}' for x in load_before)}, at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores (a shared machine: "
        "other jobs ran beside this one, the wall times are upper bounds).", "",
        "## First run (nothing on disk)", "",
        "| stage | seconds | peak PSS of the tree during it (GiB; -: over before a 0.5 s sample) |", "|---|---|---|",
        *[f"| {r['stage']} | {r['seconds']:.1f} | {_gib(first['stage_pss'].get(r['stage']))} |" for r in stages],
        f"| serving (Serve deploy, the example query) | | {_gib(first['stage_pss'].get('serve'))} |",
        f"| **total, command start to example query printed** (incl. Ray start and Serve deploy) | **{first['wall_s']:.0f}** | |",
        "", f"Peak memory: **RSS {first['peak_rss'] / 2**30:.2f} GiB, PSS {first['peak_pss'] / 2**30:.2f} GiB**.",
        "", "Largest RSS per process kind (peak of any one process of that kind):", "",
        "| process | peak RSS (GiB) |", "|---|---|",
        *[f"| `{k}` | {v / 2**30:.2f} |" for k, v in sorted(first["per_title"].items(), key=lambda kv: -kv[1])[:8]],
        "", f"Every process at the moment of the peak PSS ({len(first['at_peak'])} processes; the largest 12):", "",
        "| process | PSS (GiB) |", "|---|---|",
        *[f"| `{k}` | {v / 2**30:.2f} |" for k, v in first["at_peak"][:12]],
        "", f"Ctrl-C (SIGINT to the process group) while serving: exit status {first['exit']}, "
        f"{first['stop_s']:.1f} s to exit.", "",
        "The console of the first run (stage and epoch lines):", "", "```",
        *[line for line in first["lines"] if re.match(r"\[\w+\] ", line)], "```", "",
        "The report's mAP table (printed by the command; E / M / H, %):", "", "```", *maps, "```", "",
        "## Second run (same run directory)", "",
        f"Every stage skipped: {all(r['skipped'] for r in again) and len(again) == len(stages)} ({skipped}); "
        "command start to example "
        f"query {second['wall_s']:.0f} s, peak memory RSS {second['peak_rss'] / 2**30:.2f} GiB, "
        f"PSS {second['peak_pss'] / 2**30:.2f} GiB; Ctrl-C: exit status {second['exit']} after {second['stop_s']:.1f} s.", "",
    ]
    Path(args.md).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
