"""Which form of a norm over several tensors runs fastest under Inductor on this device.

    python -m bench.multi_tensor_forms [--device cuda] [--tensors 12,64]

Compiles the naive global gradient norm ``sqrt(sum((p**2).sum() for p in ps))`` with stock
Inductor (the fused sum of squares, normfuse's "keep") and with normfuse in each other form of
``normfuse.passes.chains.MULTI_TENSOR_FORM`` ("cat": one norm of the flattened tensors
concatenated; "vector_norm": one per tensor, then a norm of the stack; "foreach":
``torch._foreach_norm`` per device and dtype, then a norm of the stack). Prints the median run time
of each, interleaved in one process; the fastest decides the device's entry.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

import normfuse
import normfuse.passes.chains as chains

SHAPES = [(256, 128), (256,), (256, 256), (256,), (10, 256), (10,)]


NAIVE = "def naive(*ps):\n    return torch.sqrt(sum((p**2).sum() for p in ps))\n"


def _naive():
    """A fresh copy of the naive function: its own code object, so its own Dynamo cache entry."""
    namespace = {"torch": torch}
    exec(NAIVE, namespace)
    return namespace["naive"]


def _compiled(form: str | None):
    if form is None:
        return torch.compile(_naive(), backend="inductor")

    def backend(gm, example_inputs):  # the form holds while this graph compiles, and only then
        kind = torch.device(_device).type
        saved = chains.MULTI_TENSOR_FORM.get(kind)
        chains.MULTI_TENSOR_FORM[kind] = form
        try:
            return normfuse.backend(gm, example_inputs)
        finally:
            chains.MULTI_TENSOR_FORM[kind] = saved

    return torch.compile(_naive(), backend=backend)


def main() -> None:
    global _device
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensors", default="12,64")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    _device = torch.device(args.device)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if _device.type == "cuda" else (lambda: None)
    rows = []
    for n in (int(t) for t in args.tensors.split(",")):
        ps = [torch.randn(SHAPES[k % len(SHAPES)], device=_device) for k in range(n)]
        fns = {}
        for name, form in (("stock (keep)", None), ("cat", "cat"), ("vector_norm", "vector_norm"), ("foreach", "foreach")):
            fn = _compiled(form)
            fn(*ps)  # compile now: the timed loop below must not include it
            fns[name] = fn
            torch.testing.assert_close(fn(*ps), _naive()(*ps), rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                for _ in range(50):
                    fn(*ps)
                sync()
                times[name].append((time.perf_counter() - start) / 50 * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["stock (keep)"]
        rows += [[n, k, f"{v:.4f}", f"{v / base:.2f}x"] for k, v in med.items()]
    print(f"device {_device}, torch {torch.__version__}, 1 intra-op thread, median ms per call")
    print(tabulate(rows, headers=["tensors", "form", "ms", "vs keep"]))


_device = torch.device("cpu")

if __name__ == "__main__":
    main()
