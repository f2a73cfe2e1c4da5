"""A 16-entry table lookup in registers for 4-bit codes, with the byte-permute instruction.

One 32-bit word holds 8 codes (codec/packing.py). The decode table is 16 bf16 values held as
8 registers: L0..L3 the low bytes of entries 0-3, 4-7, 8-11, 12-15 (entry e in byte e mod 4),
H0..H3 the high bytes. `prmt.b32 d, a, b, sel` picks 4 bytes of the 8 in (a, b) by 4 selector
nibbles, so one prmt looks up 4 codes in half the table:

    s   = w & 0x77777777                 low 3 bits of each code (the prmt byte index)
    m   = prmt(w << 4, w, 0xD9C8)        0xFF in byte i where bit 3 of code i is set (sign mode)
    lo  = m ? prmt(L2, L3, s) : prmt(L0, L1, s)     (lop3) low bytes of codes 0-3
    hi  = m ? prmt(H2, H3, s) : prmt(H0, H1, s)     high bytes
    p   = prmt(lo, hi, 0x5140)           bf16 pair (code 0, code 1); 0x7362: (code 2, code 3)
    f0  = p << 16, f1 = p & 0xFFFF0000   the float32 bits of a bf16 value

and the same on w >> 16 / selector 0xFBEA for codes 4-7: about 3.5 integer instructions per
code and no memory read. `PROGRAM` is the instruction list; `ptx()` prints it for
tl.inline_asm_elementwise and `emulate()` runs it on the CPU, so the tests check the very
program the GPU runs.
"""
from __future__ import annotations

import torch

# (op, dst, a, b, c): registers are names; $0..$7 the outputs (codes 0..7 as float32 bits),
# $8 the word, $9..$16 L0..L3 H0..H3; ints are immediates
PROGRAM = [("and", "s", "$8", 0x77777777, None), ("shr", "sh", "s", 16, None),
           ("shl", "t", "$8", 4, None),
           ("prmt", "m0", "t", "$8", 0xD9C8), ("prmt", "m1", "t", "$8", 0xFBEA)]
for _half, (_sel, _mask) in enumerate((("s", "m0"), ("sh", "m1"))):
    PROGRAM += [("prmt", "a", "$9", "$10", _sel), ("prmt", "b", "$11", "$12", _sel),
                ("sel", "l", "a", "b", _mask),
                ("prmt", "a", "$13", "$14", _sel), ("prmt", "b", "$15", "$16", _sel),
                ("sel", "h", "a", "b", _mask)]
    for _pair, _psel in enumerate((0x5140, 0x7362)):
        _o = 4 * _half + 2 * _pair
        PROGRAM += [("prmt", "p", "l", "h", _psel), ("shl", f"${_o}", "p", 16, None),
                    ("and", f"${_o + 1}", "p", 0xFFFF0000, None)]

_M32 = 0xFFFFFFFF


def ptx() -> str:
    """The program as PTX for tl.inline_asm_elementwise (8 outputs, 9 inputs, all b32)."""
    lines = ["{", ".reg .b32 s, sh, t, m0, m1, a, b, l, h, p;"]
    for op, d, a, b, c in PROGRAM:
        if op == "prmt":
            lines.append(f"prmt.b32 {d}, {a}, {b}, {c if isinstance(c, str) else hex(c)};")
        elif op == "sel":                   # d = c ? b : a, bitwise: lop3 with LUT 0xD8
            lines.append(f"lop3.b32 {d}, {a}, {b}, {c}, 0xD8;")
        else:
            lines.append(f"{op}.b32 {d}, {a}, {b if isinstance(b, str) else hex(b)};")
    lines.append("}")
    return "\n".join(lines)


CONSTRAINTS = ",".join(["=r"] * 8 + ["r"] * 9)


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        n = (sel >> (4 * k)) & 0xF
        v = src[n & 7]
        if n & 8:                                             # sign mode: replicate the msb
            v = 0xFF if v & 0x80 else 0
        out |= v << (8 * k)
    return out


def emulate(word: int, regs: list[int]) -> list[int]:
    """Run PROGRAM on one word with table registers `regs` (L0..L3, H0..H3): 8 float32 bit patterns."""
    r: dict[str, int] = {"$8": word & _M32}
    r.update({f"${9 + i}": v & _M32 for i, v in enumerate(regs)})

    def val(x):
        return x if isinstance(x, int) else r[x]
    for op, d, a, b, c in PROGRAM:
        if op == "prmt":
            r[d] = _prmt(val(a), val(b), val(c) & 0xFFFF)
        elif op == "sel":
            r[d] = (val(b) & val(c)) | (val(a) & ~val(c) & _M32)
        elif op == "and":
            r[d] = val(a) & val(b)
        elif op == "shr":
            r[d] = val(a) >> val(b)
        elif op == "shl":
            r[d] = (val(a) << val(b)) & _M32
    return [r[f"${i}"] for i in range(8)]


def table_registers(table: torch.Tensor) -> torch.Tensor:
    """(1, 16) decode table -> (1, 8) int32 registers L0..L3 H0..H3 of its bf16 values."""
    if table.numel() != 16:
        raise ValueError(f"the register lookup takes a 16-entry table, got {table.numel()}")
    bits = table.reshape(16).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = (bits & 0xFF).reshape(4, 4), (bits >> 8).reshape(4, 4)
    shifts = torch.arange(4, dtype=torch.int32, device=bits.device) * 8
    regs = torch.cat([(lo << shifts).sum(1), (hi << shifts).sum(1)])      # bytes disjoint: sum == or
    regs = regs.to(torch.int64)
    return torch.where(regs < 2**31, regs, regs - 2**32).to(torch.int32).reshape(1, 8)


def registers_table(regs: torch.Tensor) -> torch.Tensor:
    """Inverse of `table_registers`: (1, 8) int32 -> the (1, 16) float32 table (bf16 values)."""
    r = regs.reshape(8).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(4, device=r.device) * 8
    lo = ((r[:4, None] >> shifts) & 0xFF).reshape(16)
    hi = ((r[4:, None] >> shifts) & 0xFF).reshape(16)
    bits = (hi << 8) | lo
    bits = torch.where(bits < 2**15, bits, bits - 2**16).to(torch.int16)
    return bits.view(torch.bfloat16).float().reshape(1, 16)
