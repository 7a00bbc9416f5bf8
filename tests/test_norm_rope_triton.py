"""Triton RMS-normalize / RoPE / fused norm + RoPE (`dsv4fn.norm_rope.triton`) against the torch reference.

The reference always runs on CPU (its CUDA kernels round differently: `mean` multiplies by 1/n,
`rsqrt` is approximate). Only the order of the sum of squares may differ, so:
  * inputs whose sum of squares is exact in fp32 (multiples of 1/16) must match bit for bit;
  * random inputs: bf16 outputs may differ by at most 1 ulp (how many is reported), fp32 outputs by
    at most 2e-6 of each element's magnitude envelope (`|y|`, or `|re*c| + |im*s|` for a rotated
    pair, where the two products may cancel).
Without a GPU the kernels run in the Triton interpreter; with one, the same tests run compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
from torch import Tensor

from dsv4fn import _backend
from dsv4fn.norm_rope import reference as ref
from dsv4fn.norm_rope import triton as tk

GEN_SEED = 20240611


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(GEN_SEED + seed)


def _cos_sin(n: int, half: int, gen: torch.Generator, max_pos: int = 1 << 20) -> tuple[Tensor, Tensor]:
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half)))
    pos = torch.randint(0, max_pos, (n,), generator=gen)
    return ref.rope_cos_sin(freqs, pos)


def _rand_x(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Rows of varied magnitude (1e-3 .. 1e3), a few exact zeros."""
    x = torch.randn(shape, generator=gen)
    scale = torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-7, 7, generator=gen))
    x = x * scale
    x[..., 3] = 0.0
    return x.to(dtype)


