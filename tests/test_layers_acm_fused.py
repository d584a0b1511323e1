"""The fused ACM (acm_d2/layers/acm_fused/) against the reference AttendAndCompare forward.

Tolerances (all on CPU): float64 1e-10; float32 1e-5 relative and absolute (gradients: absolute
1e-5 times the largest gradient entry, as the logits-bias gradient is rounding noise of a sum over
H*W positions in the reference and exactly zero in the fused form); bf16/fp16 inputs against
the float32 reference on the same (upcast) values: y within one output ulp (relative 2^-7 bf16,
2^-10 fp16), dx within the same relative error of its largest entry, weight gradients 1e-4 (they are
accumulated in float32 from the same values); Triton (TRITON_INTERPRET=1) against the torch backend
in float32: 1e-5 for y, d, dx, 1e-4 for weight gradients (summed over B*H*W in another order); with
bf16 inputs 2^-7 of each tensor's largest entry.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from acm_d2.layers import acm as acm_module
from acm_d2.layers.acm import ACM_IMPLS, AttendAndCompare
from acm_d2.layers.acm_fused import FUSED_VARIANTS, acm_fused

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pair(variant="full", channels=16, groups=4, dtype=torch.float64, seed=0):
    """A reference and a fused module with the same weights; biases made non-zero so they matter."""
    torch.manual_seed(seed)
    ref = AttendAndCompare(channels, num_groups=groups, variant=variant, impl="reference").to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    fused = AttendAndCompare(channels, num_groups=groups, variant=variant, impl="fused").to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(module, x, dy, dd):
    """y, d and the gradients of sum(y * dy) + sum(d * dd) w.r.t. x and every parameter."""
    x = x.detach().requires_grad_()
    y = module(x)
    d = module.orth_term
    loss = (y.float() * dy).sum() + ((d * dd).sum() if d is not None else 0)
    grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
    return y, d, grads


def check_against_reference(variant, shape, groups, dtype, rtol, atol):
    ref, fused = make_pair(variant, shape[1], groups, dtype)
    ref.train(), fused.train()
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    dy, dd = torch.randn(shape, dtype=dtype), torch.randn(shape[0], dtype=dtype)
    y_ref, d_ref, g_ref = run(ref, x, dy, dd)
    y, d, g = run(fused, x, dy, dd)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert (d is None) == (d_ref is None) == (variant == "no_q")
    if d is not None:
        torch.testing.assert_close(d, d_ref, rtol=rtol, atol=atol)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    scale = max(
        1.0, max(t.abs().max().item() for t in g_ref)
    )  # the gradients are sums over H*W positions
    for name, a, b in zip(names, g, g_ref):
        # The logits biases cancel in the softmax: exactly zero in the fused form, rounding noise in the reference.
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"grad of {name}: {m}"
        )
        if name.endswith("logits.bias"):
            assert torch.count_nonzero(a) == 0


@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_float64_matches_reference(variant):
    check_against_reference(variant, (2, 16, 5, 7), 4, torch.float64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_float32_matches_reference(variant):
    check_against_reference(variant, (2, 32, 6, 9), 8, torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 9), (13, 1)])
def test_odd_spatial_sizes(hw):
    check_against_reference("full", (2, 8, *hw), 2, torch.float64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_low_precision_inputs_accumulate_in_float32(dtype, ulp):
    ref, fused = make_pair("full", 32, 8, torch.float32)
    ref.train(), fused.train()
    x = (torch.randn(2, 32, 9, 11) * 2).to(dtype)
    dy, dd = torch.randn(2, 32, 9, 11).to(dtype).float(), torch.randn(2)
    y_ref, d_ref, g_ref = run(ref, x.float(), dy, dd)
    y, d, g = run(fused, x, dy, dd)
    assert y.dtype == dtype and d.dtype == torch.float32 and g[0].dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, rtol=ulp, atol=ulp)
    torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        g[0].float(), g_ref[0], rtol=0, atol=ulp * g_ref[0].abs().max().item()
    )
    for a, b in zip(g[1:], g_ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradcheck_fused_op():
    torch.manual_seed(0)
    G, C = 2, 8
    x = torch.randn(2, C, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for shape in [(G, C // G, 1, 1), (G,)] * 2
    ]
    p_params = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for shape in [(C // 2, C // G, 1, 1), (C // 2,), (C, C // 2 // G, 1, 1), (C,)]
    ]

    def fn(x, kw, kb, qw, qb, *p):
        y, d = acm_fused(x, kw, kb, qw, qb, p, G, need_orth=True, backend="torch")
        return y, d

    assert torch.autograd.gradcheck(fn, (x, *params, *p_params))
    assert torch.autograd.gradcheck(
        lambda x, kw, kb: acm_fused(x, kw, kb, None, None, None, G, False)[0], (x, *params[:2])
    )


def test_backward_saves_no_full_size_intermediates():
    _, fused = make_pair("full", 16, 4, torch.float32)
    fused.train()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert all(
        t.numel() <= 2 * 2 * 16 for t in saved if t is not big[0]
    )  # per-(sample, head, channel) vectors at most


def test_eval_computes_no_orth_term():
    _, fused = make_pair("full", 16, 4, torch.float32)
    fused.eval()
    fused(torch.randn(2, 16, 5, 7))
    assert fused.orth_term is None


def test_impl_selection_and_errors():
    x = torch.randn(1, 8, 3, 3)
    with pytest.raises(ValueError, match="auto.*reference.*fused"):
        AttendAndCompare(8, num_groups=2, impl="triton")
    assert ACM_IMPLS == ("auto", "reference", "fused")
    for variant in FUSED_VARIANTS:
        assert AttendAndCompare(8, num_groups=2, variant=variant, impl="fused").uses_fused(x)
        assert not AttendAndCompare(8, num_groups=2, variant=variant, impl="reference").uses_fused(
            x
        )
        auto = AttendAndCompare(8, num_groups=2, variant=variant, impl="auto")
        assert auto.uses_fused(x) == acm_module._FUSED_FASTER_ON_CPU
    # p_only has no attention: every impl runs the reference.
    for impl in ACM_IMPLS:
        assert not AttendAndCompare(8, num_groups=2, variant="p_only", impl=impl).uses_fused(x)
    with pytest.raises(ValueError, match="backend"):
        acm_fused(
            x, torch.ones(2, 4, 1, 1), torch.zeros(2), None, None, None, 2, False, backend="cuda"
        )


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="checks the error outside the interpreter"
)
def test_triton_backend_on_cpu_needs_interpreter():
    pytest.importorskip("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        acm_fused(
            torch.randn(1, 8, 3, 3),
            torch.ones(2, 4, 1, 1),
            torch.zeros(2),
            None,
            None,
            None,
            2,
            False,
            backend="triton",
        )


def test_p_only_runs_reference_under_fused():
    ref, fused = make_pair("p_only", 16, 4, torch.float64)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)


def test_autocast_keeps_float32_maths():
    _, fused = make_pair("full", 16, 4, torch.float32)
    fused.eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fused(x), rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_matches_eager(train):
    """torch.compile(fullgraph=True) proves ACM is one graph node (no graph break); aot_eager also
    traces the custom op's backward."""
    torch._dynamo.reset()
    _, fused = make_pair("full", 16, 4, torch.float32)
    fused.train(train)
    x = torch.randn(2, 16, 5, 7, requires_grad=train)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    d = fused.orth_term
    y_eager = fused(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    if train:
        torch.testing.assert_close(d, fused.orth_term, rtol=1e-6, atol=1e-6)
        (g,) = torch.autograd.grad((y * y).sum() + d.sum(), [x])
        (g_eager,) = torch.autograd.grad((y_eager * y_eager).sum() + fused.orth_term.sum(), [x])
        torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)
    else:
        assert d is None


