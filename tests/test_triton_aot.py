"""Ahead-of-time compile check of the fused ACM's Triton kernels (acm_d2/layers/acm_fused/aot.py).

No GPU: the launches that `triton_backend` would make are recorded on meta tensors with an H100's
(sm_90, 132 SMs) or A100's (sm_80, 108 SMs) SM count, compiled with Triton for that target and
assembled by Triton's ptxas with -v. Every kernel must compile and spill nothing. The default run
takes a representative subset (the widest and narrowest groups, fp32 and bf16, the FPN extremes and
the C4 ROI head); the full matrix of the issue (4 FPN levels + C4 ROI head + batch 1, G 8-128, fp32 /
bf16 / fp16, sm_80 / sm_90) is the slow test.
"""

import pytest

pytest.importorskip("triton")
aot = pytest.importorskip("acm_d2.layers.acm_fused.aot")


def _report(rows):
    """Print the table (pytest -s shows it) and return the spilling rows."""
    seen = []
    for name, g, r in rows:
        if (name, g, r) not in seen:
            seen.append((name, g, r))
            print(
                f"{name:<12} G{g:<4}{r.kernel:<20} sm_{r.arch} {r.dtype:<9} regs {r.registers:>3}  spill {r.spill_stores}/{r.spill_loads} B  "
                f"stack {r.stack}  smem {r.shared} B  warps {r.num_warps}"
            )
    return [(name, g, r) for name, g, r in seen if r.spill_stores or r.spill_loads or r.stack]


def test_kernels_compile_without_spills_representative():
    rows = aot.check_matrix(["res2", "res5", "c4_roi_res5"], [8, 32], ["float32", "bfloat16"], [90])
    rows += aot.check_matrix(["res4"], [32], ["float16"], [80], variants=("full", "no_p", "no_q"))
    kernels = {r.kernel for _, _, r in rows}
    # forward: reduce, stats, output; backward: reduce, stats, dx, finalize
    assert len(kernels) == 7, kernels
    assert not _report(rows)


@pytest.mark.slow
def test_kernels_compile_without_spills_full_matrix():
    rows = aot.check_matrix(
        list(aot.SHAPES),
        list(aot.GROUPS),
        list(aot.DTYPES),
        list(aot.TARGETS),
        variants=("full", "no_p", "no_q"),
    )
    assert not _report(rows)