def _exact_x(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Multiples of 1/16 in [-4, 4]: every partial sum of squares is exact in fp32."""
    return (torch.randint(-64, 65, shape, generator=gen).float() / 16).to(dtype)


def _ordered(bits: Tensor) -> Tensor:
    b = bits.to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def _rope_env(y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Magnitude envelope of `apply_rope(y)`: |y| on nope dims, |re*c| + |im*s| (resp. |re*s| + |im*c|)."""
    half = cos.shape[-1]
    d = y.shape[-1]
    env = y.abs().clone()
    if half == 0:
        return env
    rot = y[..., d - 2 * half :].abs()
    re, im = rot[..., 0::2], rot[..., 1::2]
    c, s = cos.abs(), sin.abs()
    env[..., d - 2 * half :] = torch.stack([re * c + im * s, re * s + im * c], dim=-1).flatten(-2)
    return env


_REPORT: list[str] = []


def _compare(name: str, expect: Tensor, got: Tensor, env: Tensor | None = None, *, exact: bool = False) -> None:
    got = got.cpu()
    assert got.shape == expect.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    assert got.dtype == expect.dtype, f"{name}: dtype {got.dtype} != {expect.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (unwritten elements?)"
    if exact:
        bad = (got != expect).nonzero()
        assert bad.shape[0] == 0, f"{name}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}"
        return
    if expect.dtype in (torch.bfloat16, torch.float16) and env is not None:
        # GPU vs CPU: the fp32 sum of squares may round differently (another reduction order); after
        # a rotation that cancels, one fp32 ulp of the input can move a small output by many of its own
        # ulps, so bound the error by one bf16 ulp of the rotation's magnitude envelope instead
        # (ulp(v) <= 2^-7 |v| for bf16).
        err = (got.double() - expect.double()).abs()
        bound = env.cpu().double() * 2.0**-7
        bad = (err > bound).nonzero()
        assert bad.shape[0] == 0, f"{name}: {bad.shape[0]} elements beyond one bf16 ulp of the envelope"
        _REPORT.append(f"{name}: {int((err > 0).sum())}/{err.numel()} elements differ (within the envelope)")
        return
    if expect.dtype in (torch.bfloat16, torch.float16):
        dist = (_ordered(got.view(torch.int16)) - _ordered(expect.view(torch.int16))).abs()
        n_diff = int((dist > 0).sum())
        worst = int(dist.max()) if dist.numel() else 0
        _REPORT.append(f"{name}: {n_diff}/{dist.numel()} elements 1 ulp off")
        assert worst <= 1, f"{name}: an element is {worst} ulp off ({n_diff} differ)"
        assert n_diff <= max(4, dist.numel() // 1000), f"{name}: {n_diff} of {dist.numel()} elements 1 ulp off"
        return
    env = expect.abs() if env is None else env.cpu()
    err = (got.double() - expect.double()).abs()
    ratio = err / env.double().clamp_min(1e-30)
    w = int(ratio.argmax())
    _REPORT.append(f"{name}: max err/envelope {ratio.max().item():.2e}")
    assert ratio.max().item() <= 2e-6, (
        f"{name}: err/envelope {ratio.flatten()[w].item():.2e} at {w}: "
        f"{got.flatten()[w].item()} vs {expect.flatten()[w].item()}"
    )


@pytest.fixture(scope="module", autouse=True)
def _print_report():
    yield
    if _REPORT:
        print("\nnorm_rope triton vs reference:\n  " + "\n  ".join(_REPORT))


# ---------------------------------------------------------------------------------------------
# rms_normalize
# ---------------------------------------------------------------------------------------------

RMS_CASES = [
    ((13, 96), torch.float32, None),
    ((3, 5, 512), torch.bfloat16, torch.float32),
    ((7, 1536), torch.bfloat16, torch.float32),
    ((6, 1536), torch.float32, torch.bfloat16),
    ((2, 7168), torch.bfloat16, None),
    ((9, 100), torch.float16, torch.float32),
]


@pytest.mark.parametrize(
    "shape,dtype,wdtype", RMS_CASES, ids=[f"{'x'.join(map(str, s))}-{d}-w{w}" for s, d, w in RMS_CASES]
)
def test_rms_normalize_random(shape, dtype, wdtype, device):
    gen = _gen(1)
    x = _rand_x(shape, dtype, gen)
    w = None if wdtype is None else (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(wdtype)
    expect = ref.rms_normalize(x, w, 1e-6)
    got = tk.rms_normalize(x.to(device), None if w is None else w.to(device), 1e-6)
    _compare(f"rms_normalize {shape} {dtype}", expect, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [96, 512, 1536])
def test_rms_normalize_exact_sums(d, dtype, device):
    """Exact sums of squares: the kernel must reproduce the reference bit for bit."""
    gen = _gen(2)
    x = _exact_x((11, d), dtype, gen)
    w = 1 + 0.2 * torch.randn(d, generator=gen)
    for weight in (w, None):
        expect = ref.rms_normalize(x, weight, 2.0**-20)
        got = tk.rms_normalize(x.to(device), None if weight is None else weight.to(device), 2.0**-20)
        _compare(f"rms exact d={d} {dtype}", expect, got, exact=True)


def test_rms_normalize_inplace(device):
    gen = _gen(3)
    x = _rand_x((4, 3, 512), torch.bfloat16, gen)
    w = 1 + 0.2 * torch.randn(512, generator=gen)
    expect = ref.rms_normalize(x, w, 1e-6)
    xd = x.clone().to(device)
    ptr = xd.data_ptr()
    out = tk.rms_normalize_(xd, w.to(device), 1e-6)
    assert out is xd and xd.data_ptr() == ptr
    _compare("rms_normalize_ (in place)", expect, xd)
    # exact inputs: bit for bit
    x = _exact_x((5, 1536), torch.float32, gen)
    xd = x.clone().to(device)
    tk.rms_normalize_(xd, None, 2.0**-20)
    _compare("rms_normalize_ exact", ref.rms_normalize(x, None, 2.0**-20), xd, exact=True)


def test_rms_normalize_strided_rows(device):
    """Rows with a padded stride (a view of a wider buffer) and a zero-row input."""
    gen = _gen(4)
    buf = _rand_x((9, 640), torch.bfloat16, gen)
    x = buf[:, :512]
    _compare("rms strided", ref.rms_normalize(x), tk.rms_normalize(x.to(device)))
    empty = torch.empty(0, 512, dtype=torch.bfloat16, device=device)
    assert tk.rms_normalize(empty).shape == (0, 512)


# ---------------------------------------------------------------------------------------------
# norm_rope
# ---------------------------------------------------------------------------------------------

# (name, x shape, rope half, x dtype, weight?, out_dtype, cos broadcast over heads?)
NR_CASES = [
    ("q-heads", (24, 4, 512), 32, torch.bfloat16, False, torch.bfloat16, True),
    ("kv-weight", (40, 512), 32, torch.bfloat16, True, torch.bfloat16, False),
    ("compress-fp32-in", (33, 512), 32, torch.float32, True, torch.bfloat16, False),
    ("fp32-out", (17, 3, 512), 32, torch.bfloat16, True, torch.float32, True),
    ("tiny", (29, 2, 64), 16, torch.bfloat16, True, None, True),
    ("odd-nope", (15, 65), 16, torch.float32, True, torch.float32, False),
    ("all-rope", (10, 64), 32, torch.float32, False, torch.float32, False),
]


@pytest.mark.parametrize("case", NR_CASES, ids=[c[0] for c in NR_CASES])
def test_norm_rope_random(case, device):
    name, shape, half, dtype, has_w, out_dtype, bcast = case
    gen = _gen(5)
    x = _rand_x(shape, dtype, gen)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=gen)) if has_w else None
    cos, sin = _cos_sin(shape[0], half, gen)
    if bcast:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    expect = ref.norm_rope(x, w, 1e-6, cos, sin, out_dtype=out_dtype)
    got = tk.norm_rope(
        x.to(device), None if w is None else w.to(device), 1e-6, cos.to(device), sin.to(device), out_dtype=out_dtype
    )
    env = _rope_env(ref.rms_normalize(x.float(), w, 1e-6), cos, sin)
    _compare(f"norm_rope {name}", expect, got, env)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_exact_sums(out_dtype, device):
    gen = _gen(6)
    x = _exact_x((21, 3, 512), torch.bfloat16, gen)
    cos, sin = _cos_sin(21, 32, gen)
    w = 1 + 0.2 * torch.randn(512, generator=gen)
    expect = ref.norm_rope(x, w, 2.0**-20, cos[:, None], sin[:, None], out_dtype=out_dtype)
    got = tk.norm_rope(
        x.to(device), w.to(device), 2.0**-20, cos[:, None].to(device), sin[:, None].to(device), out_dtype=out_dtype
    )
    _compare(f"norm_rope exact {out_dtype}", expect, got, exact=True)


# ---------------------------------------------------------------------------------------------
# apply_rope
# ---------------------------------------------------------------------------------------------

AR_CASES = [
    ("attn-out-inverse", (19, 4, 512), 32, torch.bfloat16, True, "heads"),
    ("indexer-fp32", (23, 3, 128), 32, torch.float32, False, "heads"),
    ("rows", (31, 96), 16, torch.float32, True, "rows"),
    ("odd-nope", (12, 2, 41), 8, torch.bfloat16, False, "heads"),
    ("cos-per-head", (7, 4, 64), 16, torch.float32, False, "per-head"),
    ("cos-shared", (9, 3, 64), 16, torch.float32, True, "shared"),
]


@pytest.mark.parametrize("case", AR_CASES, ids=[c[0] for c in AR_CASES])
def test_apply_rope(case, device):
    """Elementwise only: bit for bit (no reduction), forward and inverse, every broadcast form."""
    name, shape, half, dtype, inverse, form = case
    gen = _gen(7)
    x = _rand_x(shape, dtype, gen)
    if form == "rows":
        cos, sin = _cos_sin(shape[0], half, gen)
    elif form == "heads":
        cos, sin = (t.unsqueeze(1) for t in _cos_sin(shape[0], half, gen))
    elif form == "per-head":  # cos [1, h, half]: not a prefix broadcast, materialized
        cos, sin = (t.view(1, shape[1], half) for t in _cos_sin(shape[1], half, gen))
    else:  # one cos row for everything
        cos, sin = (t[0] for t in _cos_sin(1, half, gen))
    expect = ref.apply_rope(x, cos, sin, inverse=inverse)
    got = tk.apply_rope(x.to(device), cos.to(device), sin.to(device), inverse=inverse)
    _compare(f"apply_rope {name}", expect, got, exact=True)


def test_rope_roundtrip(device):
    """inverse(apply(x)) == x up to fp32 rounding (fp32 input, unit-norm rotation)."""
    gen = _gen(8)
    x = _rand_x((16, 4, 128), torch.float32, gen).to(device)
    cos, sin = (t.unsqueeze(1).to(device) for t in _cos_sin(16, 32, gen))
    back = tk.apply_rope(tk.apply_rope(x, cos, sin), cos, sin, inverse=True)
    assert torch.allclose(back, x, rtol=1e-5, atol=1e-6 * x.abs().amax().item())


# ---------------------------------------------------------------------------------------------
# dispatch, errors, ops
# ---------------------------------------------------------------------------------------------


def test_backend_registered(device):
    dev = torch.device(device)
    for step, fn in (("rms_normalize", tk.rms_normalize), ("norm_rope", tk.norm_rope), ("apply_rope", tk.apply_rope)):
        name, got = _backend.resolve(step, "triton", dev)
        assert name == "triton" and got is fn
    gen = _gen(9)
    x = _rand_x((8, 2, 64), torch.bfloat16, gen).to(device)
    cos, sin = (t.unsqueeze(1).to(device) for t in _cos_sin(8, 16, gen))
    _, cmp = _backend.resolve("norm_rope", "compare:triton", dev)
    cmp(x, None, 1e-6, cos, sin, out_dtype=torch.bfloat16)


def test_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    cos = torch.rand(4, 16, device=device)
    with pytest.raises(TypeError, match="x"):
        tk.rms_normalize(torch.ones(4, 64, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="weight"):
        tk.rms_normalize(x, torch.ones(63, device=device))
    with pytest.raises(ValueError, match="sin"):
        tk.apply_rope(x, cos, torch.rand(4, 8, device=device))
    with pytest.raises(ValueError, match="cos"):
        tk.apply_rope(x, torch.rand(4, 33, device=device), torch.rand(4, 33, device=device))
    with pytest.raises(ValueError, match="cos"):
        tk.norm_rope(x, None, 1e-6, torch.rand(5, 16, device=device), torch.rand(5, 16, device=device))
    with pytest.raises(ValueError, match="x"):
        tk.rms_normalize(torch.randn(64, 4, device=device).t())
    with pytest.raises(TypeError, match="out_dtype"):
        tk.norm_rope(x, None, 1e-6, cos, cos, out_dtype=torch.int8)


def test_ops_schema(device):
    """opcheck's schema and autograd-registration tests (the fake-tensor tests need a GPU: see below)."""
    gen = _gen(10)
    x = _rand_x((5, 3, 64), torch.bfloat16, gen).to(device)
    cos, sin = (t.unsqueeze(1).to(device) for t in _cos_sin(5, 16, gen))
    w = torch.rand(64, device=device)
    utils = ("test_schema", "test_autograd_registration")
    ops = torch.ops.dsv4fn
    torch.library.opcheck(ops.rms_normalize.default, (x, w, 1e-6), test_utils=utils)
    torch.library.opcheck(ops.rms_normalize_.default, (x.clone(), None, 1e-6), test_utils=utils)
    torch.library.opcheck(ops.norm_rope.default, (x, w, 1e-6, cos, sin, torch.float32), test_utils=utils)
    torch.library.opcheck(ops.apply_rope.default, (x, cos, sin, True), test_utils=utils)


# ---------------------------------------------------------------------------------------------
# GPU: V4-Flash (64 heads) and V4-Pro (128 heads) sizes, full opcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [64, 128], ids=["v4flash-h64", "v4pro-h128"])
def test_gpu_v4_sizes(heads):
    gen = _gen(11)
    t, d, half = 4096, 512, 32
    cos, sin = _cos_sin(t, half, gen)
    # q path: q_lora rms (weight) -> per-head weightless norm + rope
    qr = _rand_x((t, 1536), torch.bfloat16, gen)
    wq = 1 + 0.2 * torch.randn(1536, generator=gen)
    _compare("gpu rms q_lora", ref.rms_normalize(qr, wq, 1e-6), tk.rms_normalize(qr.cuda(), wq.cuda(), 1e-6))
    q = _rand_x((t, heads, d), torch.bfloat16, gen)
    c1, s1 = cos.unsqueeze(1), sin.unsqueeze(1)
    got = tk.norm_rope(q.cuda(), None, 1e-6, c1.cuda(), s1.cuda(), out_dtype=torch.bfloat16)
    env = _rope_env(ref.rms_normalize(q.float(), None, 1e-6), c1, s1)
    _compare(f"gpu norm_rope q h{heads}", ref.norm_rope(q, None, 1e-6, c1, s1, out_dtype=torch.bfloat16), got, env)
    # kv path
    kv = _rand_x((t, d), torch.bfloat16, gen)
    wkv = 1 + 0.2 * torch.randn(d, generator=gen)
    got = tk.norm_rope(kv.cuda(), wkv.cuda(), 1e-6, cos.cuda(), sin.cuda(), out_dtype=torch.bfloat16)
    _compare("gpu norm_rope kv", ref.norm_rope(kv, wkv, 1e-6, cos, sin, out_dtype=torch.bfloat16), got)
    # inverse rope of the attention output; exact
    o = _rand_x((t, heads, d), torch.bfloat16, gen)
    got = tk.apply_rope(o.cuda(), c1.cuda(), s1.cuda(), inverse=True)
    _compare(f"gpu apply_rope inverse h{heads}", ref.apply_rope(o, c1, s1, inverse=True), got, exact=True)
    # exact sums: bit for bit on the GPU too (IEEE div/sqrt, products never fused)
    xe = _exact_x((t, 8, d), torch.bfloat16, gen)
    for od in (torch.float32, torch.bfloat16):
        got = tk.norm_rope(xe.cuda(), wkv.cuda(), 2.0**-20, c1.cuda(), s1.cuda(), out_dtype=od)
        _compare(f"gpu norm_rope exact {od}", ref.norm_rope(xe, wkv, 2.0**-20, c1, s1, out_dtype=od), got, exact=True)


@pytest.mark.gpu
def test_gpu_opcheck():
    gen = _gen(12)
    x = _rand_x((6, 4, 512), torch.bfloat16, gen).cuda()
    cos, sin = (t.unsqueeze(1).cuda() for t in _cos_sin(6, 32, gen))
    w = torch.rand(512, device="cuda")
    ops = torch.ops.dsv4fn
    torch.library.opcheck(ops.rms_normalize.default, (x, w, 1e-6))
    torch.library.opcheck(ops.rms_normalize.default, (x, None, 1e-6))
    torch.library.opcheck(ops.rms_normalize_.default, (x.clone(), w, 1e-6))
    torch.library.opcheck(ops.norm_rope.default, (x, w, 1e-6, cos, sin, torch.bfloat16))
    torch.library.opcheck(ops.norm_rope.default, (x, None, 1e-6, cos, sin, None))
    torch.library.opcheck(ops.apply_rope.default, (x, cos, sin, True))
