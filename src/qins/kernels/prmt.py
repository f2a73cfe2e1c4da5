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

import weakref

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


def table_registers(table: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(1, 16) decode table -> (1, 8) int32 registers L0..L3 H0..H3 of its values in `dtype`
    (bf16 for the weight kernels, fp16 for the KV pages)."""
    if table.numel() != 16:
        raise ValueError(f"the register lookup takes a 16-entry table, got {table.numel()}")
    bits = table.reshape(16).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = (bits & 0xFF).reshape(4, 4), (bits >> 8).reshape(4, 4)
    shifts = torch.arange(4, dtype=torch.int32, device=bits.device) * 8
    regs = torch.cat([(lo << shifts).sum(1), (hi << shifts).sum(1)])      # bytes disjoint: sum == or
    regs = regs.to(torch.int64)
    return torch.where(regs < 2**31, regs, regs - 2**32).to(torch.int32).reshape(1, 8)


_REGISTERS: dict[tuple, tuple] = {}


def cached_registers(table: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`table_registers` of the first 16 entries of `table`, made once per (table, dtype) and
    per change of the table (kernels call it every launch)."""
    return cached_derived(table, ("registers", dtype), lambda t: table_registers(t.reshape(-1)[:16], dtype))


def cached_derived(table: torch.Tensor, tag, build) -> torch.Tensor:
    """build(table), made once per (table, tag) and per change of the table. Keyed by id with a
    weak reference to check it (a WeakKeyDictionary compares tensors with ==, which is
    elementwise)."""
    version = None if table.is_inference() else table._version
    key = (id(table), tag)
    hit = _REGISTERS.get(key)
    if hit is None or hit[0]() is not table or hit[1] != version:
        hit = (weakref.ref(table), version, build(table))
        _REGISTERS[key] = hit
        weakref.finalize(table, _REGISTERS.pop, key, None)
    return hit[2]


def pair_table(table: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(256,) int32 for the CUDA kernels: entry b is the half2 (table[b & 15], table[b >> 4]) of
    the first 16 entries in `dtype` (fp16 or bf16), the low half first, so one lookup by a byte
    of two 4-bit codes gives both values. Cached per table and dtype."""
    def build(t):
        bits = t.reshape(-1)[:16].to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        i = torch.arange(256, device=t.device)
        word = bits[i & 15] | (bits[i >> 4] << 16)
        return torch.where(word < 2**31, word, word - 2**32).to(torch.int32)
    return cached_derived(table, ("pairs", dtype), build)


def registers_table(regs: torch.Tensor) -> torch.Tensor:
    """Inverse of `table_registers`: (1, 8) int32 -> the (1, 16) float32 table (bf16 values)."""
    r = regs.reshape(8).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(4, device=r.device) * 8
    lo = ((r[:4, None] >> shifts) & 0xFF).reshape(16)
    hi = ((r[4:, None] >> shifts) & 0xFF).reshape(16)
    bits = (hi << 8) | lo
    bits = torch.where(bits < 2**15, bits, bits - 2**16).to(torch.int16)
    return bits.view(torch.bfloat16).float().reshape(1, 16)


# ---- KV pages: 4 bytes of codes -> fp16 tensors, for tl.inline_asm_elementwise with pack=4 ----
# Triton hands one instance 4 consecutive uint8 elements (byte e in bits 8e of one register) and
# takes 4 fp16 results per output as two registers (element 2k in the low half of register k).
# 4-bit bytes hold two codes (even channel in the low nibble): output 0 gets the low nibbles,
# output 1 the high ones; 8-bit bytes are codes. Affine codes come out as exact fp16 integers
# (the code ORed into 1024.0's bits, less 1024); table codes as the table's fp16 values, looked
# up in 8 registers (L0..L3 H0..H3 of `table_registers(lut, torch.float16)`), inputs $5 + 4 k.
_NIB = """prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shr.u32 u0, t0, 4;
shr.u32 u1, t1, 4;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, u0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $3, u1, 0x000F000F, 0x64006400, 0xEA;
"""
_SUB = "".join(f"sub.f16x2 ${i}, ${i}, k;\n" for i in range(4))
KV_AFFINE4 = "{\n.reg .b32 t0, t1, u0, u1, k;\nmov.b32 k, 0x64006400;\n" + _NIB + _SUB + "}"
KV_AFFINE4_CONSTRAINTS = "=r,=r,=r,=r,r"
KV_AFFINE8 = """{
.reg .b32 k;
mov.b32 k, 0x64646464;
prmt.b32 $0, $2, k, 0x4140;
prmt.b32 $1, $2, k, 0x4342;
mov.b32 k, 0x64006400;
sub.f16x2 $0, $0, k;
sub.f16x2 $1, $1, k;
}"""
KV_AFFINE8_CONSTRAINTS = "=r,=r,r"


def _kv_lookup(nib: str, out0: int) -> str:
    """PTX: 4 codes as nibbles in the low 16 bits of register `nib` -> their fp16 table values,
    pairs (code 0, 1) in $out0 and (2, 3) in $out0+1."""
    L = [f"${5 + 4 * k}" for k in range(8)]
    return f"""and.b32 s, {nib}, 0x7777;
shl.b32 t, {nib}, 4;
prmt.b32 m, t, {nib}, 0xD9C8;
prmt.b32 a, {L[0]}, {L[1]}, s;
prmt.b32 b, {L[2]}, {L[3]}, s;
lop3.b32 l, a, b, m, 0xD8;
prmt.b32 a, {L[4]}, {L[5]}, s;
prmt.b32 b, {L[6]}, {L[7]}, s;
lop3.b32 h, a, b, m, 0xD8;
prmt.b32 ${out0}, l, h, 0x5140;
prmt.b32 ${out0 + 1}, l, h, 0x7362;
"""


# low nibbles of the 4 bytes -> nibbles 0-3 of n: (x & 0x0F0F0F0F), bytes 1 and 3 moved down 4
KV_TABLE4 = ("{\n.reg .b32 a, b, l, h, s, t, m, n, v;\n"
             "and.b32 v, $4, 0x0F0F0F0F;\nshr.b32 n, v, 4;\nor.b32 n, n, v;\nprmt.b32 n, n, 0, 0x4420;\n"
             + _kv_lookup("n", 0)
             + "shr.b32 v, $4, 4;\nand.b32 v, v, 0x0F0F0F0F;\nshr.b32 n, v, 4;\nor.b32 n, n, v;\n"
             "prmt.b32 n, n, 0, 0x4420;\n" + _kv_lookup("n", 2) + "}")
KV_TABLE4_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * 33)


def run_ptx(text: str, inputs: dict[int, int], outputs: int) -> list[int]:
    """Run one of the KV programs' PTX text on the CPU (the instructions it uses: mov, and, or,
    shl, shr, prmt, lop3, sub.f16x2) with inputs {operand number: 32-bit value}; returns the
    output registers $0 .. $outputs-1. The tests run the very text the kernels hand to Triton."""
    regs: dict[str, int] = {f"${k}": v & _M32 for k, v in inputs.items()}

    def val(x: str) -> int:
        x = x.strip()
        return regs[x] if x in regs else int(x, 0) & _M32

    def f16x2_sub(a: int, b: int) -> int:
        h = lambda v: torch.tensor([[v & 0xFFFF, v >> 16]], dtype=torch.int32).to(torch.int16).view(torch.float16)  # noqa: E731
        d = (h(a) - h(b)).view(torch.int16).to(torch.int32) & 0xFFFF
        return int(d[0, 0]) | (int(d[0, 1]) << 16)
    for line in text.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d, src = args[0], args[1:]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "and.b32":
            r = val(src[0]) & val(src[1])
        elif op == "or.b32":
            r = val(src[0]) | val(src[1])
        elif op == "shl.b32":
            r = (val(src[0]) << val(src[1])) & _M32
        elif op in ("shr.u32", "shr.b32"):
            r = val(src[0]) >> val(src[1])
        elif op == "prmt.b32":
            r = _prmt(val(src[0]), val(src[1]), val(src[2]) & 0xFFFF)
        elif op == "lop3.b32":
            a, b, c, lut = (val(x) for x in src)
            r = 0
            for bit in range(32):
                idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
                r |= ((lut >> idx) & 1) << bit
        elif op == "sub.f16x2":
            r = f16x2_sub(val(src[0]), val(src[1]))
        else:
            raise ValueError(f"run_ptx does not know {op!r}")
        regs[d] = r & _M32
    return [regs[f"${k}"] for k in range(outputs)]
