"""Peer fake quantizers (qins.eval.peers): the weights they write back are bit for bit what the
peer itself stores and decodes (HQQ: an HQQLinear built from the same float weight; NF4: the
published QLoRA table with one absmax per block), bpw counts what the peer stores, skip patterns
and tied weights behave. A peer's tests skip only when its package is not installed (`make test`
installs both, pinned); an installed peer that fails to import fails them.

The weights are N(0, 0.05^2), drawn from a fixed seed; the SQNR floors below sit ~0.5-1 dB under
the minimum over layers measured with hqq 0.2.8.post1 / bitsandbytes 0.50.2 on CPU.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from qins.eval import peers

def _installed(package: str) -> None:
    """Skip when `package` is not installed at all; an installed one that fails to import is
    not skipped (the adapter's ImportError then fails the test)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (`make test` installs it)")


VOCAB, DIM, HIDDEN = 40, 128, 192
# HQQ packs 4-bit groups in pairs and 2-bit groups in fours: 37 rows of 128 make an odd number
# of groups (at g128 or per row), which HQQ cannot store; its tests use 40 rows.
Q_OUT_ODD, Q_OUT_HQQ = 37, 40


class Stack(nn.Module):
    """embed (40, 128) tied to lm_head; 2 blocks of q_proj (q_out, 128), up_proj (192, 128) +
    bias, down_proj (128, 192) + bias. down_proj's rows (192) are not a multiple of 128."""

    def __init__(self, dtype: torch.dtype = torch.float32, q_out: int = Q_OUT_ODD):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(DIM, q_out, bias=False),
                           "up_proj": nn.Linear(DIM, HIDDEN),
                           "down_proj": nn.Linear(HIDDEN, DIM)})
            for _ in range(2))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.to(dtype)


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - test).pow(2).sum().item())


def _check_fake_quantized(model, before, report, floor_db, expected_bpw):
    linears = _decoder_linears(model)
    for name, mod in linears.items():
        w0 = before[f"{name}.weight"]
        assert mod.weight.dtype == w0.dtype and mod.weight.shape == w0.shape
        assert not torch.equal(mod.weight, w0), name
        assert _sqnr_db(w0, mod.weight) > floor_db, (name, _sqnr_db(w0, mod.weight))
        if mod.bias is not None:                               # biases stay float
            assert torch.equal(mod.bias, before[f"{name}.bias"])
    # lm_head (default skip) and the embedding it is tied to keep their float values
    assert torch.equal(model.embed.weight, before["embed.weight"])
    assert model.lm_head.weight is model.embed.weight
    assert report["quantized_weights"] == sum(m.weight.numel() for m in linears.values())
    assert report["bpw"] == pytest.approx(expected_bpw, rel=1e-12)
    assert report["bpw"] == pytest.approx(8 * report["stored_bytes"] / report["quantized_weights"])


# ---------------------------------------------------------------- HQQ

def _hqq_expected_bytes(shape, bits, g):
    """codes + fp16 scale + fp16 zero, from HQQ's packing rules (axis=1: W as (O*I/g, g))."""
    groups = shape[0] * shape[1] // g
    if bits == 3:                       # 10 codes per int32 word, groups padded to 10
        codes = 4 * g * math.ceil(groups / 10)
    elif bits in (5, 6, 8):             # one code per byte
        codes = groups * g
    else:                               # 8 // bits codes per byte
        codes = groups * g * bits // 8
    return codes + 2 * groups + 2 * groups


# (bits, group_size, dtype, floor dB): measured min SQNR over the 6 layers in the comment
HQQ_CASES = [
    (4, 64, torch.float32, 20.5),       # 21.12
    (4, 64, torch.bfloat16, 20.5),      # 21.13
    (4, 128, torch.float32, 19.5),      # 20.10
    (3, 64, torch.float32, 14.0),       # 14.61
    (2, 64, torch.float32, 6.5),        # 7.20
    (8, 64, torch.float32, 44.5),       # 45.75
    (4, None, torch.float32, 19.0),     # 19.68, one group per output row
]


