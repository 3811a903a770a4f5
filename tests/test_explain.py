"""normfuse.explain: the table, the suggested batched code (executed here and compared), every skip
reason in words, the command line, and the log switches."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import normfuse
from normfuse import cli, logs, suggest
from normfuse.suggest import evaluate, namespace, user_name
from test_not_rewritten import MATRIX, REAL
from test_programs import capsule_squash, dpsgd_norms, edge_lengths_norm, normalise_rows, scaled_by_weight

EXAMPLES = os.path.join(os.path.dirname(__file__), "examples")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _explain(fn, *args, **kwargs):
    return normfuse.explain(fn, *args, print_table=False, **kwargs)


def _only(report):
    assert len(report.rewrites) == 1, report
    return report.rewrites[0]


# --- suggestions: the code is run here on the inputs and compared with the function ------------

W = torch.randn(4, 5)

# name -> (fn, input shapes, the suggestion expected, or None to only run it)
SUGGESTIONS = {
    "rows_l2": (lambda x: torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(x.shape[0])]), [(6, 5)],
                "torch.linalg.vector_norm(x, dim=1)"),
    "frobenius": (lambda x: torch.stack([x[i].norm() for i in range(x.shape[0])]), [(4, 3, 5)],
                  "torch.linalg.vector_norm(x, dim=(1, 2))"),
    "l1": (lambda x: torch.stack([x[i].abs().sum() for i in range(x.shape[0])]), [(6, 5)],
           "torch.linalg.vector_norm(x, ord=1, dim=1)"),
    "linf": (lambda x: torch.stack([r.abs().max() for r in x]), [(6, 5)],
             "torch.linalg.vector_norm(x, ord=float('inf'), dim=1)"),
    "general_p": (lambda x: torch.stack([x[i].abs().pow(3).sum().pow(1 / 3) for i in range(x.shape[0])]), [(6, 5)],
                  "torch.linalg.vector_norm(x, ord=3, dim=1)"),
    "columns": (lambda x: torch.stack([x[:, j].norm() for j in range(x.shape[1])]), [(6, 5)],
                "torch.linalg.vector_norm(x, dim=0)"),
    "strided": (lambda x: torch.stack([x[i].norm() for i in range(1, 6, 2)]), [(6, 5)],
                "torch.linalg.vector_norm(x[1:6:2], dim=1)"),
    "permuted": (lambda x: torch.stack([x[i].norm() for i in (3, 0, 2)]), [(6, 5)],
                 "torch.linalg.vector_norm(x.index_select(0, torch.tensor([3, 0, 2])), dim=1)"),
    "cast": (lambda x: torch.stack([x[i].float().norm() for i in range(x.shape[0])]), [(6, 5)],
             "torch.linalg.vector_norm(x.to(torch.float32), dim=1)"),
    "cat_keepdim": (lambda x: torch.cat([r.pow(2).sum(1, keepdim=True).sqrt() for r in x.split(1)]), [(6, 5)],
                    "torch.linalg.vector_norm(x, dim=1, keepdim=True)"),
    "stack_dim1": (lambda x: torch.stack([x[i].norm(dim=-1) for i in range(x.shape[0])], dim=1), [(5, 3, 4)],
                   "torch.linalg.vector_norm(x, dim=2).movedim(0, 1)"),
    "cat_vectors": (lambda x: torch.cat([x[i].norm(dim=-1) for i in range(x.shape[0])]), [(5, 3, 4)], None),
    "python_sum": (lambda x: sum(x[:, j].abs().sum() for j in range(x.shape[1])), [(6, 5)],
                   "torch.linalg.vector_norm(x, ord=1, dim=0).sum(0)"),
    "global": (lambda: torch.stack([W[i].norm() for i in range(4)]), [], "torch.linalg.vector_norm(W, dim=1)"),
    # per-slice programs (the loops of test_programs)
    "normalise": (normalise_rows, [(6, 5)], "z / torch.linalg.vector_norm(z, dim=1, keepdim=True)"),
    "wgan_gp": (lambda grad: torch.stack([(g.norm(2) - 1) ** 2 for g in grad]), [(5, 2, 3, 3)],
                "(torch.linalg.vector_norm(grad, dim=(1, 2, 3)) - 1) ** 2"),
    "dpsgd": (dpsgd_norms, [(5, 4, 3), (5, 7), (5, 2, 2, 2)],
              "torch.sqrt(0 + (g1 ** 2).sum((1, 2)) + (g2 ** 2).sum(1) + (g3 ** 2).sum((1, 2, 3)))"),
    "edges": (edge_lengths_norm, [(6, 3)],
              "torch.linalg.vector_norm(p.index_select(0, torch.tensor([0, 1, 2, 3, 0, 4, 5, 3]))"
              " - p.index_select(0, torch.tensor([1, 2, 3, 0, 2, 5, 1, 3])), dim=1)"),
    "shared_weight": (scaled_by_weight, [(5, 6), (6,)], "torch.linalg.vector_norm(x * w, dim=1) * w.sum()"),
    "capsule_squash": (capsule_squash, [(3, 4, 5)],
                       "c = s.movedim(1, 0)\nsq = (c ** 2).sum(2, keepdim=True)\n(sq / (1 + sq) * c / torch.sqrt(sq)).movedim(0, 1)"),
}


def _arg_names(fn, n):
    return list(fn.__code__.co_varnames[:n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_suggestion_runs_and_equals_the_loop(name, dtype):
    fn, shapes, expected = SUGGESTIONS[name]
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    rw = _only(_explain(fn, *args))
    if expected is not None:
        assert rw.suggestion == expected
    assert rw.check == "passed" and rw.max_abs_diff is not None, (rw.suggestion, rw.check)
    # run the suggestion here, in the user's names, against the function itself
    scope = dict(zip(_arg_names(fn, len(args)), args)) | {"W": W}
    got, want = evaluate(rw.suggestion, scope), fn(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_suggestion_kinds():
    assert _only(_explain(SUGGESTIONS["rows_l2"][0], torch.randn(3, 4))).suggestion_kind == suggest.KIND_NORM
    assert _only(_explain(SUGGESTIONS["normalise"][0], torch.randn(3, 4))).suggestion_kind == suggest.KIND_PROGRAM


def test_suggestion_in_half_precision_is_checked_with_its_tolerance():
    fn = SUGGESTIONS["rows_l2"][0]
    for dtype in (torch.float16, torch.bfloat16):
        torch._dynamo.reset()
        rw = _only(_explain(fn, torch.randn(8, 16).to(dtype)))
        assert rw.check == "passed", rw.check_text()


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 6)
        self.scale = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self, x, xs):
        a = torch.stack([w.norm() for w in self.inner.weight])
        b = torch.stack([self.scale[i].abs().sum() for i in range(3)])
        c = torch.stack([t.norm() for t in xs[1]])
        return a.sum() + b.sum() + c.sum() + x.sum()


def test_module_names_come_from_the_source():
    m = _Model()
    xs = [torch.randn(2), torch.randn(5, 2)]
    report = _explain(m, torch.randn(2, 4), xs)
    got = {r.suggestion for r in report.rewrites}
    assert got == {
        "torch.linalg.vector_norm(self.inner.weight, dim=1)",
        "torch.linalg.vector_norm(self.scale, ord=1, dim=1)",
        "torch.linalg.vector_norm(xs[1], dim=1)",
    }
    assert all(r.check == "passed" for r in report.rewrites)
    scope = namespace({"self.inner.weight": m.inner.weight, "self.scale": m.scale, "xs[1]": xs[1]})
    with torch.no_grad():
        for r in report.rewrites:
            assert evaluate(r.suggestion, scope).shape in {(6,), (3,), (5,)}


def test_user_names():
    assert user_name("L['x']") == "x"
    assert user_name("L['self']._modules['lin']._parameters['weight']") == "self.lin.weight"
    assert user_name("L['self']._modules['bn']._buffers['running_mean']") == "self.bn.running_mean"
    assert user_name("L['xs'][1]") == "xs[1]"
    assert user_name("L['d']['k']") == "d['k']"
    assert user_name("G['W']") == "W"
    assert user_name("L['x'].size()") is None


def test_intermediate_keeps_the_users_variable_name():
    def fn(x):
        y = x * 2
        z = x.clone()
        z.add_(1)
        return torch.stack([y[i].norm() for i in range(y.shape[0])]), torch.stack([z[i].norm() for i in range(z.shape[0])])

    report = _explain(fn, torch.randn(3, 4))
    assert [r.suggestion for r in report.rewrites] == [
        "torch.linalg.vector_norm(y, dim=1)", "torch.linalg.vector_norm(z, dim=1)",
    ]
    assert all(r.check == "passed" for r in report.rewrites)  # z is read after its add_


def test_a_wrong_suggestion_is_reported_as_failed(monkeypatch):
    real = suggest._norm_group

    def wrong(w, group):
        s = real(w, group)
        s.code = s.code.replace("dim=1", "dim=1) * 1.5 + (0")
        return s

    monkeypatch.setattr(suggest, "_norm_group", wrong)
    report = _explain(SUGGESTIONS["rows_l2"][0], torch.randn(4, 3))
    rw = _only(report)
    assert rw.check == "failed" and rw.max_abs_diff > 0.1
    assert "passed" not in str(report)


def test_unchecked_suggestions_never_read_as_checked(monkeypatch):
    # the norm part of a program is not the loop's value: shown, labelled, not checked
    monkeypatch.setattr(suggest, "_program", lambda w, g: (_ for _ in ()).throw(suggest._Unwritable("test")))
    report = _explain(SUGGESTIONS["normalise"][0], torch.randn(4, 3))
    rw = _only(report)
    assert rw.suggestion_kind == suggest.KIND_NORM_PART
    assert rw.suggestion == "torch.linalg.vector_norm(z, dim=1)"
    assert rw.check.startswith("not checked") and "passed" not in str(report)
    assert "[norm part only]" in report.table()


def test_fuse_norms_alone_suggests_but_does_not_check():
    from conftest import rewrite

    traced = rewrite(SUGGESTIONS["rows_l2"][0], torch.randn(5, 3))
    rw = _only(traced.report)
    assert rw.suggestion == "torch.linalg.vector_norm(x, dim=1)" and rw.check == "not checked"
    assert "not checked" in str(traced.report)


def test_explain_prints_the_table_and_details(capsys):
    from examples.loops import per_sample_clip

    report = normfuse.explain(per_sample_clip, torch.randn(8, 16))
    out = capsys.readouterr().out
    assert out.strip() == str(report).strip()
    assert "write instead" in out and "torch.linalg.vector_norm(x, dim=1)" in out and "passed" in out
    assert "loops.py:7" in out and "loops.py:9" in out  # the user's lines
    assert "left alone: eps inside the root" in out and "an eps added after the root" in out
    rw = report.rewrites[0]
    assert rw.graph_before.splitlines()[0] == "getitem = l_x_[0]"
    assert "# 1 of 8" in rw.graph_before and rw.graph_before.splitlines()[-1].startswith("norms = torch.stack([")
    assert "linalg_vector_norm(l_x_, 2, 1, False)" in rw.graph_after
    assert "before:" in out and "after:" in out and "instead:" in out and "check:" in out


def test_explain_resets_dynamo():
    fn = SUGGESTIONS["rows_l2"][0]
    seen = []

    def counting(gm, inputs):
        seen.append(1)
        return gm.forward

    compiled = torch.compile(fn, backend=counting)
    x = torch.randn(3, 4)
    compiled(x)
    _explain(fn, x)
    compiled(x)  # the cache was reset: compiled again
    assert len(seen) == 2


# --- every skip reason, in words ---------------------------------------------------------------


def _first_per_reason(cases, dtype, shape):
    out = {}
    for fn, reason in cases.values():
        if reason is not None:
            out.setdefault(reason, (fn, dtype, shape))
    return out


# reason -> (a loop left alone for it, input dtype, input shape): the near misses of test_not_rewritten
SKIPS = {
    **_first_per_reason(REAL, torch.float32, (4, 6)),
    **_first_per_reason(MATRIX, torch.float64, (4, 3, 5)),
    "complex input": (lambda x: torch.stack([torch.linalg.vector_norm(x[i]) for i in range(4)]), torch.complex64, (4, 5)),
    "integer input": (lambda x: torch.stack([torch.sqrt((x[i] ** 2).sum()) for i in range(4)]), torch.int64, (4, 5)),
}


def test_every_reason_has_a_case():
    assert len(SKIPS) == 12


@pytest.mark.parametrize("reason", list(SKIPS))
def test_each_skip_reason_is_explained(reason):
    fn, dtype, shape = SKIPS[reason]
    x = cli.inputs([shape], dtype, 0)[0]
    report = _explain(fn, x)
    assert not report.rewrites
    assert [s.reason for s in report.skipped] == [reason]
    text = str(report)
    assert f"left alone: {reason}" in text
    why = report.skipped[0].why
    assert why != reason and why in text  # the longer explanation, in words
    assert report.skipped[0].location and os.path.basename(report.skipped[0].location).startswith("test_")


# --- the command line --------------------------------------------------------------------------


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "normfuse", *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_cli_explains_a_file_and_logs_with_normfuse_log():
    proc = _run("explain", os.path.join(EXAMPLES, "loops.py:per_sample_clip"), "--shape", "8,16", env={"NORMFUSE_LOG": "1"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "normfuse: 1 rewrite(s), 1 left alone" in out
    assert "torch.linalg.vector_norm(x, dim=1)" in out and "passed" in out
    assert "left alone: eps inside the root" in out and "loops.py:7" in out
    # NORMFUSE_LOG=1: one INFO line per rewrite on stderr, with the code to write instead
    info = [line for line in proc.stderr.splitlines() if line.startswith("INFO normfuse: stack of 8")]
    assert len(info) == 1 and "instead: torch.linalg.vector_norm(x, dim=1)" in info[0]
    assert "graph before" not in proc.stderr


def test_cli_module_class_dtype_exact_and_torch_logs():
    proc = _run(
        "explain", os.path.join(EXAMPLES, "loops.py:Normalise"), "--shape", "4,10", "--dtype", "float64", "--exact", "--brief",
        env={"TORCH_LOGS": "+normfuse"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "z / torch.linalg.vector_norm(z, dim=1, keepdim=True)" in proc.stdout
    assert "torch.linalg.vector_norm(self.weight, dim=1)" in proc.stdout
    assert "rewritten (exact)" in proc.stdout and "before:" not in proc.stdout
    # TORCH_LOGS="+normfuse": torch's handler, at DEBUG: the graphs and the INFO lines
    assert "normfuse: graph before" in proc.stderr and "normfuse: graph after" in proc.stderr
    assert "instead: torch.linalg.vector_norm(self.weight, dim=1)" in proc.stderr


def test_cli_errors(capsys):
    assert cli.main(["explain", os.path.join(EXAMPLES, "loops.py:nope"), "--shape", "3,4"]) == 2
    err = capsys.readouterr().err
    assert "has no 'nope'" in err and "per_sample_clip" in err and "Normalise" in err
    assert cli.main(["explain", os.path.join(EXAMPLES, "missing.py:f")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", "x.py:f", "--shape", "3,a"])


# --- logging -----------------------------------------------------------------------------------


def test_info_line_per_rewrite_and_debug_graphs(caplog):
    fn = SUGGESTIONS["rows_l2"][0]
    with caplog.at_level(logging.INFO, logger="normfuse"):
        _explain(fn, torch.randn(4, 3))
    lines = [r.getMessage() for r in caplog.records if r.name == "normfuse"]
    assert len(lines) == 1 and "instead: torch.linalg.vector_norm(x, dim=1)" in lines[0]
    caplog.clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.DEBUG, logger="normfuse"):
        _explain(fn, torch.randn(4, 3))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "normfuse")
    assert "graph before" in text and "graph after" in text and "linalg_vector_norm" in text


def test_normfuse_log_levels():
    assert logs.level_from_env("1") == logging.INFO == logs.level_from_env("info")
    assert logs.level_from_env("debug") == logging.DEBUG
    assert logs.level_from_env("0") is None and logs.level_from_env(None) is None
    with pytest.raises(ValueError):
        logs.level_from_env("loud")
    log = logging.getLogger("normfuse")
    level, handlers = log.level, list(log.handlers)
    try:
        assert logs.configure_from_env({"NORMFUSE_LOG": "debug"}) == logging.DEBUG
        assert logs.configure_from_env({"NORMFUSE_LOG": "debug"}) == logging.DEBUG
        assert log.level == logging.DEBUG
        assert sum(isinstance(h, logs._EnvHandler) for h in log.handlers) == 1  # added once
        assert logs.configure_from_env({}) is None
    finally:
        log.setLevel(level)
        log.handlers[:] = handlers


def test_reason_words_cover_grouping():
    from normfuse.report import REASONS, reason_in_words

    assert set(SKIPS) <= set(REASONS)
    assert reason_in_words("cannot batch: shapes").startswith("the batched form could not be built")
    assert "real floating inputs only" in reason_in_words("bool input")
