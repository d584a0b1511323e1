"""The peer context modules (SE, GC, NL, CC) against float64 references written from their papers.

The references below use plain loops and matrix products on the modules' weights, not the modules'
own code paths, so that a shared mistake would have to be made twice.
"""

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.overrides import TorchFunctionMode

from acm_d2.layers import (
    CrissCrossAttention,
    GlobalContext,
    NonLocal2d,
    SqueezeExcite,
    criss_cross_weights,
)


def _randomize(module, seed=0, std=0.5):
    """Every parameter (zero-initialised ones included) drawn from N(0, std^2), in float64."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * std)
    return module


def _input(B=2, C=16, H=3, W=5, seed=1):
    return torch.randn(
        B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _matrix(conv):
    """A 1x1 conv's weight as an out x in matrix and its bias."""
    return conv.weight[:, :, 0, 0], conv.bias


def _softmax(logits):
    e = torch.exp(logits - logits.max())
    return e / e.sum()


# ---------------------------------------------------------------- references, one sample at a time


def reference_se(module, x):
    w1, b1 = _matrix(module.fc1)
    w2, b2 = _matrix(module.fc2)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        squeezed = x[b].mean(dim=(1, 2))
        excitation = torch.sigmoid(w2 @ torch.relu(w1 @ squeezed + b1) + b2)
        out[b] = x[b] * excitation[:, None, None]
    return out


def reference_gc(module, x):
    wk, bk = _matrix(module.attention_logits)
    w1, b1 = _matrix(module.transform[0])
    norm = module.transform[1]
    w2, b2 = _matrix(module.transform[3])
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        positions = x[b].reshape(C, H * W)
        weights = _softmax(wk[0] @ positions + bk[0])
        context = sum(weights[n] * positions[:, n] for n in range(H * W))
        hidden = w1 @ context + b1
        hidden = (hidden - hidden.mean()) / torch.sqrt(hidden.var(unbiased=False) + norm.eps)
        hidden = torch.relu(hidden * norm.weight.flatten() + norm.bias.flatten())
        out[b] = x[b] + (w2 @ hidden + b2)[:, None, None]
    return out


