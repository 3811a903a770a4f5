"""``python -m bench``: naive norm loops under eager, stock Inductor, normfuse, and the ideal.

    python -m bench --quick                  # about 2 minutes on 2 CPU cores
    python -m bench                          # the full CPU run (under 10 minutes)
    python -m bench --device cuda            # the same on a GPU
    python -m bench --workloads l2-index,wgan-gp --sizes 32,128 --modes fwd+bwd --sweep-sizes none
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

from . import report
from .runner import Runner
from .workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"
ALL_VARIANTS = ["eager", "dynamo", "inductor", "normfuse", "ideal"]

# name: (sizes, sweep sizes, steady-state repeats, ms per repeat, cold compiles at most)
PRESETS = {
    "quick": ([8], [], 3, 3.0, 1),
    "full": ([16, 64], [8, 16, 64, 256, 512, 1024], 7, 15.0, 3),
}


def _ints(text: str) -> list[int]:
    return [] if text in ("", "none") else [int(x) for x in text.split(",")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="B=8, each workload in its own mode, no sweep, one cold compile each (under 2 min on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--sizes", type=_ints, help="B values of the main table (default 16,64; --quick: 8)")
    p.add_argument(
        "--modes",
        default=None,
        help="fwd and/or fwd+bwd (fwd+bwd only where the workload trains), or 'own': fwd+bwd where the "
        "workload trains, else fwd (default fwd,fwd+bwd; --quick: own)",
    )
    p.add_argument("--sweep-sizes", type=_ints, help="B values of the scaling sweep, or 'none' (default 8,16,64,256,512,1024)")
    p.add_argument("--sweep-workload", default="l2-index", choices=list(WORKLOADS))
    p.add_argument("--sweep-mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per compile before it is reported as '>N s'")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new job after this long; what ran is saved")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for <device>.md/.json/-sweep.png")
    p.add_argument("--name", default=None, help="file stem (default: the device, e.g. cpu, cuda-h100; '-quick' added with --quick)")
    p.add_argument("--no-plot", action="store_true", help="skip the sweep's PNG")
    args = p.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    if args.modes is None:
        args.modes = "own" if args.quick else "fwd,fwd+bwd"
    if args.modes != "own" and set(args.modes.split(",")) - {"fwd", "fwd+bwd"}:
        p.error("--modes takes fwd and/or fwd+bwd, or own")
    return args


def plan(args: argparse.Namespace, preset: tuple) -> list[dict]:
    sizes, sweep_sizes, repeats, target_ms, compile_repeats = preset
    sizes = args.sizes if args.sizes is not None else sizes
    sweep_sizes = args.sweep_sizes if args.sweep_sizes is not None else sweep_sizes
    common = dict(device=args.device, repeats=repeats, target_ms=target_ms, compile_repeats=compile_repeats, compile_budget_s=3.0)
    jobs = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        modes = ["fwd+bwd" if w.trains else "fwd"] if args.modes == "own" else args.modes.split(",")
        for B in sizes:
            for mode in modes:
                if mode == "fwd" or w.trains:
                    jobs.append(dict(common, section="table", workload=name, B=B, mode=mode, variants=ALL_VARIANTS))
    sweep = WORKLOADS[args.sweep_workload]
    mode = args.sweep_mode if sweep.trains else "fwd"
    for B in sweep_sizes:
        jobs.append(dict(common, section="sweep", workload=sweep.name, B=B, mode=mode, variants=ALL_VARIANTS))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = PRESETS["quick" if args.quick else "full"]
    jobs = plan(args, preset)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.device
    runner = Runner(args.device, args.timeout, args.out / f"{stem}{'-quick' if args.quick else ''}.log")
    data = {
        "meta": {
            "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": args.device,
            "timeout_s": args.timeout,
            "workloads": {n: WORKLOADS[n].naive_code for n in args.workloads.split(",")},
        },
        "rows": [],
    }
    done: dict[tuple, dict] = {}
    late: set[tuple] = set()  # (workload, mode) whose stock compile timed out: larger B would too
    print(f"normfuse bench: {len(jobs)} jobs on {args.device}, 1 thread, timeout {args.timeout:g} s per compile", flush=True)
    try:
        for i, job in enumerate(jobs, 1):
            if args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60:
                print(f"--max-minutes reached: {len(jobs) - i + 1} jobs not run", flush=True)
                break
            key = (job["workload"], job["B"], job["mode"])
            if key not in done:
                variants = list(job["variants"])
                skipped = {}
                if (job["workload"], job["mode"]) in late:
                    variants.remove("inductor")
                    skipped["inductor"] = {"timed_out": True, "first_call_s": args.timeout, "not_run": True}
                t0 = time.monotonic()
                done[key] = {**runner.run(dict(job, variants=variants)), **skipped}
                if done[key].get("inductor", {}).get("timed_out"):
                    late.add((job["workload"], job["mode"]))
                print(f"[{i}/{len(jobs)}] {key[0]} B={key[1]} {key[2]}: {time.monotonic() - t0:.1f} s", flush=True)
            data["rows"].append({"section": job["section"], "workload": job["workload"], "B": job["B"], "mode": job["mode"], "result": done[key]})
            _finish(data, runner, args, started, final=False)
    finally:
        runner.close()
    _finish(data, runner, args, started, final=True)
    return 0


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
    )
    slug = args.name or report.device_slug(args.device, meta["device_name"])
    meta["slug"] = slug + ("-quick" if args.quick else "")
    sweep = [r for r in data["rows"] if r["section"] == "sweep"]
    if final and sweep and not args.no_plot:
        png = report.plot_sweep(sweep, args.out / f"{meta['slug']}-sweep.png")
        meta["plot"] = png.name if png else None
        if png is None:
            print("matplotlib is not installed: no sweep plot (pip install matplotlib)")
    json_path, md_path = report.save(data, args.out)
    if not final:
        return
    table = [r for r in data["rows"] if r["section"] == "table"]
    print()
    print(report.render_table(table, "simple"))
    if sweep:
        print(f"\nScaling sweep: {sweep[0]['workload']}, {sweep[0]['mode']}")
        print(report.render_table(sweep, "simple"))
    print("\nTargets:")
    print("\n".join(report.verdicts(table + sweep)))
    bw = report.bandwidth_lines(table + sweep, meta)
    if bw:
        print("\nMemory bandwidth of the normfuse kernels (forward):\n" + "\n".join(bw))
    print(f"\n{meta['device_name']}, torch {meta['torch']}, 1 thread; {meta['wall_s']:.0f} s; saved {md_path} and {json_path.name}")


if __name__ == "__main__":
    sys.exit(main())
