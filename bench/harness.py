"""The measuring side: a worker process that compiles cold and times steady state.

``python -m bench.harness DEVICE [--no-backward]`` reads jobs (JSON, one a line) on stdin and writes events (JSON, one a
line) on its original stdout; everything torch prints goes to stderr. A job is one workload at one
size and mode; the worker compiles each requested variant cold, one after the other, telling the
parent before and after each compile (the parent's watchdog kills the worker when a compile runs
past its timeout), then times all variants interleaved, in the same process, and compares each
result with eager naive.

Variants:
  eager     the naive function, eager (no compile)
  dynamo    the naive function under Dynamo alone (backend returns the graph unchanged, run
            eagerly): its first call is Dynamo's own tracing cost; not timed in steady state
  inductor  the naive function, stock torch.compile (Inductor)
  normfuse  the naive function, torch.compile(backend=normfuse.backend)
  ideal     the hand-written batched form, stock torch.compile

A cold compile is: a fresh copy of the function (new code object; ``torch._dynamo.reset()`` once
per job), a fresh ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` with Inductor's in-memory caches cleared (``fresh_cache``), the FX graph
cache and the AOT autograd cache off. The first compile of a process pays 8-11 s of one-time
start-up, so the worker compiles an unrelated function (forward and backward) before any job.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_leaves

import normfuse

from .workloads import WORKLOADS

COMPILED = ("dynamo", "ideal", "normfuse", "inductor")  # compile order: the slowest last
TIMED = ("eager", "inductor", "normfuse", "ideal")


def _fresh_cache(root: str):
    utils = torch._inductor.utils
    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # renamed in torch 2.8
    return fresh(dir=root)


def _configure() -> None:
    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.config.cache_size_limit = 64


class Worker:
    def __init__(self, out) -> None:
        self.out = out
        self.tmp = tempfile.mkdtemp(prefix="normfuse-bench-")

    def emit(self, **event: Any) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    # --- one compile, cold ------------------------------------------------------------------

    def _backend(self, variant: str, graphs: dict):
        if variant == "dynamo":

            def capture(gm, example_inputs):
                graphs["count"] += 1
                graphs["nodes"] += len(gm.graph.nodes)
                return gm.forward

            return capture
        if variant == "normfuse":

            def fused(gm, example_inputs):
                keys = ("nodes_removed", "rewrites", "pass_failed")
                before = [counters["normfuse"][k] for k in keys]
                graphs["count"] += 1
                graphs["nodes"] += len(gm.graph.nodes)
                compiled = normfuse.backend(gm, example_inputs)
                for name, key, b in zip(("removed", "rewrites", "pass_failed"), keys, before):
                    graphs[name] += counters["normfuse"][key] - b
                return compiled

            return fused
        return "inductor"

    def cold_first_call(self, fn, variant: str, make_step, sync) -> tuple[Callable, float, Any, dict]:
        graphs = {"count": 0, "nodes": 0, "removed": 0, "rewrites": 0, "pass_failed": 0}
        with _fresh_cache(self.tmp):
            compiled = torch.compile(fresh_copy(fn), backend=self._backend(variant, graphs), dynamic=False)
            step = make_step(compiled)
            sync()
            t0 = time.perf_counter()
            result = step()
            sync()
            seconds = time.perf_counter() - t0
        return step, seconds, result, graphs

    # --- one job ------------------------------------------------------------------------------

    def run(self, job: dict) -> dict:
        w = WORKLOADS[job["workload"]]
        device = torch.device(job["device"])
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        train = job["mode"] == "fwd+bwd"
        inputs = w.make_inputs(job["B"], device)
        leaves = []
        if train:
            inputs = tuple(t.detach().requires_grad_() if i in w.grad_args else t for i, t in enumerate(inputs))
            leaves = [inputs[i] for i in w.grad_args]

        def make_step(fn):
            if not train:
                return lambda: fn(*inputs)

            def step():
                for t in leaves:
                    t.grad = None
                out = fn(*inputs)
                sum(o.sum() for o in tree_leaves(out)).backward()
                return out, [t.grad for t in leaves]

            return step

        torch._dynamo.reset()
        steps = {"eager": make_step(w.naive)}
        results = {"eager": steps["eager"]()}
        res: dict[str, dict] = {v: {} for v in job["variants"]}
        live_graphs: dict[str, dict] = {}
        for variant in [v for v in COMPILED if v in job["variants"]]:
            fn = w.ideal if variant == "ideal" else w.naive
            self.emit(event="compile", variant=variant)
            times = []
            while True:  # repeat cheap cold compiles, keep the median
                step, seconds, result, graphs = self.cold_first_call(fn, variant, make_step, sync)
                times.append(seconds)
                if len(times) >= job["compile_repeats"] or sum(times) + seconds > job["compile_budget_s"]:
                    break
            res[variant].update(first_call_s=statistics.median(times), compiles=len(times), graphs=dict(graphs))
            self.emit(event="compiled", variant=variant, seconds=res[variant]["first_call_s"])
            live_graphs[variant] = graphs
            if variant != "dynamo":
                steps[variant], results[variant] = step, result

        ref = results["eager"]
        res["eager"]["scale"] = max_abs_diff(ref, torch.zeros((), device=device), broadcast=True)
        for variant, result in results.items():
            if variant in res:
                res[variant]["max_diff"] = max_abs_diff(result, ref)
        timed = {v: s for v, s in steps.items() if v in job["variants"] and v in TIMED}
        for variant, t in time_interleaved(timed, job["repeats"], job["target_ms"] / 1e3, sync).items():
            res[variant].update(run_ms=t["ms"], run_min_ms=t["min_ms"], run_samples=t["samples"])
        for variant, graphs in live_graphs.items():
            if graphs != res[variant]["graphs"]:  # a guard failed in steady state: the timing is suspect
                res[variant]["recompiled"] = True
        if device.type == "cuda" and not train and "normfuse" in steps:
            try:
                res["normfuse"]["kernel_ms"], res["normfuse"]["kernels"] = cuda_kernel_ms(steps["normfuse"])
                res["normfuse"]["min_bytes"] = sum(t.nbytes for t in tree_leaves((inputs, ref)) if isinstance(t, torch.Tensor))
            except Exception as e:  # the profiler is an extra: keep the job's timings
                res["normfuse"]["kernel_ms_error"] = f"{type(e).__name__}: {e}"[:300]
        return res


def fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object: Dynamo keeps its compiled code per code object, so every
    variant compiles from scratch and no compile evicts another (as ``torch._dynamo.reset()``,
    called once per job, would)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def max_abs_diff(a, b, broadcast: bool = False) -> float:
    """Largest |a - b| over all tensors of two results (``broadcast``: ``b`` is one tensor for all)."""
    xs = [t for t in tree_leaves(a) if isinstance(t, torch.Tensor)]
    ys = [t for t in tree_leaves(b) if isinstance(t, torch.Tensor)]
    if broadcast:
        ys = ys * len(xs)
    if len(xs) != len(ys):
        return float("nan")
    return max(((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(xs, ys)), default=0.0)


def time_interleaved(steps: dict[str, Callable], repeats: int, target_s: float, sync, budget_s: float = 0.6) -> dict[str, dict]:
    """Steady state of each step: ``{"ms": median, "min_ms": min, "samples": n}`` per call.

    Each sample is a loop of about ``target_s``; every round takes one sample of every step, in
    rotating order, so the variants share whatever else the machine is doing. Short samples and
    many rounds keep the median clear of preemption on a busy machine (most 1 ms samples run
    uninterrupted even when other processes take half the core); a step stops after ``budget_s``
    of samples (but takes at least 5).
    """
    loops, wanted = {}, {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        once = max(time.perf_counter() - t0, 1e-7)
        loops[name] = max(1, int(target_s / once))
        wanted[name] = min(repeats, max(5, int(budget_s / (once * loops[name]))))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(max(wanted.values(), default=0)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if len(samples[name]) >= wanted[name]:
                continue
            step, n = steps[name], loops[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
    return {name: {"ms": statistics.median(s), "min_ms": min(s), "samples": len(s)} for name, s in samples.items()}


def cuda_kernel_ms(step: Callable, calls: int = 20) -> tuple[float, dict[str, float]]:
    """Device time of the kernels one call launches (ms per call), and each kernel's µs per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.self_device_time_total / calls
    return sum(kernels.values()) / 1e3, kernels


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second (the card's practical peak)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times) / 1e9


def warm_up(device: torch.device, backward: bool) -> None:
    def unrelated(a, b):
        return (a.sin() * b).sum(0) + b.cos().mean()

    a = torch.randn(8, 8, device=device, requires_grad=backward)
    b = torch.randn(8, 8, device=device)
    tmp = tempfile.mkdtemp(prefix="normfuse-bench-warm-")
    with _fresh_cache(tmp):  # normfuse's backend ends in Inductor: both get warm
        out = torch.compile(unrelated, backend=normfuse.backend)(a, b).sum()
        if backward:
            out.backward()
    torch._dynamo.reset()


def main() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever torch or the C++ compiler prints goes to stderr
    _configure()
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    worker = Worker(proto)
    t0 = time.perf_counter()
    warm_up(device, backward="--no-backward" not in sys.argv)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device_name": "cpu"}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(), copy_gbs=copy_bandwidth_gbs())
        torch.cuda.empty_cache()
    worker.emit(event="ready", warmup_s=time.perf_counter() - t0, **info)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            worker.emit(event="done", result=worker.run(job))
        except Exception as e:  # report and keep serving; the parent records the error
            worker.emit(event="error", error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
    main()