def _max_pool_2x2(feature):
    d, H, W = feature.shape
    pooled = torch.empty(d, H // 2, W // 2, dtype=feature.dtype)
    for i in range(H // 2):
        for j in range(W // 2):
            pooled[:, i, j] = feature[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].amax(dim=(1, 2))
    return pooled


def reference_nl(module, x):
    wt, bt = _matrix(module.theta)
    wp, bp = _matrix(module.phi)
    wg, bg = _matrix(module.g)
    wo, bo = _matrix(module.out)
    B, _, H, W = x.shape
    d = wt.shape[0]
    out = torch.empty_like(x)
    for b in range(B):
        embed = lambda w, bias: torch.einsum("dc,chw->dhw", w, x[b]) + bias[:, None, None]  # noqa: E731
        theta, phi, g = embed(wt, bt), embed(wp, bp), embed(wg, bg)
        if module.sub_sample:
            phi, g = _max_pool_2x2(phi), _max_pool_2x2(g)
        phi, g = phi.reshape(d, -1), g.reshape(d, -1)
        for h in range(H):
            for w in range(W):
                weights = _softmax(theta[:, h, w] @ phi / math.sqrt(d))
                z = g @ weights
                out[b, :, h, w] = x[b, :, h, w] + wo @ z + bo
    return out


def criss_cross_positions(H, W, h, w):
    """Omega_u of the paper: the column of u without u, then the whole row (u once)."""
    return [(i, w) for i in range(H) if i != h] + [(h, j) for j in range(W)]


def reference_cc_weights(query, key):
    """Per-pixel softmax over the H + W - 1 criss-cross positions: {(h, w): [(position, weight)]}."""
    _, H, W = query.shape
    weights = {}
    for h in range(H):
        for w in range(W):
            positions = criss_cross_positions(H, W, h, w)
            energies = torch.stack([query[:, h, w] @ key[:, i, j] for i, j in positions])
            weights[h, w] = list(zip(positions, _softmax(energies)))
    return weights


def reference_cc(module, x):
    wq, bq = _matrix(module.query)
    wk, bk = _matrix(module.key)
    wv, bv = _matrix(module.value)
    for _ in range(module.recurrence):
        new = torch.empty_like(x)
        for b in range(x.shape[0]):
            project = lambda w, bias: torch.einsum("dc,chw->dhw", w, x[b]) + bias[:, None, None]  # noqa: E731
            query, key, value = project(wq, bq), project(wk, bk), project(wv, bv)
            for (h, w), pairs in reference_cc_weights(query, key).items():
                attended = sum(a * value[:, i, j] for (i, j), a in pairs)
                new[b, :, h, w] = module.gamma * attended + x[b, :, h, w]
        x = new
    return x


# ---------------------------------------------------------------- outputs against the references

MODULES = {
    "SE": (lambda: SqueezeExcite(16, reduction=4), reference_se),
    "GC": (lambda: GlobalContext(16, ratio=0.25), reference_gc),
    "NL": (lambda: NonLocal2d(16), reference_nl),
    "NL-sub-sampled": (lambda: NonLocal2d(16, sub_sample=True), reference_nl),
    "CC": (lambda: CrissCrossAttention(16, reduction=4), reference_cc),
    "CC-recurrence-3": (lambda: CrissCrossAttention(16, reduction=4, recurrence=3), reference_cc),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_output_matches_float64_paper_reference(name):
    make, reference = MODULES[name]
    module = _randomize(make())
    x = _input(H=4, W=6)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_gradcheck_input_and_parameters_float64(name):
    module = _randomize(MODULES[name][0]())
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    x = _input(B=1, C=16, H=2, W=4).requires_grad_(True)

    def run(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    # fast_mode checks random projections of the Jacobian: the same check at a fraction of the cost.
    assert gradcheck(run, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_shape_and_dtype_preserved_on_non_square_maps(name):
    module = MODULES[name][0]()
    x = torch.randn(3, 16, 5, 8)
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize(
    "make, zero_initialised",
    [
        (lambda: GlobalContext(16, ratio=0.25), "transform.3.weight"),
        (lambda: NonLocal2d(16), "out.weight"),
        (lambda: CrissCrossAttention(16), "gamma"),
    ],
    ids=["GC", "NL", "CC"],
)
def test_identity_at_start_and_zero_initialised_parameter_still_learns(make, zero_initialised):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 16, 4, 5)
    y = module(x)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    grad = dict(module.named_parameters())[zero_initialised].grad
    assert grad is not None and grad.abs().sum() > 0


def test_reset_parameters_restores_the_initialisation():
    module = _randomize(NonLocal2d(8)).float()
    module.reset_parameters()
    assert torch.count_nonzero(module.out.weight) == 0 and torch.count_nonzero(module.out.bias) == 0
    assert module.theta.weight.std() < 0.05


def test_se_default_hidden_width_is_channels_over_16():
    assert SqueezeExcite(256).fc1.out_channels == 16


def test_gc_default_hidden_width_is_channels_over_16():
    assert GlobalContext(256).transform[0].out_channels == 16


# ---------------------------------------------------------------- criss-cross: u counted once


def test_criss_cross_weights_spread_one_over_h_plus_w_minus_1_positions():
    H, W = 4, 6
    query, key = _input(C=3, H=H, W=W, seed=2), _input(C=3, H=H, W=W, seed=3)
    weights = criss_cross_weights(query, key)
    assert weights.shape == (2, H, W, H + W)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, H, W, dtype=torch.float64))
    self_in_column = weights[
        :, torch.arange(H), :, torch.arange(H)
    ]  # H x B x W: entry i == h of each column
    assert torch.count_nonzero(self_in_column) == 0
    assert torch.count_nonzero(weights) == 2 * H * W * (H + W - 1)


def test_criss_cross_weights_match_per_pixel_loop():
    H, W = 3, 5
    query, key = _input(C=4, H=H, W=W, seed=4), _input(C=4, H=H, W=W, seed=5)
    weights = criss_cross_weights(query, key)
    for b in range(2):
        for (h, w), pairs in reference_cc_weights(query[b], key[b]).items():
            assert len(pairs) == H + W - 1
            dense = torch.zeros(H + W, dtype=torch.float64)
            for (i, j), a in pairs:
                dense[i if j == w and i != h else H + j] = a
            torch.testing.assert_close(weights[b, h, w], dense, rtol=1e-12, atol=1e-12)


def test_criss_cross_single_row_and_column_maps():
    module = _randomize(CrissCrossAttention(16, reduction=4))
    for shape in [(1, 16, 1, 5), (1, 16, 4, 1), (1, 16, 1, 1)]:
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(module(x), reference_cc(module, x))


# ---------------------------------------------------------------- mixed precision


class _RecordSoftmaxDtypes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "softmax":
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["SE", "GC", "NL", "CC"])
def test_autocast_bfloat16_keeps_input_dtype_and_stays_close(name):
    # Moderate weights: with sharp attention, bf16 rounding in the 1x1 convs alone can move the argmax.
    module = _randomize(MODULES[name][0](), std=0.2).float()
    x = torch.randn(2, 16, 6, 7)
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        y_low = module(x.bfloat16())
    assert y.dtype == torch.float32 and y_low.dtype == torch.bfloat16
    assert (y - expected).abs().max() / expected.abs().max() < 0.02


@pytest.mark.parametrize("name", ["GC", "NL", "CC"])
def test_softmax_runs_in_float32_under_autocast(name):
    module = MODULES[name][0]()
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordSoftmaxDtypes() as record:
        module(torch.randn(1, 16, 4, 5).bfloat16())
    assert record.dtypes and set(record.dtypes) == {torch.float32}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SqueezeExcite(0), "SqueezeExcite needs channels >= 1"),
        (
            lambda: SqueezeExcite(8, reduction=16),
            r"SqueezeExcite needs 1 <= reduction <= channels \(8\)",
        ),
        (lambda: SqueezeExcite(8, reduction=0), "got reduction=0"),
        (lambda: GlobalContext(0), "GlobalContext needs channels >= 1"),
        (lambda: GlobalContext(8, ratio=0.0), "got ratio=0.0 for channels=8"),
        (lambda: GlobalContext(8, ratio=1.5), "0 < ratio <= 1"),
        (lambda: GlobalContext(8, ratio=1 / 16), r"int\(channels \* ratio\) >= 1"),
        (lambda: NonLocal2d(1, reduction=2), r"NonLocal2d needs 1 <= reduction <= channels \(1\)"),
        (lambda: NonLocal2d(0), "NonLocal2d needs channels >= 1"),
        (
            lambda: CrissCrossAttention(4),
            r"the width of Q and K \(channels // reduction\) is at least 1, got reduction=8",
        ),
        (lambda: CrissCrossAttention(16, recurrence=0), r"recurrence >= 1 \(paper: 2\), got 0"),
        (lambda: CrissCrossAttention(0), "CrissCrossAttention needs channels >= 1"),
    ],
)
def test_invalid_options_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "module",
    [SqueezeExcite(32), GlobalContext(32), NonLocal2d(32), CrissCrossAttention(32)],
    ids=["SE", "GC", "NL", "CC"],
)
def test_wrong_channel_count_raises_value_error(module):
    with pytest.raises(ValueError, match="built for 32 channels got an input with 16"):
        module(torch.randn(1, 16, 3, 3))
