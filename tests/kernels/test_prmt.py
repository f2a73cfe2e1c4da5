"""The register-table lookup (kernels/prmt.py): the very instruction list the GPU runs,
emulated on the CPU, must decode every code of random words to the table's bf16 values."""
import random

import torch

from qins.kernels import prmt


def _as_int32(v):
    return v - 2**32 if v >= 2**31 else v


def test_program_decodes_every_code_bit_exact():
    rng = random.Random(0)
    for trial in range(20):
        table = torch.sort(torch.randn(1, 16, generator=torch.Generator().manual_seed(trial))).values
        regs = [int(v) & 0xFFFFFFFF for v in prmt.table_registers(table).reshape(-1)]
        want = table.to(torch.bfloat16).float()[0]
        words = [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98] + [rng.getrandbits(32) for _ in range(200)]
        for w in words:
            got = torch.tensor([_as_int32(o) for o in prmt.emulate(w, regs)], dtype=torch.int32)
            codes = [(w >> (4 * i)) & 15 for i in range(8)]
            assert torch.equal(got.view(torch.float32), want[codes]), hex(w)


def test_registers_round_trip_and_refuse_other_sizes():
    t = torch.randn(1, 16)
    assert torch.equal(prmt.registers_table(prmt.table_registers(t)), t.to(torch.bfloat16).float())
    try:
        prmt.table_registers(torch.randn(1, 256))
    except ValueError as e:
        assert "16-entry" in str(e)
    else:
        raise AssertionError("a 256-entry table was accepted")


def test_ptx_lists_every_instruction():
    text = prmt.ptx()
    assert text.count("prmt.b32") == sum(op == "prmt" for op, *_ in prmt.PROGRAM)
    assert text.count("lop3.b32") == sum(op == "sel" for op, *_ in prmt.PROGRAM)
    assert all(f"${i}," in text for i in range(8))            # every output written


def _halves(regs):
    """Output registers -> fp16 values, element 2k in the low half of register k."""
    h = [(r >> (16 * k)) & 0xFFFF for r in regs for k in range(2)]
    return torch.tensor(h, dtype=torch.int32).to(torch.int16).view(torch.float16)


def _bytes(rng):
    return [[0, 0, 0, 0], [255, 255, 255, 255], [0x10, 0x32, 0x54, 0x76], [0xF8, 0x9A, 0xBC, 0xDE]] + \
        [[rng.getrandbits(8) for _ in range(4)] for _ in range(300)]


def test_kv_affine_programs_give_exact_codes():
    # the PTX text the KV kernel hands to Triton (4 bytes per instance), run instruction by
    # instruction: 4-bit bytes -> their low nibbles (output 0) and high nibbles (output 1), 8-bit
    # bytes -> themselves, as exact fp16 integers
    rng = random.Random(1)
    for b4 in _bytes(rng):
        x = sum(v << (8 * i) for i, v in enumerate(b4))
        out = _halves(prmt.run_ptx(prmt.KV_AFFINE4, {4: x}, 4))
        want = [v & 15 for v in b4] + [v >> 4 for v in b4]
        assert torch.equal(out, torch.tensor(want, dtype=torch.float16)), b4
        out8 = _halves(prmt.run_ptx(prmt.KV_AFFINE8, {2: x}, 2))
        assert torch.equal(out8, torch.tensor(b4, dtype=torch.float16)), b4


def test_kv_table_program_looks_up_every_code_bit_exact():
    rng = random.Random(2)
    for trial in range(10):
        lut = torch.randn(16, generator=torch.Generator().manual_seed(trial))
        regs = [int(v) & 0xFFFFFFFF for v in prmt.table_registers(lut, torch.float16).reshape(-1)]
        inputs = {5 + 4 * k + i: regs[k] for k in range(8) for i in range(4)}   # pack=4: 4 copies each
        want_tab = lut.to(torch.float16)
        for b4 in _bytes(rng)[:80]:
            x = sum(v << (8 * i) for i, v in enumerate(b4))
            out = _halves(prmt.run_ptx(prmt.KV_TABLE4, {4: x, **inputs}, 4))
            codes = [v & 15 for v in b4] + [v >> 4 for v in b4]
            assert torch.equal(out, want_tab[codes]), (trial, b4)