TRITON_CHECK = textwrap.dedent(
    """
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from acm_d2.layers.acm_fused import acm_fused, triton_failures

    torch.manual_seed(0)
    B, C, H, W, G = 2, 16, 5, 7, 4  # H*W = 35: a partial last tile and two splits in the interpreter
    for variant in ("full", "no_p", "no_q"):
        use_q, use_p = variant != "no_q", variant != "no_p"
        leaves = [torch.randn(G, C // G, 1, 1), torch.randn(G)]
        leaves += [torch.randn(G, C // G, 1, 1), torch.randn(G)] if use_q else [None, None]
        p = [torch.randn(C // 2, C // G, 1, 1), torch.randn(C // 2), torch.randn(C, C // 2 // G, 1, 1), torch.randn(C)]
        p = p if use_p else None
        params = [t for t in leaves + (p or []) if t is not None]
        for t in params:
            t.requires_grad_()
        for dtype in (torch.float32, torch.bfloat16) if variant == "full" else (torch.float32,):
            x = (torch.randn(B, C, H, W) * 2).to(dtype).requires_grad_()
            dy, dd = torch.randn(B, C, H, W), torch.randn(B)
            out = {}
            for backend in ("torch", "triton"):
                y, d = acm_fused(x, *leaves, p, G, need_orth=use_q, backend=backend)
                loss = (y.float() * dy).sum() + ((d * dd).sum() + d.sum() if use_q else 0)
                out[backend] = [y, d] + list(torch.autograd.grad(loss, [x] + params))
            for name, a, b in zip(["y", "d", "x"] + ["param"] * len(params), out["triton"], out["torch"]):
                if a is None:
                    continue
                assert a.dtype == b.dtype, (variant, name, a.dtype, b.dtype)
                tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-4 if name == "param" else 1e-5
                scale = max(1.0, b.float().abs().max().item())
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{variant} {dtype} {name}: {m}")
        with torch.no_grad():  # the op torch.compile sees, through the dispatcher
            stats_t = torch.ops.acm_d2.acm_fused_forward(x, leaves[0], leaves[2], *(p or [None] * 4), G, use_q, "triton")
        assert stats_t[4].shape == (B, G, 2 if use_q else 1)  # the softmax lse, saved by both backends
    # channels-last in, channels-last out, same values as NCHW (both backends read x with its strides)
    leaves = [torch.randn(G, C // G, 1, 1), torch.randn(G)] * 2
    p = [torch.randn(C // 2, C // G, 1, 1), torch.randn(C // 2), torch.randn(C, C // 2 // G, 1, 1), torch.randn(C)]
    x = (torch.randn(B, C, H, W) * 2).requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(B, C, H, W)
    res = []
    for inp in (x, x_cl):
        y, d = acm_fused(inp, *leaves, p, G, need_orth=True, backend="triton")
        (gx,) = torch.autograd.grad((y * dy).sum() + d.sum(), [inp])
        res.append((y, d, gx))
    assert res[1][0].is_contiguous(memory_format=torch.channels_last) and res[1][2].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(res[0], res[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not triton_failures()
    print("TRITON-OK")
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-6000:]
    )


def test_channels_last_and_strided_inputs_torch_backend():
    """channels_last stays channels_last (y and dx); a strided input is read once; values as NCHW."""
    ref, fused = make_pair("full", 16, 4, torch.float64)
    ref.train(), fused.train()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    dy, dd = torch.randn(2, 16, 5, 7, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    y_ref, d_ref, g_ref = run(ref, x, dy, dd)
    x_cl = x.to(memory_format=torch.channels_last)
    y, d, g = run(fused, x_cl, dy, dd)
    assert y.is_contiguous(memory_format=torch.channels_last) and g[0].is_contiguous(
        memory_format=torch.channels_last
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-10, atol=1e-10)
    wide = torch.randn(2, 16, 5, 14, dtype=torch.float64)[
        ..., ::2
    ]  # neither NCHW- nor NHWC-contiguous
    y, _, g = run(fused, wide, dy, dd)
    assert y.is_contiguous()
    torch.testing.assert_close(y, run(ref, wide, dy, dd)[0], rtol=1e-10, atol=1e-10)


def test_triton_launches_run_under_the_inputs_device_guard(monkeypatch):
    """Every launch of forward and backward happens inside the guard of x's device, and the guard
    enters torch.cuda.device(x.device) for CUDA inputs (checked without a GPU)."""
    triton_backend = pytest.importorskip("acm_d2.layers.acm_fused.triton_backend")
    import contextlib

    guarded, launches = [], []

    @contextlib.contextmanager
    def guard(x):
        guarded.append(True)
        yield
        guarded.pop()

    monkeypatch.setattr(triton_backend, "_device_guard", guard)
    monkeypatch.setattr(
        triton_backend, "_launch", lambda kernel, grid, *a, **m: launches.append(bool(guarded))
    )
    monkeypatch.setattr(triton_backend, "_num_sms", lambda x: 132)
    aot = pytest.importorskip("acm_d2.layers.acm_fused.aot")
    x, kw, _, p = aot.meta_inputs((2, 64, 6, 8), 4)
    _, _, mu, pooled, lse, pv = triton_backend.forward(x, kw, kw, p, 4, True)
    triton_backend.backward(
        torch.empty_like(x), torch.empty(2, device="meta"), x, kw, kw, p, mu, pooled, lse, pv, 4
    )
    assert launches == [True] * 7

    entered = []
    monkeypatch.undo()
    monkeypatch.setattr(
        torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext()
    )

    class OnSecondGPU:
        is_cuda, device = True, torch.device("cuda", 1)

    with triton_backend._device_guard(OnSecondGPU()):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fused_op_on_second_gpu():
    ref, fused = make_pair("full", 64, 8, torch.float32)
    ref, fused = ref.to("cuda:1").train(), fused.to("cuda:1").train()
    x = torch.randn(2, 64, 12, 20, device="cuda:1")
    dy, dd = torch.randn_like(x), torch.randn(2, device="cuda:1")
    with torch.cuda.device(0):  # the current device is another card
        y, d, g = run(fused, x, dy, dd)
    y_ref, d_ref, g_ref = run(ref, x, dy, dd)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-4)


def test_backward_scratch_is_small_at_the_c4_roi_head_shape():
    """The Triton backward's scratch buffers at Faster R-CNN C4's ROI-head res5 (1024 x 2048 x 7 x 7,
    G 32) stay a fraction of x: P's weight gradients come from (B, C) sums, not from a
    B x splits x (C^2/G + ...) buffer (570 MB before, against 392 MiB of fp32 x)."""
    aot = pytest.importorskip("acm_d2.layers.acm_fused.aot")
    shape = (1024, 2048, 7, 7)
    scratch = aot.backward_scratch_bytes(shape, 32)
    x_bytes = torch.empty(shape, device="meta").nbytes
    assert 0 < scratch < x_bytes / 4, (scratch, x_bytes)


@pytest.mark.parametrize(
    "variant, dtype",
    [
        ("full", torch.float32),
        ("full", torch.bfloat16),
        ("no_p", torch.float32),
        ("no_q", torch.float32),
    ],
)
def test_triton_path_launches_at_most_3_forward_and_8_in_all(variant, dtype):
    """Counted without a GPU: the Triton launches recorded on meta tensors plus every torch op that
    would launch a kernel (views and allocations do not), for one training call of the op."""
    host = pytest.importorskip("acm_d2.benchmark.host")
    call = host.acm_call((2, 256, 20, 30), 32, variant, dtype)
    counts = host.count_launches(call)
    fwd, bwd = counts["forward"], counts["backward"]
    assert len(fwd) <= 3 and len(fwd) + len(bwd) <= 8, counts
    # The counter sees torch ops: the torch backend's batched matmuls and small ops are dozens.
    torch_counts = host.count_launches(host.acm_call((2, 256, 20, 30), 32, variant, dtype, "torch"))
    print(
        f"{variant} {dtype}: torch backend {len(torch_counts['forward'])} + {len(torch_counts['backward'])} ops"
    )
    assert len(torch_counts["forward"]) + len(torch_counts["backward"]) > 20


def test_triton_out_of_memory_is_raised_not_a_fallback(monkeypatch, caplog):
    """A CUDA OOM inside Triton's launcher (a RuntimeError, not torch's) propagates as
    torch.OutOfMemoryError under "auto" and leaves the device on Triton."""
    triton_backend = pytest.importorskip("acm_d2.layers.acm_fused.triton_backend")
    from acm_d2.layers.acm_fused import op, triton_failures

    message = "Triton Error [CUDA]: out of memory"

    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError(message)

            return launch

    monkeypatch.setattr(triton_backend, "_fwd_reduce_kernel", FailingKernel())
    monkeypatch.setattr(op, "_triton_device", lambda x: True)  # "auto" picks Triton for this CPU x
    x = torch.randn(1, 8, 3, 3)
    args = (torch.ones(2, 4, 1, 1), torch.zeros(2), None, None, None, 2, False)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory") as info:
        acm_fused(x, *args, backend="auto")
    assert message in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    assert not triton_failures() and "failed" not in caplog.text
    # Any other launcher error is a broken Triton: one warning, the torch backend from then on.
    monkeypatch.setattr(FailingKernel, "__getitem__", lambda self, grid: None)
    monkeypatch.setattr(op, "_TRITON_FAILURES", {})
    y, _ = acm_fused(x, *args, backend="auto")
    assert y.shape == x.shape and list(triton_failures()) == ["cpu"]


def test_no_grad_call_skips_autograd_and_matches():
    """Under no_grad the op runs without its autograd Function: same y, no graph."""
    _, fused = make_pair("full", 16, 4, torch.float32)
    fused.eval()
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    y_grad = fused(x)
    with torch.no_grad():
        y = fused(x)
    assert y_grad.grad_fn is not None and y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, y_grad, rtol=0, atol=0)
