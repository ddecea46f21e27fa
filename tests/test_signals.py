"""Ctrl-C ends `raytrieval pipeline` cleanly: during training, and while serving after a fresh
run in the same process (where Ray Train's SIGINT handler used to swallow it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from trainset import tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def _ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the run's own RAY_TMPDIR)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":  # exited, waiting to be reaped
            continue
        if marker in cmd:
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """`raytrieval pipeline` in its own session and process group, with its own embedded Ray."""

    def __init__(self, config: Path, ray_tmp: str, serve: bool):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp)
        cmd = [sys.executable, "-m", "raytrieval.cluster.cli", "pipeline", "--config", str(config)]
        if serve:
            cmd += ["--port", str(_free_port())]
        else:
            cmd.append("--no-serve")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"{what} did not happen; output:\n" + "\n".join(self.lines[-40:]))

    def interrupt(self) -> tuple[int, float]:
        """SIGINT to the whole process group (what Ctrl-C in a terminal does): (status, seconds)."""
        start = time.time()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the pipeline did not end within 60 s of SIGINT; output:\n" + "\n".join(self.lines[-40:]))
        return rc, time.time() - start

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_pipeline_config(tmp_path_factory.mktemp("signals"))


def _assert_clean_exit(rc: int, seconds: float, ray_tmp: str, run: Run) -> None:
    assert rc == 130, "\n".join(run.lines[-40:])
    assert seconds <= 20, f"took {seconds:.1f} s after SIGINT:\n" + "\n".join(run.lines[-40:])
    deadline = time.time() + 5  # processes already signalled may take a moment to be reaped
    while _ray_processes(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(ray_tmp), _ray_processes(ray_tmp)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ctrl_c_during_training_then_while_serving(tiny):
    cfg = yaml.safe_load(tiny.read_text())
    train_dir = Path(cfg["run_dir"]) / "train" / "finetune"
    ray_tmp = tempfile.mkdtemp(prefix="rt-sig-")

    run = Run(tiny, ray_tmp, serve=False)
    # the workers are training once the initial model's checkpoint is there
    run.wait_for(lambda: any(train_dir.glob("epoch_*")), 900, "a training checkpoint")
    rc, seconds = run.interrupt()
    _assert_clean_exit(rc, seconds, ray_tmp, run)
    assert not (Path(cfg["run_dir"]) / "stages" / "train.json").exists()  # training did not finish

    # the same run again: it resumes training, then serves from the process that trained
    run = Run(tiny, ray_tmp, serve=True)
    run.wait_for(lambda: any(line.startswith("example query") for line in run.lines), 900, "serving")
    time.sleep(1)
    rc, seconds = run.interrupt()
    _assert_clean_exit(rc, seconds, ray_tmp, run)
    assert not any("Gracefully aborting" in line for line in run.lines)


# ------------------------------------------------------------------------------------------
# the pieces, in this process


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve_until_stopped_ends_on_a_signal(monkeypatch, signum, status):
    from raytrieval.cluster import runtime

    stopped = []
    monkeypatch.setattr(runtime, "shutdown_ray", lambda serve_too=False: stopped.append(serve_too))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()
    start = time.time()
    assert runtime.serve_until_stopped() == status
    assert time.time() - start < 5 and stopped == [True]
    assert {s: signal.getsignal(s) for s in before} == before  # handlers put back


def test_a_stuck_shutdown_is_cut_short_with_the_signal_status(monkeypatch):
    from raytrieval.cluster import runtime

    class Exited(Exception):
        pass

    def exit_now(status):
        raise Exited(status)

    never = threading.Event()
    killed = []
    monkeypatch.setattr(runtime, "shutdown_ray", lambda serve_too=False: never.wait())  # Serve never answers
    monkeypatch.setattr(runtime, "kill_local_ray", lambda: killed.append(True))
    monkeypatch.setattr(runtime.os, "_exit", exit_now)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.time()
    with pytest.raises(Exited) as exited:
        runtime.serve_until_stopped(shutdown_s=1.0)
    assert exited.value.args == (130,) and killed == [True]
    assert 1.0 <= time.time() - start < 5
    never.set()


def test_epoch_lines_from_checkpoints(tmp_path):
    import json

    from raytrieval.trainers.fit import EpochPrinter, epoch_line

    metrics = {"epoch": 2, "loss": 0.41234, "val_map_medium": 0.6123, "val_map_hard": float("nan"),
               "val_ns_score": 0.25, "val_s": 10.0, "mine_s": 2.0, "train_s": 30.4, "lr": 1e-5}
    assert epoch_line(metrics, 3) == "[train] epoch 2/3, loss 0.4123, val mAP medium 61.2, val ns score 0.250, 42 s"

    (tmp_path / "epoch_0000").mkdir()
    (tmp_path / "epoch_0000" / "history.json").write_text(json.dumps([{"epoch": 0}]))
    printed: list[str] = []
    printer = EpochPrinter(tmp_path, 3, echo=printed.append)  # epoch 0 was there: a resumed run
    (tmp_path / "epoch_0001").mkdir()
    printer.print_new()  # history.json not written yet
    (tmp_path / "epoch_0001" / "history.json").write_text(json.dumps([{"epoch": 0}, {"epoch": 1, "loss": 0.5}]))
    printer.print_new()
    printer.print_new()
    assert printed == ["[train] epoch 1/3, loss 0.5000, 0 s"]
