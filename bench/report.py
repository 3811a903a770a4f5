"""Tables (tabulate), the targets' verdicts, and the JSON/markdown/PNG files under bench/results/."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tabulate import tabulate

RUN_VS_IDEAL = 1.10  # target: normfuse's steady state within 1.10x of the ideal
NOT_SLOWER = 1.05  # "never slower than stock Inductor", allowing 5% of timing noise
FIRST_CALL_IDEAL = 1.5  # target: first call within Dynamo's tracing + 1.5x the ideal's compile
MAX_REL_DIFF = 1e-4  # sanity: compiled results agree with eager naive to 1e-4 of max(1, |eager|)
FIRST_CALL_SPEEDUP = 10.0  # target: >= 10x faster first call than stock at B=256 with backward
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0}  # datasheet HBM bandwidth


def device_slug(device: str, device_name: str) -> str:
    """``cpu``, ``cuda-h100``, ``cuda-h200``, ... for file names."""
    if device == "cpu":
        return "cpu"
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", device_name)
    return f"cuda-{found.group(1).lower()}" if found else "cuda"


def _sig(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}{unit}"


def _first(v: dict) -> str:
    if not v:
        return "-"
    if v.get("timed_out"):
        return f">{v['first_call_s']:.0f} s"
    return _sig(v.get("first_call_s"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(row: dict, variant: str) -> tuple[float | None, float | None]:
    v = row["result"].get(variant, {})
    first = None if v.get("timed_out") else v.get("first_call_s")
    return first, v.get("run_ms")


def _first_speedup(row: dict) -> str:
    stock = row["result"].get("inductor", {})
    nf_first, _ = _times(row, "normfuse")
    if not stock or not nf_first:
        return "-"
    if stock.get("timed_out"):
        return f">{stock['first_call_s'] / nf_first:.3g}x"
    return _sig(_ratio(stock["first_call_s"], nf_first), "x")


def _nodes(row: dict) -> str:
    g = row["result"].get("normfuse", {}).get("graphs")
    if not g:
        return "-"
    failed = " (pass failed)" if g.get("pass_failed") else ""
    return f"{g['nodes']} → {g['nodes'] - g['removed']}{failed}"


def _max_diff(row: dict) -> str:
    diffs = [v.get("max_diff") for k, v in row["result"].items() if k in ("inductor", "normfuse", "ideal") and isinstance(v, dict)]
    diffs = [d for d in diffs if d is not None]
    return f"{max(diffs):.1e}" if diffs else "-"


HEADERS = [
    "workload",
    "B",
    "mode",
    "graph nodes\nbefore → after",
    "eager naive\nrun ms",
    "stock Inductor\nfirst s / run ms",
    "normfuse\nfirst s / run ms",
    "ideal (Inductor)\nfirst s / run ms",
    "Dynamo\ntrace s",
    "normfuse vs stock\nfirst call / run",
    "normfuse ÷ ideal\nrun",
    "max |diff|\nto eager",
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        r = row["result"]
        if "error" in r:
            out.append([row["workload"], row["B"], row["mode"], f"error: {r['error']}"] + [""] * (len(HEADERS) - 4))
            continue
        _, stock_ms = _times(row, "inductor")
        _, nf_ms = _times(row, "normfuse")
        _, ideal_ms = _times(row, "ideal")
        cell = lambda v: f"{_first(r.get(v, {}))} / {_sig(r.get(v, {}).get('run_ms'))}"  # noqa: E731
        out.append(
            [
                row["workload"],
                row["B"],
                row["mode"],
                _nodes(row),
                _sig(r.get("eager", {}).get("run_ms")),
                cell("inductor"),
                cell("normfuse"),
                cell("ideal"),
                _first(r.get("dynamo", {})),
                f"{_first_speedup(row)} / {_sig(_ratio(stock_ms, nf_ms), 'x')}",
                _sig(_ratio(nf_ms, ideal_ms), "x"),
                _max_diff(row),
            ]
        )
    return out


def render_table(rows: list[dict], tablefmt: str) -> str:
    headers = HEADERS if tablefmt != "github" else [h.replace("\n", " ") for h in HEADERS]
    return tabulate(table_rows(rows), headers=headers, tablefmt=tablefmt, disable_numparse=True)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target: how many rows meet it, and the rows that do not.

    Run-time targets are judged on the median (what the table shows) and on the fastest sample:
    on a shared machine the median of identical code can differ by 30% between variants, while
    the fastest samples agree within a few percent.
    """
    checks: dict[str, tuple[list[str], list[str]]] = {}

    def check(name: str, row: dict, ok: bool | None, detail: str) -> None:
        met, missed = checks.setdefault(name, ([], []))
        if ok is None:
            return
        g = row["result"].get("normfuse", {}).get("graphs", {})
        note = "" if g.get("rewrites") else ", not rewritten"
        (met if ok else missed).append(f"{row['workload']} B={row['B']} {row['mode']} ({detail}{note})")

    for row in rows:
        if "error" in row["result"]:
            continue
        diffs = [v.get("max_diff") for k, v in row["result"].items() if k in ("inductor", "normfuse", "ideal")]
        diffs = [d for d in diffs if d is not None]
        if diffs:
            scale = max(1.0, row["result"]["eager"].get("scale", 1.0))
            check(f"numerics: compiled = eager naive within {MAX_REL_DIFF:g} x max(1, |eager|)", row, max(diffs) <= MAX_REL_DIFF * scale, f"{max(diffs):.1e}")
        nf_first, _ = _times(row, "normfuse")
        ideal_first, _ = _times(row, "ideal")
        dyn_first, _ = _times(row, "dynamo")
        r = row["result"]
        for stat, key in (("median", "run_ms"), ("min", "run_min_ms")):
            nf, ideal, stock = (r.get(v, {}).get(key) for v in ("normfuse", "ideal", "inductor"))
            q = _ratio(nf, ideal)
            check(f"run ({stat}): normfuse ≤ {RUN_VS_IDEAL}x ideal", row, None if q is None else q <= RUN_VS_IDEAL, f"{q:.2f}x" if q else "")
            q = _ratio(nf, stock)
            check(f"run ({stat}): normfuse not slower than stock (≤ {NOT_SLOWER}x)", row, None if q is None else q <= NOT_SLOWER, f"{q:.2f}x" if q else "")
        if None not in (nf_first, ideal_first, dyn_first):
            bound = dyn_first + FIRST_CALL_IDEAL * ideal_first
            check(f"first call: normfuse ≤ Dynamo + {FIRST_CALL_IDEAL}x ideal", row, nf_first <= bound, f"{nf_first:.2f} s vs {bound:.2f} s")
        stock = r.get("inductor", {})
        if row["B"] == 256 and row["mode"] == "fwd+bwd" and nf_first and stock:
            q = stock["first_call_s"] / nf_first
            ok = q >= FIRST_CALL_SPEEDUP
            check(f"first call at B=256 fwd+bwd: ≥ {FIRST_CALL_SPEEDUP:g}x faster than stock", row, ok, f"{'>' if stock.get('timed_out') else ''}{q:.1f}x")
    lines = []
    for name, (met, missed) in checks.items():
        total = len(met) + len(missed)
        line = f"- {name}: {len(met)}/{total} rows"
        if missed:
            line += "; missed by: " + "; ".join(missed)
        lines.append(line)
    return lines


