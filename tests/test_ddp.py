"""Distributed: ``torch.compile(DDP(model), backend=normfuse.backend)`` on two gloo ranks over the
loopback interface trains like the uncompiled DDP model, losses and all-reduced gradients alike.

Each rank is a subprocess running this file (``python test_ddp.py RANK WORLD PORT OUT``), so a
hung collective cannot hang the test run: both are killed after ``TIMEOUT_S``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 4
TIMEOUT_S = 420  # each rank compiles forward and backward; 30 s alone on 2 idle cores


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 12)
        self.lin2 = nn.Linear(12, 5)

    def forward(self, x):
        z = self.lin2(torch.relu(self.lin1(x)))
        # per-sample clip factors from a naive norm loop (DP-SGD style)
        norms = torch.stack([torch.sqrt((z[i] ** 2).sum()) for i in range(z.shape[0])])
        return z * (1.0 / (norms + 1e-6)).clamp(max=1.0)[:, None]


def worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel as DDP

    import normfuse

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    plain, twin = Net(), Net()
    twin.load_state_dict(plain.state_dict())
    reference = DDP(plain)
    compiled = torch.compile(DDP(twin), backend=normfuse.backend)
    runs = {"reference": (reference, torch.optim.SGD(plain.parameters(), lr=0.1)),
            "compiled": (compiled, torch.optim.SGD(twin.parameters(), lr=0.1))}
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    record = {name: {"losses": [], "grads": []} for name in runs}
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
        for name, (model, opt) in runs.items():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()  # DDP all-reduces the gradients here
            record[name]["losses"].append(loss.item())
            record[name]["grads"].append([p.grad.flatten().tolist() for p in model.parameters()])
            opt.step()
    record["normfuse"] = dict(counters["normfuse"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path) -> list[str]:
    """Run the ranks; their outputs, or a failure with them. Kills both on a timeout."""
    port = _free_port()
    env = dict(
        os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1",
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), str(port), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = [""] * WORLD
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for rank, p in enumerate(procs):
            logs[rank] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                logs[rank] += p.communicate()[0] + f"\n[killed after {TIMEOUT_S} s]"
    return [f"rank {rank} exited {p.returncode}:\n{log[-3000:]}" if p.returncode else "" for rank, (p, log) in enumerate(zip(procs, logs))]


@pytest.mark.inductor
def test_compiled_ddp_matches_uncompiled_ddp(tmp_path):
    failures = [f for f in _launch(tmp_path) if f]
    if failures and any("address already in use" in f.lower() for f in failures):
        failures = [f for f in _launch(tmp_path) if f]  # the free port was taken meanwhile: once more
    assert not failures, "\n".join(failures)

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, rec in enumerate(records):
        assert rec["normfuse"].get("rewrites", 0) >= 1, rec["normfuse"]
        assert rec["normfuse"].get("pass_failed", 0) == 0
        ref, got = rec["reference"], rec["compiled"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        for step, (gs, rs) in enumerate(zip(got["grads"], ref["grads"])):
            for k, (gg, rg) in enumerate(zip(gs, rs)):
                torch.testing.assert_close(torch.tensor(gg), torch.tensor(rg), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} param {k}: {m}")
    # all-reduced: both ranks hold the same gradients
    for gs0, gs1 in zip(records[0]["compiled"]["grads"], records[1]["compiled"]["grads"]):
        for g0, g1 in zip(gs0, gs1):
            torch.testing.assert_close(torch.tensor(g0), torch.tensor(g1), rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
