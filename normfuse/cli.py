"""``python -m normfuse explain FILE.py:FUNC --shape 32,10``: audit a model without writing code.

FUNC names a function in FILE, an ``nn.Module`` instance, or an ``nn.Module`` class (built with
no arguments; a module is cast to a floating ``--dtype``). Each ``--shape`` is one positional input, filled with seeded random numbers of
``--dtype`` (integers in [-5, 5) for integer dtypes). The report is ``normfuse.explain``'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
from typing import Any, Sequence

import torch


class UsageError(Exception):
    pass


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (write sizes separated by commas, e.g. 32,10)") from None


def _dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"not a torch dtype: {text!r} (e.g. float32, float16, bfloat16, float64)")
    return dtype


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m normfuse", description="normfuse: batched norms for per-slice norm loops")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "explain",
        help="print what normfuse would rewrite in a function, and the batched code to write instead",
        description="Trace FUNC from FILE with Dynamo on random inputs and print normfuse's explain table. "
        "Nothing is compiled; Dynamo's caches are reset.",
    )
    e.add_argument("target", metavar="FILE.py:FUNC", help="a Python file and a function, nn.Module instance or nn.Module class in it")
    e.add_argument("--shape", type=_shape, action="append", default=[], metavar="N,M,...", help="shape of one positional input (repeat for each input)")
    e.add_argument("--dtype", type=_dtype, default=torch.float32, help="dtype of the inputs (default float32)")
    e.add_argument("--exact", action="store_true", help="explain exact mode (the user's own ops, batched)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    e.add_argument("--brief", action="store_true", help="the table only, without each site's details")
    return p


def load(target: str) -> Any:
    """The object FUNC of FILE.py:FUNC (an nn.Module class is instantiated)."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"expected FILE.py:FUNC, got {target!r}")
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so that the file can import its neighbours
    module_name = "_normfuse_cli_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                n for n, v in vars(module).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == module_name and callable(v)
            )
            raise UsageError(f"{path} has no {name!r}" + (f"; it defines: {', '.join(defined)}" if defined else ""))
        obj = getattr(obj, part)
    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
        obj = obj()
    if not callable(obj):
        raise UsageError(f"{name} in {path} is not callable")
    return obj


def inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if dtype.is_complex:
            out.append(torch.randn(shape, generator=gen, dtype=dtype))
        elif dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        else:
            out.append(torch.randint(-5, 5, shape, generator=gen).to(dtype))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .explain import explain

    try:
        fn = load(args.target)
    except UsageError as e:
        print(f"python -m normfuse explain: error: {e}", file=sys.stderr)
        return 2
    if isinstance(fn, torch.nn.Module) and args.dtype.is_floating_point:
        fn = fn.to(args.dtype)  # parameters in the inputs' dtype, as a user would run it
    report = explain(fn, *inputs(args.shape, args.dtype, args.seed), exact=args.exact, print_table=False)
    report.detailed = not args.brief
    print(report)
    return 0
