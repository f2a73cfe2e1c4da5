"""Decode attention over QINS KV pages (Triton) against PyTorch SDPA (flash) over a bf16 cache.

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/kv_attention.py [--quick] [--json PATH]

Shape: Llama-3-8B (32 query heads, 8 KV heads, head dim 128), one query token per row, batch
1 and 8, contexts 4k..128k, 4- and 8-bit pages with the cache's defaults (kv/config.py:
4 bits = keys with zero points per 128 tokens, values curvature 0.5; 8 bits = keys with a
fixed offset per 64 tokens, uniform values), page_kb 32, sink 1, the last 128+ tokens in the
float segment (the default residual window). Pages are written by the quantize-on-append
kernel from random bf16 K/V and laid out through a shuffled block table.

Correctness first (per bits and batch, at the first context): (1) the append kernel's codes,
scales and zero points against the torch quantizer (kv/codec.py) over the same bf16 K/V: share
of equal words / values; (2) the attention kernel against the reference (pages decoded to
float32 by torch, then fp32 attention): max |out - ref| / max |ref| (bound BOUND).
Timing: CUDA-graph replays of R back-to-back calls, each call reading the next of several
copies of the cache so that it comes from HBM, not L2; median over replays / R. Baselines in
the same process: SDPA with the flash backend and enable_gqa=True, and the same with the 4
query heads of a KV head folded into 4 query rows (one K/V read, no GQA flag); the speedup is
against the faster of the two. Launch variants are timed and the fastest reported (all in the
JSON): the default (on CUDA the CUDA kernel, kernels/cuda_kv.py, where it builds), the Triton
kernel (`cuda=False`), the CUDA kernel at 2 and 8 programs per SM, and with --triton-variants the
Triton kernel's own launches (first kernel; inline-PTX decode on / off; stages; tile; `v_closed`:
value levels computed, not looked up); `qins_4bit_vcurv0` (uniform values, no
table lookup) shows what the default value curvature costs. Bytes: what each call must read (codes + scales + zero points
+ float segment; bf16 K and V for SDPA), GB/s against a device copy measured in the run.

Every variant runs in try/except: a failure is recorded in the JSON and the table, the others
still run. Writes $OUT/gpu_kv_attention.json (OUT defaults to ./out; or --json) and prints a
table last. Needs torch + triton + this repo's src (no transformers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F

from qins.kernels.triton_kv import kv_append, kv_decode_attention, padded_mids
from qins.kv.codec import (Codec, affine_levels, dequantize_keys_mixed, key_offset, quantize_keys,
                           quantize_keys_mixed, quantize_values)
from qins.kv.config import KVConfig
from qins.kv.layout import RowLayout, pack_rows, unpack_rows
from qins.kv.plan import MENU, allocate_widths
from qins.kv.rope import Rope
from qins.kv.vrot import turn, value_rotation
from qins.kv.store import page_tokens

HQ, HKV, D = 32, 8, 128
SINK, RESIDUAL, PAGE_KB = 1, 128, 32
BOUND = 2e-2          # fp16 operands on the tensor cores (2^-11 per product) and bf16 output (2^-9): measured far below
L2_ROTATE = 256 << 20  # bytes of cache copies per graph replay, > 4x the H200's 50 MB L2
DEV = "cuda"
CUDA_WHY: str | None = "not checked"   # why the CUDA kernel cannot run (None: it runs), set in main
SMS = 132


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def codecs(bits: int, v_curvature: float | None = None):
    cfg = KVConfig(k_bits=bits, v_curvature=v_curvature)
    G = cfg.group_for(bits)
    kc = Codec.build("qins", bits, cfg.curvature_for(bits, "k"), cfg.zero_for(bits, "k"))
    vc = Codec.build("qins", bits, cfg.curvature_for(bits, "v"), cfg.zero_for(bits, "v"))
    return G, kc, vc


class Paged:
    """One sequence batch's pages (pool planes, shuffled block table) + float segment."""

    def __init__(self, K, V, bits, v_curvature=None, rope=None, vrot=None, widths=None):
        B, H, T, _ = K.shape
        self.bits = bits
        self.G, kcod, vcod = codecs(bits, v_curvature)
        on = lambda c: replace(c, lut=c.lut.to(DEV), mids=c.mids.to(DEV))
        self.kcod, self.vcod = on(kcod), on(vcod)
        G = self.G
        self.P = P = page_tokens(PAGE_KB, H, D, bits, bits, G, kcod.zero_point, vcod.zero_point)
        self.Q = Q = (T - RESIDUAL) // G * G                       # tokens in pages
        cols = -(-Q // P)
        n_pages = B * cols
        i32, f16 = dict(dtype=torch.int32, device=DEV), dict(dtype=torch.float16, device=DEV)
        Wk, Wv = D * bits // 32, D * bits // 32
        self.planes = (torch.zeros(n_pages, H, P, Wk, **i32), torch.zeros(n_pages, H, P // G, D, **f16),
                       torch.zeros(n_pages, H, P // G, D, **f16) if kcod.zero_point else None,
                       torch.zeros(n_pages, H, P, Wv, **i32), torch.zeros(n_pages, H, P, **f16), None)
        perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(0))
        self.table = perm.view(B, cols).to(torch.int32).to(DEV)
        # pre-RoPE pages (kv/rope.py): keys turned back by their position's angle before the append
        self.rope = rope
        Kin = K if rope is None else torch.cat([rope.rotate(K[:, :, :Q], 0, inverse=True).to(K.dtype), K[:, :, Q:]], 2)
        self.k_in, K = Kin, Kin
        # rotated values (kv/vrot.py): pages and float segment hold V R, the output is turned back
        self.vrot = vrot
        self.v_in = V = V if vrot is None else turn(V, vrot).to(V.dtype)
        self.k_offset = None if kcod.zero_point else key_offset(_stats_view(K[:, :, :Q]))
        mids = (padded_mids(self.kcod.mids, bits), padded_mids(self.vcod.mids, bits))
        kv_append(K[:, :, :Q], V[:, :, :Q], self.k_offset, self.table, 0, self.planes, *mids, bits, bits, G,
                  self.kcod.signed_scale, self.vcod.signed_scale, SINK)
        # a key plan (kv/plan.py): key rows rewritten with per-channel widths by the torch quantizer
        self.widths, self.k_fields = widths, None
        if widths is not None:
            self._write_plan_keys(K[:, :, :Q], widths)
        self.fk = torch.cat([K[:, :, :SINK], K[:, :, Q:]], 2).contiguous()
        self.fv = torch.cat([V[:, :, :SINK], V[:, :, Q:]], 2).contiguous()
        self.k_lut, self.v_lut = self.kcod.lut, self.vcod.lut
        self.k_aff, self.v_aff = affine_levels(self.kcod), affine_levels(self.vcod)

    def _write_plan_keys(self, K, widths):
        """Keys (B, H, Q, D) quantized with channel widths (H, D) as a planned QINSLayer seals them
        (sink statistics as the append kernel's), written into the pool through the block table."""
        G, P, Q = self.G, self.P, K.shape[2]
        layout = RowLayout.mixed(widths).to(DEV)
        kc, ks, kz = quantize_keys_mixed(_stats_view(K), widths.to(DEV), G)
        words = layout.pack(kc)
        B, H, _, W = words.shape
        cols = self.table.shape[1]
        ids = self.table.long().flatten()

        def put(plane, x, per):                                       # x (B, H, Q / per, ...) into pages
            n = cols * (P // per)
            x = torch.cat([x, x.new_zeros(B, H, n - x.shape[2], *x.shape[3:])], 2)
            x = x.view(B, H, cols, P // per, *x.shape[3:]).transpose(1, 2).reshape(B * cols, H, P // per,
                                                                                  *x.shape[3:])
            return plane.index_copy(0, ids, x.to(plane.dtype))
        kcp = torch.zeros(self.planes[0].shape[0], H, P, W, dtype=torch.int32, device=DEV)
        self.planes = (put(kcp, words, 1), put(self.planes[1], ks, G), put(self.planes[2], kz, G),
                       *self.planes[3:])
        self.k_layout = layout
        self.k_fields = layout.kernel_fields(DEV)

    def nbytes(self) -> int:
        """Bytes a call reads: the pages' codes, scales, zero points of Q tokens, the table, the float segment."""
        B = self.table.shape[0]
        H, G, Q = HKV, self.G, self.Q
        codes = 2 * B * H * Q * D * self.bits // 8
        scales = B * H * (Q // G) * D * 2 * (1 + (self.planes[2] is not None)) + B * H * Q * 2
        return codes + scales + self.table.numel() * 4 + 2 * self.fk.numel() * self.fk.element_size()

    def copy(self) -> "Paged":
        c = object.__new__(Paged)
        c.__dict__.update(self.__dict__)
        c.planes = tuple(None if p is None else p.clone() for p in self.planes)
        c.fk, c.fv = self.fk.clone(), self.fv.clone()
        return c

    def attend(self, q, **launch):
        out = kv_decode_attention(q, self.planes, self.table, self.Q, SINK, self.k_offset, self.k_lut, self.v_lut,
                                  self.k_aff, self.v_aff, self.bits, self.bits, self.G, self.fk, self.fv,
                                  D ** -0.5, rope=None if self.rope is None else self.rope.freqs(DEV),
                                  k_fields=self.k_fields, **launch)
        return out if self.vrot is None else turn(out, self.vrot, inverse=True).to(out.dtype)

    def decode_reference(self):
        """(B, H, T, D) float32 K, V: pages decoded by torch (through the table), sink and tail from the float segment."""
        kc, ks, kz, vc, vs, _ = self.planes
        B, cols = self.table.shape
        ids = self.table.long().flatten()
        G, Q = self.G, self.Q

        def rows(x):                                                 # (B, H, cols * S, ...)
            y = x.index_select(0, ids).view(B, cols, *x.shape[1:]).transpose(1, 2)
            return y.reshape(B, x.shape[1], cols * x.shape[2], *x.shape[3:])
        vcodes = unpack_rows(rows(vc)[:, :, :Q].contiguous(), self.bits, D).long()
        if self.widths is not None:                                   # a key plan's rows
            k = dequantize_keys_mixed(self.k_layout.unpack(rows(kc)[:, :, :Q].contiguous()).contiguous(),
                                      rows(ks)[:, :, :Q // G].contiguous(), rows(kz)[:, :, :Q // G].contiguous(),
                                      self.widths.to(DEV), G,
                                      torch.float32)
        else:
            kcodes = unpack_rows(rows(kc)[:, :, :Q].contiguous(), self.bits, D).long()
            k = self.k_lut[kcodes].view(B, HKV, Q // G, G, D) * rows(ks)[:, :, :Q // G, None].float()
            if kz is not None:
                k = k + rows(kz)[:, :, :Q // G, None].float()
            k = k.view(B, HKV, Q, D)
        if self.k_offset is not None:
            k = k + self.k_offset.float()
        if self.rope is not None:
            k = self.rope.rotate(k, 0)
        v = self.v_lut[vcodes] * rows(vs)[:, :, :Q, None].float()
        k[:, :, :SINK], v[:, :, :SINK] = self.fk[:, :, :SINK].float(), self.fv[:, :, :SINK].float()
        v = torch.cat([v, self.fv[:, :, SINK:].float()], 2)
        return torch.cat([k, self.fk[:, :, SINK:].float()], 2), v if self.vrot is None else turn(v, self.vrot, inverse=True)


def _stats_view(k):
    k = k.clone()
    k[:, :, :SINK] = k[:, :, SINK:SINK + 1]
    return k


def append_agreement(K, V, pg: Paged) -> dict:
    """Share of the append kernel's words / scales / zero points equal to the torch quantizer's."""
    B = K.shape[0]
    Q, G = pg.Q, pg.G
    k = _stats_view(pg.k_in[:, :, :Q])
    if pg.k_offset is not None:
        k = k - pg.k_offset.to(k.dtype)
    kq, ks, kz = quantize_keys(k, pg.kcod, G)
    vq, vs, _ = quantize_values(pg.v_in[:, :, :Q], pg.vcod)
    kw, vw = pack_rows(kq, pg.bits), pack_rows(vq, pg.bits)
    kc, pks, pkz, vc, pvs, _ = pg.planes
    ids = pg.table.long().flatten()
    cols = pg.table.shape[1]

    def rows(x, n):
        y = x.index_select(0, ids).view(B, cols, *x.shape[1:]).transpose(1, 2)
        return y.reshape(B, x.shape[1], cols * x.shape[2], *x.shape[3:])[:, :, :n]
    eq = lambda a, b: float((a == b).float().mean())
    if pg.widths is not None:                                         # keys written by the torch quantizer
        return dict(v_words=eq(rows(vc, Q), vw), v_scale=eq(rows(pvs, Q), vs))
    out = dict(k_words=eq(rows(kc, Q), kw), v_words=eq(rows(vc, Q), vw), k_scale=eq(rows(pks, Q // G), ks),
               v_scale=eq(rows(pvs, Q), vs))
    if kz is not None:
        out["k_zero"] = eq(rows(pkz, Q // G), kz)
    return out


def plan_widths(bits: int) -> torch.Tensor:
    """(HKV, D) key-plan widths at `bits` on average, fitting a uniform row: the default model's
    calibrated histogram is spread over 0..8 (a few channels at 8, many at 2-3), which a random
    skewed cost reproduces (kv/plan.py allocate_widths)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.tensor(MENU, dtype=torch.float64)
    cost = (torch.rand(HKV, D, 1, generator=g, dtype=torch.float64) ** 4 * 100) * 4.0 ** -w.view(1, 1, -1)
    return torch.tensor([allocate_widths(cost[h], bits) for h in range(HKV)])


def reference_out(q, K, V):
    """fp32 attention of q (B, HQ, D) over K, V (B, HKV, T, D) float32: the 4 query heads of a KV head as 4 rows."""
    B = q.shape[0]
    qf = q.float().view(B, HKV, HQ // HKV, D)
    return F.scaled_dot_product_attention(qf, K, V, scale=D ** -0.5).reshape(B, HQ, D)


def sdpa_fns(q, K, V):
    """(name, fn) of the SDPA baselines over bf16 K, V (B, HKV, T, D), flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B = q.shape[0]
    q4 = q.view(B, HQ, 1, D)
    qf = q.view(B, HKV, HQ // HKV, D)

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, K, V, enable_gqa=True)

    def folded():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qf, K, V)
    return [("sdpa_flash_gqa", gqa), ("sdpa_flash_folded", folded)]


def time_graph(fns, reps_per_graph: int, replays: int) -> float:
    """Median ms per call: a CUDA graph of reps_per_graph calls cycling through fns (one per cache copy)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps_per_graph):
            fns[i % len(fns)]()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps_per_graph)
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write bytes), median of 10."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=DEV)
    y = torch.empty_like(x)
    ts = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return 2 * x.numel() * 4 / (statistics.median(ts[2:]) * 1e-3) / 1e9


def run_case(B, T, bits_list, rows, args, checked):
    g = torch.Generator(device=DEV).manual_seed(T + B)
    # keys with per-channel offsets and a few outlier channels (as after RoPE), values plain
    K = (torch.randn(B, HKV, T, D, device=DEV, generator=g) + torch.randn(1, HKV, 1, D, device=DEV, generator=g) * 2)
    K[..., :4] *= 8
    K = K.to(torch.bfloat16)
    V = torch.randn(B, HKV, T, D, device=DEV, generator=g).to(torch.bfloat16)
    q = torch.randn(B, HQ, D, device=DEV, generator=g).to(torch.bfloat16)
    bf16_bytes = 2 * K.numel() * 2
    n_copies = max(1, -(-L2_ROTATE // bf16_bytes))
    reps = max(n_copies, 8 if args.quick else 20)
    base = dict(batch=B, context=T)
    # baselines
    best = None
    ref16 = reference_out(q, K.float(), V.float())                    # fp32 attention over the bf16 cache
    for name, _ in sdpa_fns(q, K, V):
        row = dict(base, variant=name, bits=16, bytes=bf16_bytes)
        try:
            copies = [(K, V)] + [(K.clone(), V.clone()) for _ in range(n_copies - 1)]
            fns = [dict(sdpa_fns(q, k, v))[name] for k, v in copies]
            err = float((fns[0]().float().reshape(B, HQ, D) - ref16).abs().max() / ref16.abs().max())
            ms = time_graph(fns, reps, args.replays)
            row.update(ms=ms, gbps=bf16_bytes / (ms * 1e-3) / 1e9, err_vs_fp32=err)
            best = ms if best is None else min(best, ms)
            del copies, fns
        except Exception as e:                                        # noqa: BLE001  (recorded, the rest still runs)
            row.update(error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
        rows.append(row)
        log(row)
        torch.cuda.empty_cache()
    variants = [(f"qins_{b}bit", b, None, None, None, None) for b in bits_list]
    if 4 in bits_list and not args.quick:                             # what the value table lookup costs
        variants.append(("qins_4bit_vcurv0", 4, 0.0, None, None, None))
    rope = Rope(1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))   # Llama 3's theta
    if args.prerope:                                                  # pre-RoPE pages: Triton, keys turned in-kernel
        variants += [(f"qins_{b}bit_prerope", b, None, rope, None, None) for b in bits_list]
    if args.vrot:                                                     # rotated values: turned around the kernel
        variants += [(f"qins_{b}bit_vrot", b, None, None, value_rotation(D, DEV), None) for b in bits_list]
    if args.plan:                  # a key plan (Triton, per-channel fields); alone and with pre-RoPE keys + vrot
        for b in (x for x in bits_list if x < 8):
            w = plan_widths(b)
            variants += [(f"qins_{b}bit_plan", b, None, None, None, w),
                         (f"qins_{b}bit_pre_vrot_plan", b, None, rope, value_rotation(D, DEV), w)]
    for name, bits, vcurv, rope, vrot, widths in variants:
        row = dict(base, variant=name, bits=bits)
        try:
            pg = Paged(K, V, bits, vcurv, rope, vrot, widths)
            row.update(bytes=pg.nbytes(), page_tokens=pg.P, group=pg.G, paged_tokens=pg.Q, float_tokens=pg.fk.shape[2])
            if (name, B) not in checked:                              # correctness at the first context
                checked.add((name, B))
                row["append_equal"] = append_agreement(K, V, pg)
                Kr, Vr = pg.decode_reference()
                ref = reference_out(q, Kr, Vr)
                got = pg.attend(q).float()
                row["err_vs_reference"] = float((got - ref).abs().max() / ref.abs().max())
                row["err_vs_bf16_cache"] = float((got - ref16).abs().max() / ref16.abs().max())
                tri = pg.attend(q, cuda=False).float()
                row["triton_err_vs_reference"] = float((tri - ref).abs().max() / ref.abs().max())
                row["default_vs_triton"] = float((got - tri).abs().max() / ref.abs().max())
                del Kr, Vr
                if not row["err_vs_reference"] <= BOUND:
                    raise AssertionError(f"kernel error {row['err_vs_reference']:.3g} > {BOUND}")
            n = max(1, -(-L2_ROTATE // pg.nbytes()))
            copies = [pg] + [pg.copy() for _ in range(n - 1)]
            launches = [dict(), dict(cuda=False)]
            if CUDA_WHY is None:                                          # the CUDA kernel's split counts
                launches += [dict(cuda=True, splits=max(1, -(-per_sm * SMS // (B * HKV)))) for per_sm in (2, 8)]
            if args.triton_variants:
                launches += [dict(lc, cuda=False) for lc in (
                    dict(fold=False), dict(fold=False, block_t=64, num_warps=4), dict(asm=False), dict(asm=True),
                    dict(num_stages=2), dict(block_t=32))]
                if pg.v_aff is None and not pg.vcod.zero_point:
                    launches.append(dict(v_closed=pg.vcod.curvature))     # qins levels by a fast division
            timings = {}
            for lc in launches:
                key = ",".join(f"{k}={v}" for k, v in lc.items()) or "default"
                try:
                    timings[key] = time_graph([lambda c=c, lc=lc: c.attend(q, **lc) for c in copies],
                                              max(n, 8 if args.quick else 20), args.replays)
                except Exception as e:                                # noqa: BLE001
                    timings[key] = f"{type(e).__name__}: {e}"[:300]
            ok = {k: v for k, v in timings.items() if isinstance(v, float)}
            row["launch_ms"] = timings
            if ok:
                cfg, ms = min(ok.items(), key=lambda kv: kv[1])
                row.update(ms=ms, launch=cfg, gbps=row["bytes"] / (ms * 1e-3) / 1e9)
                if best:
                    row["speedup_vs_sdpa"] = best / ms
                    for key, name in (("default", "default"), ("cuda=False", "triton")):
                        if isinstance(timings.get(key), float):
                            row[f"{name}_ms"] = timings[key]
                            row[f"{name}_vs_sdpa"] = best / timings[key]
            del copies, pg
        except Exception as e:                                        # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
        rows.append(row)
        log({k: v for k, v in row.items() if k != "trace"})
        torch.cuda.empty_cache()
    del K, V


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="contexts 4k and 32k, default launch only, fewer replays")
    ap.add_argument("--json", default=None, help="output path (default $OUT/gpu_kv_attention.json)")
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--replays", type=int, default=None)
    ap.add_argument("--triton-variants", action="store_true", help="also time the Triton kernel's launch variants")
    ap.add_argument("--prerope", action="store_true", help="also pre-RoPE pages (KVConfig.k_prerope): the Triton "
                                                            "first kernel turning keys by their position")
    ap.add_argument("--vrot", action="store_true", help="also rotated values (KVConfig.v_rotate): the float segment "
                                                         "and the output turned around the kernel, in the timing")
    ap.add_argument("--plan", action="store_true", help="also key-plan pages (per-channel widths, the Triton first "
                                                         "kernel), alone and with pre-RoPE keys and rotated values")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    args.replays = args.replays or (10 if args.quick else 30)
    contexts = args.contexts or ([4096, 32768] if args.quick else [4096, 8192, 16384, 32768, 131072])
    out_path = args.json or os.path.join(os.environ.get("OUT", "out"), "gpu_kv_attention.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    import triton
    meta = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                torch=torch.__version__, triton=triton.__version__, command=" ".join([sys.executable] + sys.argv),
                shape=dict(query_heads=HQ, kv_heads=HKV, head_dim=D), sink=SINK, residual=RESIDUAL, page_kb=PAGE_KB,
                bound=BOUND)
    rows: list[dict] = []
    global CUDA_WHY, SMS
    from qins.kernels.cuda_kv import why_not
    CUDA_WHY = why_not(DEV)
    SMS = torch.cuda.get_device_properties(DEV).multi_processor_count
    meta["cuda_kernel"] = CUDA_WHY or "built"
    log("CUDA kernel:", meta["cuda_kernel"])
    try:
        meta["copy_gbps"] = copy_bandwidth()
    except Exception as e:                                            # noqa: BLE001
        meta["copy_gbps_error"] = str(e)
    checked: set = set()
    t0 = time.time()
    for T in contexts:
        for B in args.batches:
            try:
                run_case(B, T, args.bits, rows, args, checked)
            except Exception as e:                                    # noqa: BLE001  (e.g. out of memory for the inputs)
                rows.append(dict(batch=B, context=T, variant="inputs", error=f"{type(e).__name__}: {e}"[:500]))
            torch.cuda.empty_cache()
            with open(out_path, "w") as f:                            # after every case: a crash keeps what ran
                json.dump(dict(meta, rows=rows, seconds=time.time() - t0), f, indent=1)
    print(f"# decode attention, {meta['card']}, {meta['date'][:16]}, torch {meta['torch']}, triton {meta['triton']}")
    print(f"# Llama-3-8B shape ({HQ} q heads, {HKV} KV heads, dim {D}); copy bandwidth "
          f"{meta.get('copy_gbps', float('nan')):.0f} GB/s; JSON: {out_path}")
    print(f"# CUDA kernel: {meta['cuda_kernel']}")
    print(f"{'B':>2} {'ctx':>7} {'variant':<18} {'ms':>8} {'GB/s':>7} {'x SDPA':>7} {'default x':>9} {'triton x':>8} {'err':>9}  note")
    for r in rows:
        err = r.get("err_vs_reference", r.get("err_vs_fp32"))
        note = r.get("error", "")[:60] or (f"launch {r['launch']}" if "launch" in r else "")
        if "append_equal" in r:
            note += f" append equal {min(r['append_equal'].values()):.4f}"
        print(f"{r['batch']:>2} {r['context']:>7} {r['variant']:<18} {r.get('ms', float('nan')):>8.4f} "
              f"{r.get('gbps', float('nan')):>7.0f} {r.get('speedup_vs_sdpa', float('nan')):>7.2f} "
              f"{r.get('default_vs_sdpa', float('nan')):>9.2f} {r.get('triton_vs_sdpa', float('nan')):>8.2f} "
              f"{'' if err is None else f'{err:.2e}':>9}  {note}")


if __name__ == "__main__":
    main()
