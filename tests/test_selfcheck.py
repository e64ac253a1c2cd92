"""``python -m flash_cute``: the environment report and self-check (runs on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_cute
from flash_cute import __main__ as selfcheck

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"
REPORT_KEYS = {"flash_cute", "torch", "extension", "gpus", "families", "selftest"}


def run_module(*args):
    """``python -m flash_cute *args`` in a subprocess with PYTHONPATH=python; the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "flash_cute", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_report_and_selftest_pass():
    proc = run_module()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"flash_cute {flash_cute.__version__}" in proc.stdout
    assert "torch " + torch.__version__ in proc.stdout
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout
    assert "varlen" in proc.stdout and "causal=True" in proc.stdout
    assert "kvcache" in proc.stdout


def test_json_no_selftest():
    proc = run_module("--json", "--no-selftest")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == REPORT_KEYS
    assert report["selftest"] is None
    assert report["flash_cute"]["version"] == flash_cute.__version__
    assert report["torch"]["version"] == torch.__version__
    assert set(report["extension"]) == {"available", "error", "build"}
    assert set(report["families"]) == {"forward", "backward", "varlen", "paged", "kvcache"}
    if not report["extension"]["available"]:
        assert report["extension"]["error"]


def test_no_selftest_text():
    proc = run_module("--no-selftest")
    assert proc.returncode == 0, proc.stderr
    assert f"flash_cute {flash_cute.__version__}" in proc.stdout
    assert "self-test" not in proc.stdout and "PASS" not in proc.stdout


def test_json_with_selftest_in_process(capsys, monkeypatch):
    """The JSON report carries the self-test's cases (one case here, to stay fast)."""
    monkeypatch.setattr(selfcheck, "selftest_plan", lambda ext, gpus: ("cpu", [(torch.float32, 32, True)]))
    assert selfcheck.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == REPORT_KEYS
    st = report["selftest"]
    assert st["passed"] and st["device"] == "cpu" and len(st["cases"]) == 4
    assert all(set(c["errors"]) == {"out", "dq", "dk", "dv"} for c in st["cases"])


def test_broken_oracle_reports_fail(capsys, monkeypatch):
    """An oracle off by 1e-2 must fail the CPU float32 comparison: exit status 1, FAIL printed."""
    original = selfcheck.oracle_attention
    monkeypatch.setattr(selfcheck, "oracle_attention", lambda *a: original(*a) + 1e-2)
    monkeypatch.setattr(selfcheck, "selftest_plan", lambda ext, gpus: ("cpu", [(torch.float32, 32, True)]))
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "PASS  " not in out


def test_exception_in_case_is_a_fail(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(selfcheck.flash_cute, "flash_attn_varlen_func", boom)
    monkeypatch.setattr(selfcheck, "selftest_plan", lambda ext, gpus: ("cpu", [(torch.float32, 32, False)]))
    assert selfcheck.main([]) == 1
    assert "kernel exploded" in capsys.readouterr().out


@pytest.mark.parametrize("cc, archs, runnable, says", [
    ((9, 0), ["80", "90"], True, "yes (sm_90)"),
    ((8, 6), ["80", "90"], True, "sm_80 SASS runs"),
    ((10, 0), ["80", "90"], True, "PTX of compute_90"),
    ((10, 0), ["90a"], False, "rebuild"),
    ((8, 6), ["90a"], False, "rebuild"),
    ((7, 5), ["80", "90"], False, "sm_80"),
])
def test_sass_status(cc, archs, runnable, says):
    ok, why = selfcheck.sass_status(*cc, archs)
    assert ok == runnable and says in why


def test_gpu_plan_from_build():
    """Built dtypes, the smallest and 128 (or largest) head dims with both causal variants;
    backward only where the backward kernel exists."""
    fwd = [[dt, d, c] for dt in ("fp16", "bf16") for d in (64, 128, 256) for c in (False, True)]
    ext = {"available": True, "build": {"fwd_kernels": fwd, "bwd_kernels": [["fp16", 64], ["fp16", 128]]}}
    device, plan = selfcheck.selftest_plan(ext, [{"runnable": True}])
    assert device == "cuda"
    assert plan == [(torch.bfloat16, 64, False), (torch.bfloat16, 128, False),
                    (torch.float16, 64, True), (torch.float16, 128, True)]
    assert selfcheck.selftest_plan(ext, [{"runnable": False}])[0] == "cpu"
    assert selfcheck.selftest_plan({"available": False, "build": None}, [])[0] == "cpu"