def bandwidth_lines(rows: list[dict], info: dict) -> list[str]:
    """Achieved memory bandwidth of the rewritten (normfuse) forward, CUDA only."""
    name = info.get("device_name", "")
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    lines = []
    for row in rows:
        nf = row["result"].get("normfuse", {})
        if "kernel_ms" not in nf or not nf.get("graphs", {}).get("rewrites"):
            continue
        gb = nf["min_bytes"] / 1e9
        kernel, call = gb / (nf["kernel_ms"] / 1e3), gb / (nf["run_ms"] / 1e3)
        share = f", {kernel / peak:.0%} of the {peak / 1e3:.2f} TB/s datasheet peak" if peak else ""
        lines.append(
            f"- {row['workload']} B={row['B']}: {nf['min_bytes'] / 1e6:.2f} MB read+written; kernels "
            f"{nf['kernel_ms'] * 1e3:.1f} µs → {kernel:.0f} GB/s{share}; whole call {nf['run_ms'] * 1e3:.1f} µs → {call:.0f} GB/s"
        )
    if lines and info.get("copy_gbs"):
        lines.append(f"- measured device-to-device copy on this card: {info['copy_gbs']:.0f} GB/s (read+write)")
    return lines


def sections(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by section: "table" first, then each "sweep WORKLOAD MODE" in the order they ran."""
    out: dict[str, list[dict]] = {"table": []}
    for row in rows:
        out.setdefault(row["section"], []).append(row)
    return {k: v for k, v in out.items() if v}


def _summary(data: dict) -> list[tuple[str, list[str]]]:
    """(heading, lines) for the targets and, on CUDA, the bandwidth."""
    rows, meta = data["rows"], data["meta"]
    out = [("Targets", verdicts(rows))]
    bw = bandwidth_lines(rows, meta)
    if bw:
        out.append(("Memory bandwidth of the normfuse kernels (forward)", bw))
    return out


def _title(section: str) -> str:
    return "Results" if section == "table" else "Scaling sweep: " + section.removeprefix("sweep ")


def text(data: dict) -> str:
    """What ``python -m bench`` prints at the end."""
    meta, out = data["meta"], []
    for section, rows in sections(data["rows"]).items():
        out += [_title(section), render_table(rows, "simple"), ""]
    for heading, lines in _summary(data):
        out += [heading + ":"] + lines + [""]
    out.append(f"{meta['device_name']}, torch {meta['torch']}, 1 thread; {meta['wall_s']:.0f} s; saved {meta['out']}/{meta['slug']}.md and .json")
    return "\n".join(out)


def markdown(data: dict) -> str:
    meta = data["meta"]
    out = [
        f"# normfuse benchmark: {meta['slug']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['threads']} intra-op thread "
        f"(`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`); per-compile timeout {meta['timeout_s']:g} s; "
        f"wall time {meta['wall_s']:.0f} s; {meta['date']}.  ",
        f"normfuse at {meta['normfuse_revision']}. Load average (1 min) {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after: other work shared the 2 cores, so compare ratios within a row more than "
        "absolute times across rows." if meta["device"] == "cpu" else f"normfuse at {meta['normfuse_revision']}.",
        *([meta["note"] + ".", ""] if meta.get("note") else [""]),
        "first = first call (s) after a cold compile: fresh function, fresh `TORCHINDUCTOR_CACHE_DIR`, "
        "Inductor caches cleared, FX graph and AOT autograd caches off, each worker warmed up on an unrelated "
        "function first; median of up to 3 while cheap. run = steady-state ms per call: median of up to "
        f"{meta['repeats']} samples of about {meta['sample_ms']:g} ms, the variants interleaved in one process. fwd+bwd = `out.sum().backward()` included. Dynamo trace = first call with a "
        "backend that returns the graph unchanged. graph nodes = Dynamo graph before → after the normfuse pass "
        "(unchanged: not rewritten). max |diff| = compiled variants (stock, normfuse, ideal) against eager naive, "
        "outputs and gradients. `>N s`: the compile was killed after N s (or not tried, after a smaller B timed out).",
        "",
        "## Workloads",
        "",
    ]
    out += [f"- `{name}`: `{code}`" for name, code in meta["workloads"].items()]
    out.append("")
    for section, rows in sections(data["rows"]).items():
        out += [f"## {_title(section)}", "", render_table(rows, "github"), ""]
    if meta.get("plot"):
        out += [f"![sweep]({meta['plot']})", ""]
    for heading, lines in _summary(data):
        out += [f"## {heading}", ""] + lines + [""]
    return "\n".join(out)


def save(data: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / data["meta"]["slug"]
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown(data))
    return json_path, md_path


def sweep_points(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """Per sweep, ``{B: result}``; rows of the same workload and mode from the table join in."""
    out = {}
    for section in sections(rows):
        if section == "table":
            continue
        _, name, mode = section.split(" ")
        out[section] = {r["B"]: r["result"] for r in rows if (r["workload"], r["mode"]) == (name, mode)}
    return out


def plot_sweeps(sweeps: dict[str, dict[int, dict]], path: Path) -> Path | None:
    """First call and run time against B (log-log), one row per sweep; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4.2 * len(sweeps)), squeeze=False)
    styles = {"inductor": ("stock Inductor", "C3", "-"), "normfuse": ("normfuse", "C0", "-"), "ideal": ("ideal", "C2", "--")}
    for (section, rows), (ax1, ax2) in zip(sweeps.items(), axes):
        for variant, (label, color, ls) in styles.items():
            pts = sorted((B, r.get(variant, {})) for B, r in rows.items())
            done = [(b, v["first_call_s"]) for b, v in pts if v.get("first_call_s") and not v.get("timed_out")]
            late = [(b, v["first_call_s"]) for b, v in pts if v.get("timed_out")]
            runs = [(b, v["run_ms"]) for b, v in pts if v.get("run_ms")]
            if done:
                ax1.plot(*zip(*done), ls, color=color, marker="o", label=label)
            if late:
                ax1.plot(*zip(*late), " ", color=color, marker="^", label=f"{label}: timed out (more than)")
            if runs:
                ax2.plot(*zip(*runs), ls, color=color, marker="o", label=label)
        for ax, ylabel in ((ax1, "first call (s), cold compile"), (ax2, "steady-state run (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B (loop trips)")
            ax.set_ylabel(ylabel)
            ax.set_title(section.removeprefix("sweep "), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