@pytest.mark.parametrize("bits,group_size,dtype,floor_db", HQQ_CASES)
def test_hqq_changes_weights_within_sqnr_floor_and_counts_bpw(bits, group_size, dtype, floor_db):
    _installed("hqq")
    model = Stack(dtype, q_out=Q_OUT_HQQ)
    before = _snapshot(model)
    report = peers.fake_quantize_hqq(model, bits, group_size, progress=False)
    shapes = [m.weight.shape for m in _decoder_linears(model).values()]
    stored = sum(_hqq_expected_bytes(s, bits, s[1] if group_size is None else group_size) for s in shapes)
    expected_bpw = 8 * stored / sum(s.numel() for s in shapes)
    _check_fake_quantized(model, before, report, floor_db, expected_bpw)
    if bits in (2, 4, 8) and group_size is not None:       # no padding: bits + 32 / g
        assert report["bpw"] == pytest.approx(bits + 32 / group_size)
    assert report["label"] == f"hqq-{bits}b-{'ch' if group_size is None else f'g{group_size}'}"
    assert report["stored_bytes"] == stored


@pytest.mark.parametrize("bits,group_size,dtype", [c[:3] for c in HQQ_CASES])
def test_hqq_weights_are_what_an_hqqlinear_stores(bits, group_size, dtype):
    # The reference is HQQ's own module: HQQLinear quantizes the same float weight with its
    # model defaults (BaseQuantizeConfig, axis=1) and stores codes, scale and zero (fp16, its
    # default compute_dtype). Its stored state decoded as (code - zero) * scale in fp32 must be
    # the adapter's weight bit for bit, and its stored tensors' bytes the adapter's count.
    _installed("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    model = Stack(dtype, q_out=Q_OUT_HQQ)
    before = _snapshot(model)
    report = peers.fake_quantize_hqq(model, bits, group_size, progress=False)
    stored = 0
    for name, mod in _decoder_linears(model).items():
        w0 = before[f"{name}.weight"]
        lin = nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w0)
        h = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1),
                      compute_dtype=torch.float16, device="cpu")
        scale, zero = h.meta["scale"], h.meta["zero"]                   # (groups, 1) fp16 each
        assert scale.dtype == zero.dtype == torch.float16
        codes = h.unpack(dtype=torch.float32)[: scale.shape[0]]         # 3-bit rows are padded to 10s
        assert codes.shape == (scale.shape[0], w0.numel() // scale.shape[0])
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and torch.equal(codes, codes.round())
        ref = ((codes - zero.float()) * scale.float()).reshape(w0.shape).to(dtype)
        assert torch.equal(mod.weight, ref), name
        stored += h.W_q.nbytes + scale.nbytes + zero.nbytes
    assert report["stored_bytes"] == stored


def test_hqq_names_the_layer_it_cannot_pack():
    _installed("hqq")
    # (37, 64) at g64: 37 groups, and HQQ packs 4-bit groups in pairs
    model = nn.ModuleDict({"odd": nn.Linear(64, 37)})
    with pytest.raises(RuntimeError, match="odd"):
        peers.fake_quantize_hqq(model, 4, 64, progress=False)


# ---------------------------------------------------------------- bitsandbytes NF4

def _nf4_expected_bytes(numel, g, double_quant):
    """codes (2 per byte) + fp32 absmax per block; double quant: uint8 absmax per block, fp32
    absmax per 256 blocks and one fp32 offset."""
    blocks = math.ceil(numel / g)
    if double_quant:
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    return math.ceil(numel / 2) + 4 * blocks


# (group_size, double_quant, dtype, floor dB): measured min SQNR over the 6 layers in the comment
NF4_CASES = [
    (64, False, torch.float32, 20.0),    # 20.60
    (64, False, torch.bfloat16, 20.0),   # 20.59
    (64, True, torch.float32, 20.0),     # 20.60: the 8-bit absmax costs < 0.01 dB
    (128, False, torch.float32, 19.5),   # 20.28; bnb's CPU dequantize of the (128, 192) shape gave 13.18
    (32, False, torch.float32, 20.5),    # 20.95
]


@pytest.mark.parametrize("group_size,double_quant,dtype,floor_db", NF4_CASES)
def test_bnb_nf4_changes_weights_within_sqnr_floor_and_counts_bpw(group_size, double_quant, dtype, floor_db):
    _installed("bitsandbytes")
    model = Stack(dtype)
    before = _snapshot(model)
    report = peers.fake_quantize_bnb_nf4(model, group_size, progress=False, double_quant=double_quant)
    numels = [m.weight.numel() for m in _decoder_linears(model).values()]
    stored = sum(_nf4_expected_bytes(n, group_size, double_quant) for n in numels)
    expected_bpw = 8 * stored / sum(numels)
    _check_fake_quantized(model, before, report, floor_db, expected_bpw)
    if not double_quant:                 # every layer here is a whole number of blocks
        assert report["bpw"] == pytest.approx(4 + 32 / group_size)
    assert report["stored_bytes"] == stored
    assert report["bits"] == 4 and report["group_size"] == group_size


# NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' table)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def _nf4_reference(w: torch.Tensor, g: int):
    """NF4 by its definition: blocks of g consecutive weights of the flattened (row-major)
    weight, each divided by its fp32 absmax and rounded to the nearest NF4 level.
    Returns (dequantized (O, I) in w's dtype, level index per weight (numel,), absmax (blocks,))."""
    f = w.float().reshape(-1)
    n, blocks = f.numel(), -(-f.numel() // g)
    padded = torch.zeros(blocks * g)
    padded[:n] = f
    absmax = padded.view(blocks, g).abs().amax(1)
    y = padded.view(blocks, g) / absmax.view(-1, 1)
    idx = (y.unsqueeze(-1) - NF4_LEVELS).abs().argmin(-1).reshape(-1)[:n]
    deq = NF4_LEVELS[idx] * absmax.repeat_interleave(g)[:n]
    return deq.reshape(w.shape).to(w.dtype), idx, absmax


@pytest.mark.parametrize("group_size,dtype,shape", [
    (64, torch.float32, (40, 128)), (64, torch.bfloat16, (40, 128)), (32, torch.float32, (40, 128)),
    (128, torch.float32, (128, 192)),         # blocks straddle rows: bnb's 2-D CPU decode is wrong here
    (64, torch.float32, (37, 100)),           # a 52-weight last block
])
def test_bnb_nf4_weights_are_the_nf4_definition(group_size, dtype, shape):
    # measured: bit-identical to the reference for every case (bitsandbytes 0.50.2, CPU)
    _installed("bitsandbytes")
    model = nn.ModuleDict({"a": nn.Linear(shape[1], shape[0], bias=False)})
    with torch.no_grad():
        model.a.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    model.to(dtype)
    w0 = model.a.weight.detach().clone()
    report = peers.fake_quantize_bnb_nf4(model, group_size, progress=False)
    want, _, _ = _nf4_reference(w0, group_size)
    assert torch.equal(model.a.weight, want)
    assert report["stored_bytes"] == _nf4_expected_bytes(w0.numel(), group_size, False)


def test_bnb_nf4_double_quant_keeps_the_codes_and_rounds_only_the_absmax():
    # Double quant stores each block's absmax as 8 bits (bnb's dynamic code, blocks of 256,
    # after subtracting their mean): the NF4 codes are those of the fp32 absmax, and each
    # block decodes as level * a single factor close to its absmax.
    _installed("bitsandbytes")
    g, shape = 64, (128, 192)
    model = nn.ModuleDict({"a": nn.Linear(shape[1], shape[0], bias=False)})
    with torch.no_grad():
        model.a.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    w0 = model.a.weight.detach().clone()
    peers.fake_quantize_bnb_nf4(model, g, progress=False, double_quant=True)
    _, idx, absmax = _nf4_reference(w0, g)
    got = model.a.weight.detach().reshape(-1, g)                          # 384 blocks of 64
    level = NF4_LEVELS[idx].view(-1, g)
    assert torch.equal(got == 0, level == 0) and torch.equal(got > 0, level > 0)
    nz = level != 0                                                       # every block has its +-1
    ratio = got / torch.where(nz, level, torch.ones_like(level))
    hi, lo = ratio.masked_fill(~nz, -math.inf).amax(1), ratio.masked_fill(~nz, math.inf).amin(1)
    # one factor per block: measured relative spread 1.7e-7 (fp32 rounding of level * factor)
    assert ((hi - lo) / hi).max() < 1e-6
    # the factor is the 8-bit absmax: measured within 0.49% of the fp32 absmax
    rel = (hi - absmax).abs() / absmax
    assert rel.max() < 0.01 and rel.max() > 0                             # rounded, but not by much


# (37, 100): 3700 weights, a 52-weight last block at g64. An odd element count would go through
# bitsandbytes' torch.compile'd fallback (seconds, and a C++ compiler), so none is tested here.
@pytest.mark.parametrize("shape", [(37, 100)])
def test_bnb_nf4_partial_last_block(shape):
    _installed("bitsandbytes")
    model = nn.ModuleDict({"odd": nn.Linear(shape[1], shape[0], bias=False)})
    with torch.no_grad():
        model.odd.weight.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    w0 = model.odd.weight.detach().clone()
    report = peers.fake_quantize_bnb_nf4(model, 64, progress=False)
    assert _sqnr_db(w0, model.odd.weight) > 20.0          # measured 20.96
    assert report["stored_bytes"] == _nf4_expected_bytes(w0.numel(), 64, False)


# ---------------------------------------------------------------- both peers

def _peer(name):
    """(fake quantizer at 4 bits, g64; the q_proj rows it can store)"""
    if name == "hqq":
        _installed("hqq")
        return (lambda model, **kw: peers.fake_quantize_hqq(model, 4, 64, progress=False, **kw)), Q_OUT_HQQ
    _installed("bitsandbytes")
    return (lambda model, **kw: peers.fake_quantize_bnb_nf4(model, 64, progress=False, **kw)), Q_OUT_ODD


@pytest.mark.parametrize("peer", ["hqq", "bnb-nf4"])
@pytest.mark.parametrize("skip,kept", [
    (("layers.0.*",), {"layers.0.q_proj", "layers.0.up_proj", "layers.0.down_proj"}),
    (("layers.1.up_proj",), {"layers.1.up_proj"}),                    # exact name
    (("down_proj",), {"layers.0.down_proj", "layers.1.down_proj"}),   # bare name as a suffix
    ("*.q_proj", {"layers.0.q_proj", "layers.1.q_proj"}),             # one string, not a tuple
])
def test_skip_patterns_keep_float_weights(peer, skip, kept):
    fake, q_out = _peer(peer)
    model = Stack(q_out=q_out)
    before = _snapshot(model)
    # lm_head is in no pattern here: quantized, and untied from the float embedding
    report = fake(model, skip=skip)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, mod in linears.items():
        assert torch.equal(mod.weight, before[f"{name}.weight"]) == (name in kept), name
    assert report["quantized_weights"] == sum(m.weight.numel() for n, m in linears.items() if n not in kept)


@pytest.mark.parametrize("peer", ["hqq", "bnb-nf4"])
def test_quantized_lm_head_is_untied_from_the_float_embedding(peer):
    fake, q_out = _peer(peer)
    model = Stack(q_out=q_out)
    before = _snapshot(model)
    fake(model, skip=())
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.embed.weight, before["embed.weight"])
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert _sqnr_db(before["lm_head.weight"], model.lm_head.weight) > 20.0   # measured 20.76 (nf4), 21.05 (hqq)


@pytest.mark.parametrize("peer", ["hqq", "bnb-nf4"])
def test_weight_shared_by_two_linears_is_quantized_once(peer):
    fake, _ = _peer(peer)
    model = nn.ModuleDict({"a": nn.Linear(128, 64, bias=False), "b": nn.Linear(128, 64, bias=False)})
    model.b.weight = model.a.weight
    report = fake(model)
    assert model.a.weight is model.b.weight
    assert report["quantized_weights"] == 64 * 128
    assert report["bpw"] == pytest.approx(4.5)      # 4-bit codes + 32 bits per 64 weights


# ---------------------------------------------------------------- missing packages

@pytest.mark.parametrize("module,call,pip_name", [
    ("hqq.core.quantize", lambda m: peers.fake_quantize_hqq(m, 4, 64, progress=False), "hqq"),
    ("bitsandbytes.functional", lambda m: peers.fake_quantize_bnb_nf4(m, progress=False), "bitsandbytes"),
])
def test_missing_peer_raises_import_error_naming_the_pip_package(monkeypatch, module, call, pip_name):
    monkeypatch.setitem(sys.modules, module, None)      # makes `import module` fail
    with pytest.raises(ImportError, match=f"pip install .*{pip_name}"):
        call(Stack())
    key = "hqq" if pip_name == "hqq" else "bnb-nf4"
    assert peers.available()[key] is False


def test_available_reports_installed_peers():
    _installed("hqq")
    _installed("bitsandbytes")
    assert peers.available() == {"hqq": True, "bnb-nf4": True}
