"""spot.pack_kcache / unpack_kcache / append_kcache (the 4-bit selector K-cache) against
reference.py bit for bit, against a float64 nearest-value quantiser, and CUDA against CPU."""

from __future__ import annotations

import zlib

import pytest
import torch

import spot_attention
from spot_attention import ops, reference

FORMATS = ("int4", "mxfp4", "nvfp4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
E2M1 = torch.tensor(reference.E2M1_VALUES, dtype=torch.float64)


def gpu(test):
    skip = pytest.mark.skipif(not spot_attention.cuda_available(), reason="needs CUDA and the CUDA build of spot_ops")
    return pytest.mark.gpu(skip(test))


def random_keys(rows, dim, dtype, seed, low_exponent=-6, high_exponent=6):
    """Gaussian keys whose scale varies per group of 16 by 2^uniform(low, high): groups of very
    different magnitude in one row, as real selector keys have."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dim // 16, 16, generator=generator, dtype=torch.float64)
    exponents = torch.empty(rows, dim // 16, 1, dtype=torch.float64).uniform_(
        low_exponent, high_exponent, generator=generator)
    return (values * torch.exp2(exponents)).reshape(rows, dim).to(dtype)


def global_scale_for(keys):
    return float(keys.double().abs().amax()) / (6.0 * 448.0)


def assert_scales_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.float16:
        actual, expected = actual.view(torch.int16), expected.view(torch.int16)
    assert torch.equal(actual.cpu(), expected.cpu())


def assert_same_floats(actual, expected):
    """Equal bit patterns (so +0 / -0 count), NaN wherever the other is NaN."""
    actual, expected = actual.cpu().float(), expected.cpu().float()
    assert actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def assert_matches_reference(keys, fmt, global_scale=1.0):
    codes, scales = ops.pack_kcache(keys, fmt, global_scale)
    ref_codes, ref_scales = reference.pack_kcache(keys.cpu(), fmt, global_scale)
    assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape
    assert torch.equal(codes.cpu(), ref_codes), f"{fmt}: codes differ in {(codes.cpu() != ref_codes).sum()} bytes"
    assert_scales_equal(scales, ref_scales)
    unpacked = ops.unpack_kcache(codes, scales, fmt, global_scale)
    assert_same_floats(unpacked, reference.unpack_kcache(ref_codes, ref_scales, fmt, global_scale))
    return codes, scales, unpacked


# --------------------------------------------------------------------------------------------
# CPU against the reference, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponents", [(-6, 6), (-30, -10), (8, 16), (-20, 20)], ids=lambda e: f"2^{e[0]}..2^{e[1]}")
def test_pack_matches_reference(fmt, dtype, exponents):
    if dtype == torch.float16:
        exponents = (exponents[0], min(exponents[1], 13))  # float16 tops out at 65504
    seed = zlib.crc32(f"{fmt}{dtype}{exponents}".encode())
    keys = random_keys(67, 64, dtype, seed=seed, low_exponent=exponents[0], high_exponent=exponents[1])
    global_scale = global_scale_for(keys) if fmt == "nvfp4" else 1.0
    assert_matches_reference(keys, fmt, global_scale)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(5, 32), (2, 3, 4, 128), (1, 96), (0, 64), (3, 0, 32)])
def test_shapes(fmt, shape):
    keys = random_keys(max(1, int(torch.tensor(shape[:-1]).prod())), shape[-1], torch.float32, seed=3)
    keys = keys[: int(torch.tensor(shape[:-1]).prod())].reshape(shape)
    if keys.numel() == 0:  # the reference cannot reshape empty inputs: shapes only
        codes, scales = ops.pack_kcache(keys, fmt, 0.01)
        unpacked = ops.unpack_kcache(codes, scales, fmt, 0.01)
    else:
        codes, scales, unpacked = assert_matches_reference(keys, fmt, 0.01)
    group = reference.KCACHE_GROUP[fmt]
    assert codes.shape == (*shape[:-1], shape[-1] // 2)
    assert scales.shape == (*shape[:-1], shape[-1] // group)
    assert unpacked.shape == shape and unpacked.dtype == torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_global_scale_not_a_float32(fmt):
    # The schema passes a double; the reference rounds in double, so must the kernel.
    keys = random_keys(40, 64, torch.float32, seed=11)
    for global_scale in (1.0 / 3.0, global_scale_for(keys) * 1.37, 1e-7 / 3.0, 10.0 / 7.0):
        assert_matches_reference(keys, fmt, global_scale)


def test_round_half_even_ties_int4():
    # scale = fp16(amax / 7) exactly s when amax = 7 s with s an fp16 value; then x = (k + 1/2) s
    # are exact ties and must go to the even integer.
    scale = 0.0078125 * 1.25  # an fp16 value with a short mantissa, so 7 s and (k + .5) s are exact
    half_integers = torch.arange(-6.5, 7.0, 1.0, dtype=torch.float64)  # 14 ties in [-6.5, 6.5]
    group = torch.cat([torch.tensor([7.0]), half_integers, half_integers, torch.tensor([0.5, -0.5, 3.0])]) * scale
    keys = group.reshape(1, 32).float()
    codes, scales, unpacked = assert_matches_reference(keys, "int4")
    assert scales.item() == scale
    expected = torch.round(group / scale)  # ties to even
    assert torch.equal(unpacked.double().reshape(-1) / scale, expected)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_round_half_even_ties_e2m1(fmt):
    # Every E2M1 midpoint and grid point times the scale 2^-3, with 6 * 2^-3 the largest
    # magnitude of each 16-group: mxfp4's exponent is floor(log2(0.75)) - 2 = -3, and nvfp4 with
    # global_scale 2^-3 has block scale e4m3(0.75 / 6 / 0.125) = 1.0. Both scales are exact, so
    # the midpoints are exact ties and go to the even magnitude index.
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    first = [6.0] + midpoints + [-m for m in midpoints] + [0.0]
    second = [6.0, 0.5, 1, 1.5, 2, 3, 4, -0.5, -1, -1.5, -2, -3, -4, -6, 0.2, -0.2]
    keys = torch.tensor(first + second, dtype=torch.float32).reshape(1, 32) * 0.125
    codes, _, unpacked = assert_matches_reference(keys, fmt, 0.125 if fmt == "nvfp4" else 1.0)
    nibbles = reference._bytes_to_nibbles(codes)[0].tolist()
    assert nibbles[:16] == [7, 0, 2, 2, 4, 4, 6, 6, 0, 10, 10, 12, 12, 14, 14, 0]  # -0.25 -> code 0, not -0
    assert nibbles[16:] == [7, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 0, 0]
    assert torch.equal(unpacked[0, 16:30], keys[0, 16:30])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_values(fmt, dtype):
    """All-zero, tiny, huge, and subnormal groups of the input dtype and of each scale format."""
    finfo = torch.finfo(dtype)
    groups = [
        torch.zeros(32),
        torch.full((32,), finfo.tiny),                       # smallest normal of the dtype
        torch.full((32,), finfo.tiny / 4),                   # subnormal of the dtype
        torch.linspace(-1, 1, 32) * finfo.tiny * 0.75,       # mixed subnormals and zero
        torch.linspace(-1, 1, 32) * finfo.max,               # huge: saturation and scale overflow
        torch.linspace(-1, 1, 32) * 3e-5,                    # int4 scale: fp16 subnormal
        torch.linspace(-1, 1, 32) * 2.0**-20 * 6,            # nvfp4: e4m3 subnormal block scale at gs=1
        torch.linspace(-1, 1, 32) * 2.0**-127,               # mxfp4: exponent clamped at -127
        torch.linspace(-1, 1, 32) * 7 * 65519.0,             # int4: largest finite fp16 scale
        torch.linspace(-1, 1, 32) * 7 * 65536.0,             # int4: scale overflows to Inf
        torch.linspace(-1, 1, 32) * 448 * 6 * 2.0,           # nvfp4: block scale saturates at 448
        torch.tensor([1.0] + [0.0] * 31),
        torch.tensor([-1e-3] * 31 + [1.0]),
    ]
    keys = torch.stack([g.to(torch.float32) for g in groups]).to(dtype)
    for global_scale in (1.0, 1e-3):
        assert_matches_reference(keys, fmt, global_scale)


def scale_boundaries(fmt):
    """Group maxima that put the scale rule on its rounding boundaries: amax / 7 at every fp16
    midpoint (int4), amax at and just below every power of two (mxfp4), amax / 6 at every E4M3
    midpoint (nvfp4, global_scale 1). Each value also nudged one float32 step either way."""
    if fmt == "int4":
        halves = torch.arange(0, 0x7BFF, 7, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
        next_halves = (torch.arange(0, 0x7BFF, 7, dtype=torch.int32) + 1).to(torch.int16).view(torch.float16).double()
        centres = ((halves + next_halves) / 2 * 7).float()
    elif fmt == "mxfp4":
        centres = torch.exp2(torch.arange(-149, 128, dtype=torch.float64)).float()
    else:
        e4m3 = reference.e4m3_to_float(torch.arange(0, 0x7F, dtype=torch.uint8))  # 0 .. 448
        centres = (torch.cat([(e4m3[:-1] + e4m3[1:]) / 2, torch.tensor([464.0])]) * 6).float()
    up = torch.nextafter(centres, torch.tensor(float("inf")))
    down = torch.nextafter(centres, torch.tensor(0.0))
    return torch.cat([centres, up, down])


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_rounding_boundaries(fmt):
    amax = scale_boundaries(fmt)
    amax = amax[torch.isfinite(amax)]
    group = reference.KCACHE_GROUP[fmt]
    # Each row: the boundary maximum, then a spread of values below it (one sign flipped).
    fractions = torch.linspace(-0.95, 0.9, group - 1, dtype=torch.float64)
    keys = torch.cat([amax.double()[:, None], amax.double()[:, None] * fractions], 1).float()
    keys = keys.repeat(1, 32 // group if group < 32 else 1)
    codes, scales, _ = assert_matches_reference(keys, fmt, 1.0)
    if fmt == "nvfp4":  # the reference's E4M3 rounding is torch's own float -> float8_e4m3fn
        expected = (amax.double() / 6.0).float().clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(scales[:, 0], expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_groups_unpack_to_nan(fmt, dtype):
    group = reference.KCACHE_GROUP[fmt]
    keys = random_keys(4, 64, torch.float32, seed=5)
    keys[0, 3] = float("nan")
    keys[1, group] = float("inf")
    keys[2, 63] = float("-inf")
    keys = keys.to(dtype)
    codes, scales, unpacked = assert_matches_reference(keys, fmt, 0.01)
    bad = torch.isfinite(keys.float()).logical_not().reshape(4, -1, group).any(-1)  # [rows, groups]
    nan_scale = {"int4": 0x7E00, "mxfp4": 0xFF, "nvfp4": 0x7F}[fmt]
    raw = scales.view(torch.int16).long() & 0xFFFF if fmt == "int4" else scales.long()
    assert torch.equal(raw == nan_scale, bad)
    assert torch.isnan(unpacked.reshape(4, -1, group)[bad]).all()
    assert torch.isfinite(unpacked.reshape(4, -1, group)[~bad]).all()
    assert (codes.reshape(4, -1, group // 2)[bad] == 0).all()
    with pytest.raises(ValueError, match="argument 'keys'"):
        ops.pack_kcache(keys, fmt, 0.01, check_finite=True)


def every_nibble_codes(rows):
    """rows x r = 32 codes holding the 16 nibbles twice."""
    return reference._nibbles_to_bytes(torch.arange(16, dtype=torch.uint8).repeat(2)).repeat(rows, 1)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_unpack_every_scale_byte(fmt):
    # All 256 scale bytes (NaN encodings, and for nvfp4 negative and subnormal E4M3) with all
    # 16 nibbles.
    scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 32 // reference.KCACHE_GROUP[fmt])
    codes = every_nibble_codes(256)
    for global_scale in (1.0, 0.3, 1e-30):
        assert_same_floats(ops.unpack_kcache(codes, scales, fmt, global_scale),
                           reference.unpack_kcache(codes, scales, fmt, global_scale))


def test_unpack_every_int4_scale():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    scales = bits.view(torch.float16)[:, None]  # every fp16 bit pattern: subnormals, Inf, NaN
    codes = every_nibble_codes(scales.shape[0])
    assert_same_floats(ops.unpack_kcache(codes, scales, "int4"), reference.unpack_kcache(codes, scales, "int4"))


def test_unpack_random_codes():
    generator = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 256, (50, 64), generator=generator, dtype=torch.uint8)
    for fmt in FORMATS:
        group = reference.KCACHE_GROUP[fmt]
        if fmt == "int4":
            scales = (torch.rand(50, 128 // group, generator=generator) * 3).half()
        else:
            scales = torch.randint(0, 256, (50, 128 // group), generator=generator, dtype=torch.uint8)
        assert_same_floats(ops.unpack_kcache(codes, scales, fmt, 0.7),
                           reference.unpack_kcache(codes, scales, fmt, 0.7))


# --------------------------------------------------------------------------------------------
# Round trip against a float64 nearest-value quantiser
# --------------------------------------------------------------------------------------------


def nearest_error(keys, fmt, scales, global_scale):
    """Distance from each key to the nearest value its group's scale can represent (float64)."""
    group = reference.KCACHE_GROUP[fmt]
    x = keys.double().reshape(*keys.shape[:-1], -1, group)
    if fmt == "int4":
        scale = scales.double()
        grid = torch.arange(-8, 8, dtype=torch.float64)
    elif fmt == "mxfp4":
        scale = torch.exp2(scales.double() - 127)
        grid = torch.cat([-E2M1.flip(0), E2M1])
    else:
        scale = reference.e4m3_to_float(scales) * global_scale
        grid = torch.cat([-E2M1.flip(0), E2M1])
    candidates = grid * scale[..., None, None]  # [..., groups, 1, grid]
    return (x[..., None] - candidates).abs().amin(-1).reshape(keys.shape)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_nearest(fmt, dtype):
    keys = random_keys(33, 128, dtype, seed=21, low_exponent=-8, high_exponent=8)
    global_scale = global_scale_for(keys) if fmt == "nvfp4" else 1.0
    codes, scales = ops.pack_kcache(keys, fmt, global_scale)
    unpacked = ops.unpack_kcache(codes, scales, fmt, global_scale).double()
    error = (unpacked - keys.double()).abs()
    best = nearest_error(keys, fmt, scales, global_scale)
    # The unpacked value is the nearest representable one (up to the float32 rounding of the decode).
    assert (error <= best + unpacked.abs() * 2.0**-23).all()
    # And the scale is a good one: the error is a small share of the group's largest magnitude.
    group = reference.KCACHE_GROUP[fmt]
    amax = keys.double().abs().reshape(33, -1, group).amax(-1, keepdim=True)
    relative = (error.reshape(33, -1, group) / amax).amax(-1)
    if fmt == "nvfp4":  # groups far below the tensor's amax get coarse subnormal E4M3 scales
        relative = relative[scales >= 0x08]
    # int4: half a step of amax / 7; mxfp4: amax / 2^e in [4, 8), steps of 2^e at most;
    # nvfp4: the E4M3 scale within 1/16 of amax / 6, steps of 2 scales at most.
    limit = {"int4": 0.5 / 7 * 1.001, "mxfp4": 0.25 + 1e-12, "nvfp4": 1 / (6 * 0.9375)}[fmt]
    assert relative.numel() > 0 and relative.max() <= limit


# --------------------------------------------------------------------------------------------
# append_kcache
# --------------------------------------------------------------------------------------------


def make_cache(batch, heads, num_blocks, dim, fmt, device="cpu", seed=0):
    """A cache filled with random bytes (poison): untouched slots must keep them."""
    group = reference.KCACHE_GROUP[fmt]
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (batch, heads, num_blocks, dim // 2), generator=generator, dtype=torch.uint8)
    scale_bytes = torch.randint(0, 256, (batch, heads, num_blocks, dim // group * (2 if fmt == "int4" else 1)),
                                generator=generator, dtype=torch.uint8)
    scales = scale_bytes.view(torch.float16) if fmt == "int4" else scale_bytes
    return codes.to(device), scales.to(device)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_writes_only_its_slots(fmt, dtype):
    batch, heads, num_blocks, dim = 4, 3, 5, 64
    codes, scales = make_cache(batch, heads, num_blocks, dim, fmt)
    before_codes, before_scales = codes.clone(), scales.clone()
    keys = random_keys(batch * heads, dim, dtype, seed=8).reshape(batch, heads, dim)
    slots = torch.tensor([2, -1, 0, num_blocks - 1], dtype=torch.int32)
    ops.append_kcache(codes, scales, keys, slots, fmt, 0.02)
    packed_codes, packed_scales = reference.pack_kcache(keys, fmt, 0.02)
    for b in range(batch):
        for slot in range(num_blocks):
            if slot == int(slots[b]):
                assert torch.equal(codes[b, :, slot], packed_codes[b])
                assert_scales_equal(scales[b, :, slot], packed_scales[b])
            else:
                assert torch.equal(codes[b, :, slot], before_codes[b, :, slot])
                assert_scales_equal(scales[b, :, slot], before_scales[b, :, slot])


def test_append_slot_past_cache_raises_on_cpu():
    codes, scales = make_cache(2, 2, 3, 32, "int4")
    keys = torch.randn(2, 2, 32)
    with pytest.raises(ValueError, match="argument 'slots'"):
        ops.append_kcache(codes, scales, keys, torch.tensor([0, 3], dtype=torch.int32), "int4")


# --------------------------------------------------------------------------------------------
# opcheck and validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_cpu(fmt):
    keys = random_keys(6, 64, torch.bfloat16, seed=2).reshape(2, 3, 64)
    torch.library.opcheck(torch.ops.spot.pack_kcache.default, (keys, fmt, 0.05))
    codes, scales = ops.pack_kcache(keys, fmt, 0.05)
    torch.library.opcheck(torch.ops.spot.unpack_kcache.default, (codes, scales, fmt, 0.05))
    cache_codes, cache_scales = make_cache(2, 3, 4, 64, fmt)
    slots = torch.tensor([1, -1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.spot.append_kcache.default, (cache_codes, cache_scales, keys, slots, fmt, 0.05))


def _bad_pack_calls(device):
    keys = torch.randn(4, 64, device=device)
    return [
        ("keys", lambda: ops.pack_kcache(keys.double(), "int4")),
        ("keys", lambda: ops.pack_kcache(keys.int(), "int4")),
        ("keys", lambda: ops.pack_kcache(keys[:, :48].contiguous(), "int4")),
        ("keys", lambda: ops.pack_kcache(keys[:, :0].contiguous(), "int4")),
        ("keys", lambda: ops.pack_kcache(torch.randn(64, 4, device=device).t(), "int4")),
        ("keys", lambda: ops.pack_kcache(keys[0, 0], "int4")),
        ("format", lambda: ops.pack_kcache(keys, "fp4")),
        ("format", lambda: ops.pack_kcache(keys, "dense")),
        ("global_scale", lambda: ops.pack_kcache(keys, "nvfp4", 0.0)),
        ("global_scale", lambda: ops.pack_kcache(keys, "nvfp4", float("inf"))),
        ("global_scale", lambda: ops.unpack_kcache(*ops.pack_kcache(keys, "nvfp4"), "nvfp4", -1.0)),
    ]


def _bad_unpack_calls(device):
    codes, scales = ops.pack_kcache(torch.randn(4, 64, device=device), "int4")
    mx_codes, mx_scales = ops.pack_kcache(torch.randn(4, 64, device=device), "mxfp4")
    return [
        ("codes", lambda: ops.unpack_kcache(codes.int(), scales, "int4")),
        ("codes", lambda: ops.unpack_kcache(codes[:, :24].contiguous(), scales, "int4")),
        ("codes", lambda: ops.unpack_kcache(codes.t().contiguous().t(), scales, "int4")),
        ("scales", lambda: ops.unpack_kcache(codes, scales.float(), "int4")),
        ("scales", lambda: ops.unpack_kcache(mx_codes, mx_scales, "int4")),
        ("scales", lambda: ops.unpack_kcache(codes, scales, "mxfp4")),
        ("scales", lambda: ops.unpack_kcache(mx_codes, mx_scales, "nvfp4")),  # wrong group count
        ("scales", lambda: ops.unpack_kcache(codes, scales[:3], "int4")),
        ("scales", lambda: ops.unpack_kcache(codes, scales.t().contiguous().t(), "int4")),
        ("format", lambda: ops.unpack_kcache(codes, scales, "INT4")),
    ]


def _bad_append_calls(device):
    codes, scales = make_cache(2, 3, 4, 64, "int4", device=device)
    keys = torch.randn(2, 3, 64, device=device)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=device)
    return [
        ("codes", lambda: ops.append_kcache(codes, scales, keys[:, :2].contiguous(), slots, "int4")),
        ("codes", lambda: ops.append_kcache(codes, scales, keys[:, :, :32].contiguous(), slots, "int4")),
        ("keys", lambda: ops.append_kcache(codes, scales, keys.double(), slots, "int4")),
        ("keys", lambda: ops.append_kcache(codes, scales, keys[None], slots, "int4")),
        ("codes", lambda: ops.append_kcache(codes[0], scales, keys, slots, "int4")),
        ("codes", lambda: ops.append_kcache(codes[:1], scales, keys, slots, "int4")),
        ("scales", lambda: ops.append_kcache(codes, scales[:, :, :2], keys, slots, "int4")),
        ("scales", lambda: ops.append_kcache(codes, scales.view(torch.uint8), keys, slots, "int4")),
        ("slots", lambda: ops.append_kcache(codes, scales, keys, slots.long(), "int4")),
        ("slots", lambda: ops.append_kcache(codes, scales, keys, slots[:1], "int4")),
        ("slots", lambda: ops.append_kcache(codes, scales, keys, slots[None], "int4")),
        ("format", lambda: ops.append_kcache(codes, scales, keys, slots, "e2m1")),
    ]


def _all_bad_calls(device):
    return _bad_pack_calls(device) + _bad_unpack_calls(device) + _bad_append_calls(device)


@pytest.mark.parametrize("index", range(len(_all_bad_calls("cpu"))))
def test_validation_cpu(index):
    argument, call = _all_bad_calls("cpu")[index]
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        call()


# --------------------------------------------------------------------------------------------
# CUDA against CPU, bit for bit
# --------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [32, 64, 128, 96])
def test_pack_unpack_gpu_matches_cpu(fmt, dtype, dim):
    keys = random_keys(1037, dim, dtype, seed=dim, low_exponent=-20, high_exponent=12)
    keys[5, 7] = float("nan")
    keys[9, dim - 1] = float("inf")
    keys[11] = 0
    global_scale = global_scale_for(keys[torch.isfinite(keys)]) / 3.0 if fmt == "nvfp4" else 1.0
    cpu_codes, cpu_scales = ops.pack_kcache(keys, fmt, global_scale)
    codes, scales = ops.pack_kcache(keys.cuda(), fmt, global_scale)
    assert codes.is_cuda and scales.is_cuda
    assert torch.equal(codes.cpu(), cpu_codes)
    assert_scales_equal(scales, cpu_scales)
    unpacked = ops.unpack_kcache(codes, scales, fmt, global_scale)
    assert unpacked.is_cuda
    assert_same_floats(unpacked, ops.unpack_kcache(cpu_codes, cpu_scales, fmt, global_scale))
    assert_same_floats(unpacked, reference.unpack_kcache(cpu_codes, cpu_scales, fmt, global_scale))


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_gpu_unaligned(fmt, dtype):
    # Views that start off a 16-byte boundary take the scalar load / store path.
    keys = random_keys(65, 64, dtype, seed=4).cuda()
    flat = torch.empty(keys.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = keys.reshape(-1)
    shifted = flat[1:].view(65, 64)
    codes, scales = ops.pack_kcache(shifted, fmt, 0.01)
    cpu_codes, cpu_scales = ops.pack_kcache(keys.cpu(), fmt, 0.01)
    assert torch.equal(codes.cpu(), cpu_codes)
    assert_scales_equal(scales, cpu_scales)
    flat_codes = torch.empty(codes.numel() + 1, dtype=torch.uint8, device="cuda")
    flat_codes[1:] = codes.reshape(-1)
    unpacked = ops.unpack_kcache(flat_codes[1:].view(codes.shape), scales, fmt, 0.01)
    assert_same_floats(unpacked, ops.unpack_kcache(cpu_codes, cpu_scales, fmt, 0.01))


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_unpack_every_scale_gpu(fmt):
    if fmt == "int4":
        scales = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)[:, None]
    else:
        group = reference.KCACHE_GROUP[fmt]
        scales = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, 32 // group)
    codes = every_nibble_codes(scales.shape[0])
    for global_scale in (1.0, 1.0 / 3.0):
        assert_same_floats(ops.unpack_kcache(codes.cuda(), scales.cuda(), fmt, global_scale),
                           ops.unpack_kcache(codes, scales, fmt, global_scale))


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,dim", [(1, 64), (3, 128), (8, 32)])
def test_append_gpu_matches_cpu(fmt, dtype, heads, dim):
    batch, num_blocks = 5, 7
    cpu_codes, cpu_scales = make_cache(batch, heads, num_blocks, dim, fmt, seed=heads)
    codes, scales = cpu_codes.cuda(), cpu_scales.cuda()
    keys = random_keys(batch * heads, dim, dtype, seed=dim).reshape(batch, heads, dim)
    keys[1, 0, 3] = float("nan")
    slots = torch.tensor([0, 6, -1, 3, 3], dtype=torch.int32)
    ops.append_kcache(cpu_codes, cpu_scales, keys, slots, fmt, 0.003)
    ops.append_kcache(codes, scales, keys.cuda(), slots.cuda(), fmt, 0.003)
    assert torch.equal(codes.cpu(), cpu_codes)
    assert_scales_equal(scales, cpu_scales)
    # A slot past the cache cannot be checked without a sync on CUDA: it is skipped.
    before = codes.clone()
    ops.append_kcache(codes, scales, keys.cuda(), torch.full((batch,), num_blocks, dtype=torch.int32, device="cuda"),
                      fmt, 0.003)
    assert torch.equal(codes, before)


@gpu
def test_append_gpu_graph_capture():
    codes, scales = make_cache(2, 2, 4, 64, "nvfp4", device="cuda")
    keys = torch.randn(2, 2, 64, device="cuda")
    slots = torch.tensor([1, 2], dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.append_kcache(codes, scales, keys, slots, "nvfp4", 0.01)
    slots.copy_(torch.tensor([3, 0], dtype=torch.int32))
    keys.copy_(torch.randn(2, 2, 64))
    graph.replay()
    expected_codes, expected_scales = ops.pack_kcache(keys.cpu(), "nvfp4", 0.01)
    assert torch.equal(codes[0, :, 3].cpu(), expected_codes[0])
    assert torch.equal(codes[1, :, 0].cpu(), expected_codes[1])
    assert torch.equal(scales[1, :, 0].cpu(), expected_scales[1])


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_gpu(fmt):
    keys = random_keys(6, 64, torch.float16, seed=2).reshape(2, 3, 64).cuda()
    torch.library.opcheck(torch.ops.spot.pack_kcache.default, (keys, fmt, 0.05))
    codes, scales = ops.pack_kcache(keys, fmt, 0.05)
    torch.library.opcheck(torch.ops.spot.unpack_kcache.default, (codes, scales, fmt, 0.05))
    cache_codes, cache_scales = make_cache(2, 3, 4, 64, fmt, device="cuda")
    slots = torch.tensor([1, -1], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.spot.append_kcache.default, (cache_codes, cache_scales, keys, slots, fmt, 0.05))


@gpu
def test_validation_gpu_device_mismatch():
    codes, scales = ops.pack_kcache(torch.randn(4, 64, device="cuda"), "int4")
    with pytest.raises(ValueError, match="argument 'scales'"):
        ops.unpack_kcache(codes, scales.cpu(), "int4")
    cache_codes, cache_scales = make_cache(2, 3, 4, 64, "int4", device="cuda")
    keys = torch.randn(2, 3, 64, device="cuda")
    with pytest.raises(ValueError, match="argument 'slots'"):
        ops.append_kcache(cache_codes, cache_scales, keys, torch.zeros(2, dtype=torch.int32), "int4")
    with pytest.raises(ValueError, match="argument 'keys'"):
        ops.append_kcache(cache_codes, cache_scales, keys.cpu(), torch.zeros(2, dtype=torch.int32, device="cuda"),
                          "int4")


@gpu
@pytest.mark.parametrize("index", range(len(_all_bad_calls("cpu"))))
def test_validation_gpu(index):
    argument, call = _all_bad_calls("cuda")[index]
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        call()
