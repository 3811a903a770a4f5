"""The parent side: worker processes, a watchdog per compile, and the plan of jobs.

Each worker (``python -m bench.harness DEVICE``) warms up once (backward too, if any job trains) and then serves jobs one by one.
When a compile runs past ``timeout`` seconds the worker is killed, that variant is recorded as
timed out (``>N s``), and the job is run again without it in a fresh worker.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300  # import + warm-up compile
STEADY_TIMEOUT_S = 300  # eager reference + interleaved timing of one job


class WorkerDied(RuntimeError):
    pass


class WorkerTimeout(RuntimeError):
    def __init__(self, variant: str) -> None:
        super().__init__(variant)
        self.variant = variant


class WorkerProcess:
    def __init__(self, device: str, log, backward: bool) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=_pythonpath())
        if device == "cpu":
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.harness", device] + ([] if backward else ["--no-backward"]),
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # its own process group, so a kill reaches compile subprocesses
        )
        self.pending = b""
        try:
            self.info = self.read(STARTUP_TIMEOUT_S, "start-up")
            if self.info.get("event") != "ready":
                raise WorkerDied(f"worker did not start: {self.info}")
        except BaseException:  # a failed start, a timeout or an interrupt: leave no worker behind
            self.kill()
            raise

    def read(self, timeout: float, what: str) -> dict:
        """The next event, or WorkerTimeout if none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise WorkerTimeout(what)
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise WorkerDied(f"worker exited with {self.proc.wait()} (its log has the traceback)")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def send(self, job: dict) -> None:
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _pythonpath() -> str:
    parts = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


class Runner:
    """Runs jobs in one worker at a time, restarting it after a timeout or a crash."""

    def __init__(self, device: str, timeout: float, log_path: Path, backward: bool = True) -> None:
        self.device, self.timeout, self.backward = device, timeout, backward
        self.log = open(log_path, "w")
        self.worker: WorkerProcess | None = None
        self.info: dict = {}
        self.starts = 0

    def _worker(self) -> WorkerProcess:
        if self.worker is None:
            self.worker = WorkerProcess(self.device, self.log, self.backward)
            self.starts += 1
            self.info = self.worker.info
        return self.worker

    def _drop_worker(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None

    def run(self, job: dict) -> dict:
        """``{variant: {...}}``; a variant whose compile timed out has ``timed_out: True``."""
        timed_out: dict[str, dict] = {}
        variants = list(job["variants"])
        for _ in range(len(variants) + 1):
            worker = self._worker()
            try:
                result = self._run_once(worker, dict(job, variants=variants))
                return {**result, **timed_out}
            except WorkerTimeout as e:
                self._drop_worker()
                if e.variant not in variants:  # the timing phase hung: give up on the job
                    return {**timed_out, "error": f"no answer within {STEADY_TIMEOUT_S} s ({e.variant})"}
                timed_out[e.variant] = {"timed_out": True, "first_call_s": self.timeout}
                variants.remove(e.variant)
            except WorkerDied as e:
                self._drop_worker()
                return {**timed_out, "error": str(e)}
        return timed_out

    def _run_once(self, worker: WorkerProcess, job: dict) -> dict:
        worker.send(job)
        waiting_for, deadline = "timing", time.monotonic() + STEADY_TIMEOUT_S
        while True:
            try:
                event = worker.read(max(deadline - time.monotonic(), 0), waiting_for)
            except WorkerTimeout:
                raise WorkerTimeout(waiting_for) from None
            kind = event["event"]
            if kind == "compile":
                waiting_for, deadline = event["variant"], time.monotonic() + self.timeout
            elif kind == "compiled":
                waiting_for, deadline = "timing", time.monotonic() + STEADY_TIMEOUT_S
            elif kind == "done":
                return event["result"]
            elif kind == "error":
                return {"error": event["error"]}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self.log.close()

    def abort(self) -> None:
        """Kill the worker now (the run was interrupted)."""
        self._drop_worker()
        self.log.close()
