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
