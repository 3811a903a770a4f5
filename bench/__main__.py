"""``python -m bench``: naive norm loops under eager, stock Inductor, normfuse, and the ideal.

    python -m bench --quick                  # about 2 minutes on 2 CPU cores
    python -m bench                          # the full CPU run (under 10 minutes)
    python -m bench --device cuda            # the same on a GPU
    python -m bench --workloads l2-index,wgan-gp --sizes 32,128 --modes fwd+bwd --sweep none
    python -m bench --sweep l2-image:fwd:64,256,1024 --sizes 64
    python -m bench --render bench/results/cpu.json   # redo cpu.md (and the PNG) from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import report
from .runner import ROOT, Runner
from .workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"
ALL_VARIANTS = ["eager", "dynamo", "inductor", "normfuse", "ideal"]

# name: (sizes, steady-state repeats, ms per repeat, cold compiles at most)
PRESETS = {
    "quick": ([8], 101, 1.0, 1),
    "full": ([64], 201, 1.0, 3),
}


DEFAULT_SWEEP = "l2-index:fwd+bwd:8,16,64,256,1024"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _sweep(text: str) -> tuple[str, str, list[int]] | None:
    if text == "none":
        return None
    try:
        name, mode, sizes = text.split(":")
        assert name in WORKLOADS and mode in ("fwd", "fwd+bwd")
        return name, mode if WORKLOADS[name].trains else "fwd", _ints(sizes)
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected WORKLOAD:MODE:B,B,... with a workload from {', '.join(WORKLOADS)}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=8, forward only, no sweep, one cold compile each (under 2 min on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--sizes", type=_ints, help="B values of the main table (default 64; --quick: 8)")
    p.add_argument(
        "--modes",
        default=None,
        help="fwd and/or fwd+bwd (fwd+bwd only where the workload trains), or 'own': fwd+bwd where the "
        "workload trains, else fwd (default own; --quick: fwd)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        type=_sweep,
        help="a scaling sweep WORKLOAD:MODE:B,B,...; repeatable; 'none' for no sweep "
        f"(default {DEFAULT_SWEEP}; --quick: none)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per compile before it is reported as '>N s'")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new job after this long; what ran is saved")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for <device>.md/.json/-sweep.png")
    p.add_argument("--name", default=None, help="file stem (default: the device, e.g. cpu, cuda-h100; '-quick' added with --quick)")
    p.add_argument("--no-plot", action="store_true", help="skip the sweep's PNG")
    p.add_argument("--render", type=Path, metavar="JSON", help="only redo the .md (and PNG) of a saved run from its .json")
    args = p.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.sweep is None:
        args.sweep = [] if args.quick else [_sweep(DEFAULT_SWEEP)]
    args.sweep = [sw for sw in args.sweep if sw is not None]
    if args.modes is None:
        args.modes = "fwd" if args.quick else "own"
    if args.modes != "own" and set(args.modes.split(",")) - {"fwd", "fwd+bwd"}:
        p.error("--modes takes fwd and/or fwd+bwd, or own")
    return args


def plan(args: argparse.Namespace, preset: tuple) -> list[dict]:
    sizes, repeats, target_ms, compile_repeats = preset
    sizes = args.sizes if args.sizes is not None else sizes
    # The sweeps run first: with --max-minutes, the scaling data is what must not be lost.
    common = dict(device=args.device, repeats=repeats, target_ms=target_ms, compile_repeats=compile_repeats, compile_budget_s=3.0)
    jobs = []
    for name, mode, sweep_sizes in args.sweep:
        for B in sweep_sizes:
            jobs.append(dict(common, section=f"sweep {name} {mode}", workload=name, B=B, mode=mode, variants=ALL_VARIANTS))
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        modes = ["fwd+bwd" if w.trains else "fwd"] if args.modes == "own" else args.modes.split(",")
        for B in sizes:
            for mode in modes:
                if mode == "fwd" or w.trains:
                    jobs.append(dict(common, section="table", workload=name, B=B, mode=mode, variants=ALL_VARIANTS))
    return jobs


def _normfuse_revision() -> str:
    """The commit the measured normfuse comes from, and whether normfuse/ had uncommitted edits."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        rev = git("rev-parse", "--short", "HEAD")
        if not rev:
            return "unknown"
        return rev + (" + uncommitted normfuse/ edits" if git("status", "--porcelain", "--", "normfuse") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args.render, plot=not args.no_plot)
    preset = PRESETS["quick" if args.quick else "full"]
    jobs = plan(args, preset)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.device
    log = args.out / f"{stem}{'-quick' if args.quick else ''}.log"
    runner = Runner(args.device, args.timeout, log, backward=any(job["mode"] == "fwd+bwd" for job in jobs))
    data = {
        "meta": {
            "command": " ".join(["python -m bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": args.device,
            "out": os.path.relpath(args.out),
            "timeout_s": args.timeout,
            "repeats": preset[1],
            "sample_ms": preset[2],
            "normfuse_revision": _normfuse_revision(),
            "load_before": os.getloadavg()[0],
            "workloads": {n: f"{WORKLOADS[n].naive_code}; B = {WORKLOADS[n].b_means}" for n in dict.fromkeys(job["workload"] for job in jobs)},
        },
        "rows": [],
    }
    done: dict[tuple, dict] = {}
    late: dict[tuple, int] = {}  # (workload, mode): smallest B whose stock compile timed out
    print(f"normfuse bench: {len(jobs)} jobs on {args.device}, 1 thread, timeout {args.timeout:g} s per compile", flush=True)
    signal.signal(signal.SIGTERM, _terminate)  # `timeout` and the like: save, then stop the worker
    try:
        for i, job in enumerate(jobs, 1):
            if args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60:
                print(f"--max-minutes reached: {len(jobs) - i + 1} jobs not run", flush=True)
                break
            key = (job["workload"], job["B"], job["mode"])
            if key not in done:
                variants = list(job["variants"])
                skipped = {}
                if job["B"] >= late.get((job["workload"], job["mode"]), job["B"] + 1):  # a larger B would time out too
                    variants.remove("inductor")
                    skipped["inductor"] = {"timed_out": True, "first_call_s": args.timeout, "not_run": True}
                t0 = time.monotonic()
                done[key] = {**runner.run(dict(job, variants=variants)), **skipped}
                if done[key].get("inductor", {}).get("timed_out"):
                    late[key[0], key[2]] = min(job["B"], late.get((key[0], key[2]), job["B"]))
                print(f"[{i}/{len(jobs)}] {key[0]} B={key[1]} {key[2]}: {time.monotonic() - t0:.1f} s", flush=True)
            data["rows"].append({"section": job["section"], "workload": job["workload"], "B": job["B"], "mode": job["mode"], "result": done[key]})
            _finish(data, runner, args, started, final=False)
    except BaseException:
        runner.abort()
        raise
    runner.close()
    _finish(data, runner, args, started, final=True)
    return 0


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _finish(data: dict, runner: Runner, args: argparse.Namespace, started: float, final: bool) -> None:
    """Save the results so far (after every job, so an interrupted run keeps what it measured)."""
    info = runner.info
    meta = data["meta"]
    meta.update(
        torch=info.get("torch", "?"),
        threads=info.get("threads", 1),
        device_name=info.get("device_name", args.device),
        copy_gbs=info.get("copy_gbs"),
        worker_starts=runner.starts,
        wall_s=time.monotonic() - started,
        load_after=os.getloadavg()[0],
    )
    slug = args.name or report.device_slug(args.device, meta["device_name"])
    meta["slug"] = slug + ("-quick" if args.quick else "")
    if final:
        _publish(data, args.out, plot=not args.no_plot)
    else:
        report.save(data, args.out)


def _publish(data: dict, out: Path, plot: bool) -> None:
    """Write the JSON, the markdown and the sweep's PNG; print the tables."""
    sweeps = report.sweep_points(data["rows"])
    if sweeps and plot:
        png = report.plot_sweeps(sweeps, out / f"{data['meta']['slug']}-sweep.png")
        data["meta"]["plot"] = png.name if png else None
        if png is None:
            print("matplotlib is not installed: no sweep plot (pip install matplotlib)")
    report.save(data, out)
    print()
    print(report.text(data))


def render(path: Path, plot: bool) -> int:
    """Redo the markdown (and the PNG) of a saved run from its JSON, e.g. after a report change."""
    data = json.loads(path.read_text())
    data["meta"]["out"] = os.path.relpath(path.parent)
    _publish(data, path.parent, plot)
    return 0

if __name__ == "__main__":
    sys.exit(main())
