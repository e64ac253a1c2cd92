"""``python -m flash_cute``: environment report and self-check.

Prints the flash_cute and torch versions, whether the compiled extension ``flash_cute._C``
imports and what it was built with, each visible GPU and whether this build has machine code for
it, the kernel families available, then (unless ``--no-selftest``) a short self-test of
flash_attn_func and flash_attn_varlen_func, forward and backward, against a float32 oracle: on
the GPU with the CUDA kernels when possible, else on CPU float32 tensors (the reference path).
Exit status 0 when every case passes, 1 otherwise. ``--json`` prints the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

import flash_cute

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (max abs error of out, max abs error of dq/dk/dv over max(1, max|ref|)) per self-test device
TOLERANCES = {"cuda": (2e-2, 5e-2), "cpu": (1e-4, 1e-4)}


def extension_report() -> dict:
    """Whether flash_cute._C imports; if so its build config and its forward/backward kernels."""
    try:
        info = flash_cute.build_info()
        from . import _C
    except Exception as exc:  # not built, or an undefined symbol from a mismatched torch/CUDA
        why = f"{type(exc).__name__}: {exc}"
        if "_C" in why and ("cannot import name" in why or "No module named" in why):
            why = f"not built or not installed next to the package ({why})"
        elif "undefined symbol" in why or "libc10" in why or "libcudart" in why:
            why = f"built against another torch/CUDA than this one: rebuild it ({why})"
        return {"available": False, "error": why, "build": None}
    info["fwd_kernels"] = [list(k) for k in info["fwd_kernels"]]
    info["bwd_kernels"] = [list(k) for k in _C.built_bwd_kernels()] if hasattr(_C, "built_bwd_kernels") else []
    info["decode_kernels"] = [list(k) for k in _C.built_decode_kernels()] if hasattr(_C, "built_decode_kernels") else []
    return {"available": True, "error": None, "build": info}


def parse_arch(arch: str) -> tuple[int, int, bool]:
    """'80' -> (8, 0, False); '90a' -> (9, 0, True) (arch-specific: runs on sm_90 only)."""
    digits = int(re.match(r"\d+", arch.strip()).group())
    return digits // 10, digits % 10, arch.strip().endswith("a")


def sass_status(major: int, minor: int, archs: list[str]) -> tuple[bool, str]:
    """(runnable, explanation) of this build on a GPU of compute capability major.minor: SASS of
    sm_XY runs on sm_XZ with Z >= Y (not for 'a' builds); PTX of the last arch JIT-compiles on
    newer GPUs."""
    if not archs:
        return False, "unknown (no cuda_archs in the build config)"
    if major < 8:
        return False, "no: the kernels need sm_80 (Ampere) or newer"
    parsed = [(a, *parse_arch(a)) for a in archs]
    for a, ma, mi, specific in parsed:
        if (ma, mi) == (major, minor):
            return True, f"yes (sm_{a})"
    for a, ma, mi, specific in parsed:
        if ma == major and mi < minor and not specific:
            return True, f"yes (sm_{a} SASS runs on sm_{major}{minor})"
    last, ma, mi, specific = parsed[-1]
    if not specific and (major, minor) > (ma, mi):
        return True, f"no SASS; the PTX of compute_{last} JIT-compiles (slow first call)"
    return False, f"no: rebuild with FLASH_CUTE_CUDA_ARCHS including {major}{minor}"


def gpu_report(build: dict | None) -> list[dict]:
    """Name, compute capability, SASS/PTX coverage and opt-in shared memory of each visible GPU."""
    if not torch.cuda.is_available():
        return []
    archs = [a for a in re.split(r"[,; ]+", str(build["cuda_archs"])) if a] if build else []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        runnable, why = sass_status(props.major, props.minor, archs) if build else (False, "extension not loaded")
        smem = getattr(props, "shared_memory_per_block_optin", None)
        gpus.append({"index": i, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                     "runnable": runnable, "code": why, "smem_per_block_optin": smem})
    return gpus


def families_report(ext: dict) -> dict:
    """Which kernel families this install offers (the reference path only without _C)."""
    kvcache = "yes" if hasattr(flash_cute, "flash_attn_with_kvcache") else "not yet (flash_attn_with_kvcache)"
    if not ext["available"]:
        ref = "reference path only (float32)"
        return {"forward": ref, "backward": ref, "varlen": ref, "paged": ref, "kvcache": kvcache}
    nf, nb = len(ext["build"]["fwd_kernels"]), len(ext["build"]["bwd_kernels"])
    return {
        "forward": f"yes ({nf} kernels)" if nf else "no kernels built",
        "backward": f"yes ({nb} kernels)" if nb else "no kernels built",
        "varlen": "yes (the same kernels as forward/backward)" if nf else "no kernels built",
        "paged": "yes (flash_attn_varlen_func(block_table=...))" if nf else "no kernels built",
        "kvcache": (f"yes (split-KV decoding, {len(ext['build'].get('decode_kernels', []))} kernels)"
                    if ext["build"].get("decode_kernels") else kvcache),
    }


def oracle_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v in float32 on (batch, seqlen, heads, d) tensors; GQA by
    repeat_interleave of the k, v heads; causal mask aligned bottom-right (rows seeing no key: 0)."""
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def oracle_varlen(q, k, v, cu_q, cu_k, causal: bool, scale: float) -> torch.Tensor:
    """oracle_attention of each sequence of a varlen batch, concatenated."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = [oracle_attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                             causal, scale)[0] for b in range(len(cq) - 1)]
    return torch.cat(outs, dim=0)


def case_name(dtype: torch.dtype, head_dim: int, causal: bool, varlen: bool) -> str:
    """'func float16 d=64 causal=True' and the like."""
    return f"{'varlen' if varlen else 'func'} {str(dtype).removeprefix('torch.')} d={head_dim} causal={causal}"


def run_case(dtype: torch.dtype, head_dim: int, causal: bool, varlen: bool, device: str, backward: bool) -> dict:
    """One self-test case (GQA 4 query heads over 2 KV heads, ragged lengths): forward and, with
    ``backward``, dq/dk/dv, each compared with the float32 oracle. Returns the errors and verdict."""
    tol_out, tol_grad = TOLERANCES["cuda" if device == "cuda" else "cpu"]
    gen = torch.Generator().manual_seed(head_dim * 4 + causal * 2 + varlen)
    lens_q, lens_k = [37, 64], [53, 91]
    shape_q = (sum(lens_q), 4, head_dim) if varlen else (2, 67, 4, head_dim)
    shape_k = (sum(lens_k), 2, head_dim) if varlen else (2, 91, 2, head_dim)

    def randn(shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = randn(shape_q), randn(shape_k), randn(shape_k)
    dout = torch.randn(shape_q, generator=gen).to(device=device, dtype=dtype)
    scale = head_dim ** -0.5
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    if varlen:
        cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32, device=device)
        out = flash_cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
        ref = oracle_varlen(*refs, cu_q, cu_k, causal, scale)
    else:
        out = flash_cute.flash_attn_func(q, k, v, causal=causal)
        ref = oracle_attention(*refs, causal, scale)
    errors = {"out": (out.float() - ref).abs().max().item()}
    passed = errors["out"] <= tol_out
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, refs, dout.float())
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[name] = (g.float() - r).abs().max().item() / max(1.0, r.abs().max().item())
            passed = passed and errors[name] <= tol_grad
    name = case_name(dtype, head_dim, causal, varlen)
    return {"case": name, "passed": bool(passed), "errors": errors, "backward": backward}


def selftest_plan(ext: dict, gpus: list[dict]) -> tuple[str, list[tuple[torch.dtype, int, bool]]]:
    """(device, [(dtype, head_dim, backward)]): on the first GPU with the built dtypes and up to
    two built head dims when the extension imports and can run there, else CPU float32."""
    if not (ext["available"] and gpus and gpus[0]["runnable"]):
        return "cpu", [(torch.float32, d, True) for d in (40, 64)]  # 40: the padded head-dim path
    build = ext["build"]
    fwd = {tuple(k) for k in build["fwd_kernels"]}
    bwd = {tuple(k) for k in build["bwd_kernels"]}
    plan = []
    for dt in sorted({k[0] for k in fwd}):
        dims = sorted({k[1] for k in fwd if k[0] == dt and (dt, k[1], True) in fwd and (dt, k[1], False) in fwd})
        picks = sorted({dims[0], 128 if 128 in dims else dims[-1]}) if dims else []
        plan += [(DTYPES[dt], d, (dt, d) in bwd) for d in picks]
    return "cuda", plan


def run_selftest(ext: dict, gpus: list[dict], log=print) -> dict:
    """Runs every planned case (func and varlen, causal and not); an exception is a FAIL."""
    device, plan = selftest_plan(ext, gpus)
    start, cases = time.perf_counter(), []
    for dtype, head_dim, backward in plan:
        for varlen in (False, True):
            for causal in (False, True):
                try:
                    result = run_case(dtype, head_dim, causal, varlen, device, backward)
                except Exception as exc:
                    result = {"case": case_name(dtype, head_dim, causal, varlen), "passed": False, "errors": {},
                              "error": f"{type(exc).__name__}: {exc}"}
                cases.append(result)
                errs = " ".join(f"{k} {v:.1e}" for k, v in result["errors"].items())
                note = "" if result.get("backward", True) else " (forward only: no backward kernel)"
                log(f"  {'PASS' if result['passed'] else 'FAIL'}  {result['case']:<34} {errs}"
                    f"{note}{'  ' + result['error'] if 'error' in result else ''}")
    seconds = time.perf_counter() - start
    passed = bool(cases) and all(c["passed"] for c in cases)
    return {"device": device, "tolerances": TOLERANCES[device], "cases": cases, "passed": passed,
            "seconds": round(seconds, 3)}


def build_report() -> dict:
    """Everything but the self-test, as a JSON-ready dict."""
    ext = extension_report()
    path = os.path.dirname(os.path.abspath(flash_cute.__file__))
    return {
        "flash_cute": {"version": flash_cute.__version__, "path": path},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()},
        "extension": ext,
        "gpus": gpu_report(ext["build"]),
        "families": families_report(ext),
    }


def print_report(report: dict) -> None:
    """The human-readable report."""
    fc, th, ext = report["flash_cute"], report["torch"], report["extension"]
    print(f"flash_cute {fc['version']}  ({fc['path']})")
    print(f"torch {th['version']}  ({'built with CUDA ' + th['cuda'] if th['cuda'] else 'CPU-only build, no CUDA'})")
    if not ext["available"]:
        print(f"extension flash_cute._C: NOT importable ({ext['error']})")
        print("  only the CPU/reference path works (float32 inputs); float16/bfloat16 on CUDA need the extension")
    else:
        b = ext["build"]
        rt = b.get("cuda_runtime")
        rt = f"{rt // 1000}.{rt % 1000 // 10}" if isinstance(rt, int) else rt
        print("extension flash_cute._C: OK")
        print(f"  cuda_archs {b['cuda_archs']} | head_dims {b['head_dims']} | dtypes {b['dtypes']}"
              f" | CUTLASS {b['cutlass']} | CUDA runtime {rt}")
        for label, kernels in (("forward", b["fwd_kernels"]), ("backward", b["bwd_kernels"]),
                               ("decoding", b.get("decode_kernels", []))):
            by_dtype = {}
            for k in kernels:
                by_dtype.setdefault(k[0], set()).add(k[1])
            summary = "; ".join(f"{dt}: d {','.join(map(str, sorted(ds)))}" for dt, ds in sorted(by_dtype.items()))
            print(f"  {label} kernels: {len(kernels)} ({summary or 'none'})")
    print("GPUs:" + ("" if report["gpus"] else " none visible"))
    for g in report["gpus"]:
        smem = f"{g['smem_per_block_optin'] // 1024} KiB" if g["smem_per_block_optin"] else "unknown"
        print(f"  [{g['index']}] {g['name']}  sm {g['compute_capability']}  code: {g['code']}  smem/block: {smem}")
    print("kernel families: " + ", ".join(f"{k} {v}" for k, v in report["families"].items()))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0: all self-test cases pass or none were asked for)."""
    parser = argparse.ArgumentParser(prog="python -m flash_cute", description=__doc__.splitlines()[0])
    parser.add_argument("--no-selftest", action="store_true", help="print the report only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = build_report()
    if not args.json:
        print_report(report)
    report["selftest"] = None
    if not args.no_selftest:
        log = (lambda *a: None) if args.json else print
        device, _ = selftest_plan(report["extension"], report["gpus"])
        where = "the GPU (CUDA kernels)" if device == "cuda" else "CPU float32 (reference path)"
        tol_out, tol_grad = TOLERANCES[device]
        log(f"self-test on {where}; tolerance: out {tol_out:g} max abs, dq/dk/dv {tol_grad:g} x max(1, |ref|)")
        report["selftest"] = run_selftest(report["extension"], report["gpus"], log)
        st = report["selftest"]
        n_pass = sum(c["passed"] for c in st["cases"])
        log(f"self-test: {n_pass}/{len(st['cases'])} {'PASS' if st['passed'] else 'FAIL'} in {st['seconds']:.2f} s")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0 if report["selftest"] is None or report["selftest"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
