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
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 4
TIMEOUT_S = 240


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


@pytest.mark.inductor
def test_compiled_ddp_matches_uncompiled_ddp(tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), str(port), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"

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
