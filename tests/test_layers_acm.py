import pytest
import torch
from torch.autograd import gradcheck

from acm_d2.layers import ACM_VARIANTS, AttendAndCompare


def spec_acm(x, module):
    """ACM written literally from the paper's equations (acm_d2/layers/acm.py's docstring) (float64, loops over groups): returns y and d."""
    B, C, H, W = x.shape
    G = module.num_groups
    cg = C // G
    mu = x.mean(dim=(2, 3), keepdim=True)
    xm = x - mu

    def pool(conv):
        out = torch.empty(B, C, dtype=x.dtype)
        for g in range(G):
            xs = xm[:, g * cg : (g + 1) * cg].reshape(B, cg, H * W)
            logits = torch.einsum("c,bcn->bn", conv.weight[g, :, 0, 0].to(x.dtype), xs) + conv.bias[
                g
            ].to(x.dtype)
            a = torch.softmax(logits, dim=1)
            out[:, g * cg : (g + 1) * cg] = (xs * a[:, None, :]).sum(-1)
        return out

    y = x
    K = pool(module.k_logits) if module.use_k else None
    Q = pool(module.q_logits) if module.use_q else None
    if K is not None:
        y = y + (K - (Q if Q is not None else 0))[:, :, None, None]
    if module.use_p:
        h = torch.nn.functional.conv2d(
            mu, module.p_reduce.weight.to(x.dtype), module.p_reduce.bias.to(x.dtype), groups=G
        )
        p = torch.nn.functional.conv2d(
            torch.relu(h),
            module.p_expand.weight.to(x.dtype),
            module.p_expand.bias.to(x.dtype),
            groups=G,
        )
        y = torch.sigmoid(p) * y
    d = (K * Q).sum(1) / C if (K is not None and Q is not None) else None
    return y, d


def random_acm(channels=16, groups=4, variant="full", seed=0, dtype=torch.float64, impl="auto"):
    torch.manual_seed(seed)
    m = AttendAndCompare(channels, num_groups=groups, variant=variant, impl=impl).to(dtype)
    with torch.no_grad():  # non-zero biases, so that a wrong treatment of them would show
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


IMPLS = ["reference", "fused"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", sorted(ACM_VARIANTS))
def test_acm_matches_spec_in_float64(variant, impl):
    m = random_acm(variant=variant, impl=impl).train()
    x = torch.randn(3, 16, 5, 7, dtype=torch.float64) * 2 + 1
    y = m(x)
    y_ref, d_ref = spec_acm(x, m)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if d_ref is None:
        assert m.orth_term is None
    else:
        torch.testing.assert_close(m.orth_term, d_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_acm_gradcheck_float64(impl):
    m = random_acm(channels=8, groups=2, impl=impl).train()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, requires_grad=True)

    def y_and_d(inp):
        y = m(inp)
        return y, m.orth_term

    assert gradcheck(y_and_d, (x,), eps=1e-6, atol=1e-7)
    names = [n for n, _ in m.named_parameters()]

    def y_of_params(*params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x.detach(),))

    assert gradcheck(y_of_params, tuple(m.parameters()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_parameter_gets_a_gradient_from_output_and_orth_term(impl):
    m = random_acm(dtype=torch.float32, impl=impl).train()
    x = torch.randn(2, 16, 6, 6)
    y = m(x)
    (y.square().mean() + m.orth_term.abs().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_eval_mode_computes_no_orth_term():
    m = random_acm(dtype=torch.float32).eval()
    m(torch.randn(1, 16, 4, 4))
    assert m.orth_term is None


@pytest.mark.parametrize("impl", IMPLS)
def test_output_keeps_input_dtype_and_is_finite_under_bf16_autocast(impl):
    m = random_acm(channels=32, groups=8, dtype=torch.float32, impl=impl).train()
    x = (
        torch.randn(2, 32, 8, 8) * 50
    )  # large activations: naive half-precision softmax pooling is fragile
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all() and torch.isfinite(m.orth_term).all()
    y_ref, _ = spec_acm(x.bfloat16().double(), m)
    # bf16 keeps 8 bits of mantissa: the output's rounding is the whole error.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2 * y_ref.abs().max().item())


def test_authors_initialisation():
    m = AttendAndCompare(256, num_groups=32)
    for conv in (m.k_logits, m.q_logits, m.p_reduce, m.p_expand):
        assert torch.count_nonzero(conv.bias) == 0
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.2)
    assert m.p_reduce.out_channels == 128  # hidden width C / 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=30, num_groups=32), "divisible by num_groups"),
        (dict(channels=64, num_groups=32, reduction=4), "reduction"),
        (dict(channels=64, variant="P(X+K)"), "variant must be one of"),
        (dict(channels=64, num_groups=0), "divisible by num_groups"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttendAndCompare(**kwargs)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match="built for 64 channels"):
        AttendAndCompare(64)(torch.randn(1, 32, 4, 4))
