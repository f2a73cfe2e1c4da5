// Decode attention over the QINS KV page pool on the tensor cores, codes decoded straight into
// the mma.sync operand registers (no shared-memory round trip). Built by kernels/cuda_kv.py with
// nvcc into a shared library and called through ctypes on the caller's stream (CUDA graphs
// capture it). Two launches: programs per (row, KV head) over splits of the page tokens and over
// parts of the float segment write the unnormalised output and (max, sum) per (row, query head,
// split), base-2 softmax; kv_combine_kernel merges the splits into the query's dtype.
//
// Per warp, a tile of 16 tokens of one KV head:
//   S^T (16 tokens x 8 query heads) = K (16 x D, codes) . (q * r)^T        D/16 mma m16n8k16
//   O^T (D x 8)                    += V^T (D x 16, codes or table) . P      D/16 mma m16n8k16
// Keys are the A operand with tokens as rows: lane (g, t) = (lane / 4, lane % 4) owns rows g and
// g + 8 and reads one contiguous quarter of each row's words; the channel order inside the
// reduction is free, so each lane's codes are taken in the order its words hold them and q * r
// (the B operand) is laid out in the same order. Values are the A operand of the transposed
// product with channels as rows: lane (g, t) reads tokens 2t, 2t + 1, 2t + 8, 2t + 9 and the
// g-th 1/8 of each row; a byte of two 4-bit codes gives channel rows g (low nibble) and g + 8
// (high nibble). P goes from the accumulator layout of S^T to the B operand of the value product
// with one movmatrix.trans per 8 tokens. Affine codes become exact fp16 by OR-ing them into the
// mantissa of 1024.0 (0x6400) and subtracting 1024 (a 4-bit code in bits 4..7 gives 1024 + 16c:
// times 1/16, less 64); the 4-bit value table is a 256-entry half2 table in shared memory indexed
// by the two tokens' codes.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define DEVI __device__ __forceinline__

struct KVArgs {
    const void* q;              // (B, Hq, D), q_dtype
    const uint32_t* kc;         // (N, H, P, WK) codes
    const __half* ks;           // (N, H, P / G, D) key scales
    const __half* kz;           // (N, H, P / G, D) key zero points (kmode 1)
    const void* koff;           // (B, H, 1, D) fixed key offset (kmode 2), koff_dtype
    const uint32_t* vc;         // (N, H, P, WV)
    const __half* vs;           // (N, H, P) value scales
    const __half* vz;           // (N, H, P) value zero points (vzero)
    const uint32_t* vtab;       // (256,) half2 table (vtab): (lut[i & 15], lut[i >> 4])
    const int* table;           // (B, COLS) page ids
    const void* fk;             // (B, H, F, D) float segment, f_dtype
    const void* fv;
    float* o;                   // (B, Hq, S1, D), S1 = FS + NSPLIT
    float* ml;                  // (B, Hq, S1, 2)
    void* out;                  // (B, Hq, D), q_dtype: the merged result
    int B, H, QH, Q, P, COLS, SKIP, F, TPS, NSPLIT, FS, G;
    int D, KB, VB, kmode, use_tab, vzero, q_dtype, f_dtype, koff_dtype;
    int minb;                   // blocks per SM the registers are fitted to: 4, or 1 (no limit)
    int probe;                  // timing probes (0 in use): 1 no values, 2 no float segment, 4 no merge, 8 loads only
    float qk_scale, k_alpha, k_beta, v_alpha, v_beta;
};

DEVI float tof(float x) { return x; }
DEVI float tof(__half x) { return __half2float(x); }
DEVI float tof(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls f(T{}) with T the element type of dtype code dt (0 fp32, 1 fp16, 2 bf16): one branch,
// then loops without per-element dtype branches (which keep loads from being issued together).
template <typename Fn>
DEVI void by_dtype(int dt, Fn&& f) {
    if (dt == 1) f(__half{});
    else if (dt == 2) f(__nv_bfloat16{});
    else f(0.f);
}

DEVI float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

DEVI uint32_t and_or(uint32_t x, uint32_t mask, uint32_t magic) {    // (x & mask) | magic
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));
    return r;
}

DEVI uint32_t h2(__half2 v) { return *reinterpret_cast<uint32_t*>(&v); }
DEVI __half2 as_h2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

DEVI uint32_t fix_lo(uint32_t x) {      // (1024 + c) pairs -> c
    return h2(__hsub2(as_h2(x), __half2half2(__ushort_as_half(0x6400))));
}

DEVI uint32_t fix_hi(uint32_t x) {      // (1024 + 16 c) pairs -> c
    return h2(__hfma2(as_h2(x), __half2half2(__ushort_as_half(0x2C00)), __half2half2(__ushort_as_half(0xD400))));
}

DEVI void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

DEVI uint32_t trans8x8(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

template <int N>
DEVI void ldw(uint32_t (&r)[N], const uint32_t* p) {
    if constexpr (N == 1) {
        r[0] = __ldg(p);
    } else if constexpr (N == 2) {
        uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
        r[0] = v.x; r[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i / 4);
            r[i] = v.x; r[i + 1] = v.y; r[i + 2] = v.z; r[i + 3] = v.w;
        }
    }
}

// Which channel of a lane's key chunk (D/4 channels) feeds B-fragment element j (b0, b1, b2, b3)
// of k-step s; the A fragment takes the codes of the same channels (see the decode below).
template <int KB>
DEVI constexpr int key_elem(int s, int j) {
    if constexpr (KB == 4) {
        constexpr int off[4] = {0, 4, 1, 5};
        return 8 * (s / 2) + 2 * (s % 2) + off[j];
    } else {
        constexpr int off[4] = {0, 2, 1, 3};
        return 4 * s + off[j];
    }
}

template <int D, int KB, int VB>
struct Tile {
    static constexpr int CK = D * KB / 128;     // key words per lane per row (a quarter row)
    static constexpr int CV = D * VB / 256;     // value words per lane per row (an eighth)
    uint32_t k0[CK], k1[CK];                    // key rows g, g + 8
    uint32_t v[4][CV];                          // value rows 2t, 2t + 1, 2t + 8, 2t + 9
    float vs0, vs1, vz0, vz1;                   // value scale / zero point of tokens g, g + 8
    long long grow;                             // key-group row of the scale planes
};

template <int D, int KB, int VB>
DEVI void load_tile(const KVArgs& a, int b, int h, int tok, int end, int g, int t, Tile<D, KB, VB>& x) {
    constexpr int WK = D * KB / 32, WV = D * VB / 32;
    using T = Tile<D, KB, VB>;
    const int page = __ldg(a.table + (size_t)b * a.COLS + tok / a.P);
    const int slot = tok % a.P;
    const size_t base = (size_t)page * a.H + h;
    const size_t row = base * a.P + slot;       // token row of the tile's first token
    ldw<T::CK>(x.k0, a.kc + (row + g) * WK + t * T::CK);
    ldw<T::CK>(x.k1, a.kc + (row + g + 8) * WK + t * T::CK);
    ldw<T::CV>(x.v[0], a.vc + (row + 2 * t) * WV + g * T::CV);
    ldw<T::CV>(x.v[1], a.vc + (row + 2 * t + 1) * WV + g * T::CV);
    ldw<T::CV>(x.v[2], a.vc + (row + 2 * t + 8) * WV + g * T::CV);
    ldw<T::CV>(x.v[3], a.vc + (row + 2 * t + 9) * WV + g * T::CV);
    // tokens past the end (an open group) may hold stale scales: never read (0 x nan is nan)
    const bool ok0 = tok + g < end, ok1 = tok + g + 8 < end;
    x.vs0 = ok0 ? __half2float(a.vs[row + g]) : 0.f;
    x.vs1 = ok1 ? __half2float(a.vs[row + g + 8]) : 0.f;
    if (a.vzero) {
        x.vz0 = ok0 ? __half2float(a.vz[row + g]) : 0.f;
        x.vz1 = ok1 ? __half2float(a.vz[row + g + 8]) : 0.f;
    } else {
        x.vz0 = x.vz1 = 0.f;
    }
    x.grow = (long long)(base * (a.P / a.G) + slot / a.G);
}

struct Merge {                                   // per-warp partial results, merged at the end
    float o[4][8][128];
    float m[4][8], l[4][8];
    float q[8][128];                            // the scaled queries of this (row, KV head)
    float koff[128];                            // the fixed key offset (kmode 2), else zeros
};

// q * qk_scale of the QH query heads of (b, h) into sm.q (rows QH.. zero), the key offset into
// sm.koff: every load issued before any is used.
template <int D>
DEVI void stage_queries(const KVArgs& a, Merge& sm, int b, int h) {
    const size_t q0 = ((size_t)b * a.H * a.QH + h * a.QH) * D;
    by_dtype(a.q_dtype, [&](auto z) {
        using E = decltype(z);
        const E* q = reinterpret_cast<const E*>(a.q) + q0;
#pragma unroll
        for (int k = 0; k < 8 * D / 128; ++k) {
            const int i = threadIdx.x + 128 * k;
            sm.q[i / D][i % D] = i / D < a.QH ? tof(q[i]) * a.qk_scale : 0.f;
        }
    });
    if (a.kmode == 2) {
        by_dtype(a.koff_dtype, [&](auto z) {
            using E = decltype(z);
            const E* o = reinterpret_cast<const E*>(a.koff) + ((size_t)b * a.H + h) * D;
            for (int c = threadIdx.x; c < D; c += blockDim.x) sm.koff[c] = tof(o[c]);
        });
    } else {
        for (int c = threadIdx.x; c < D; c += blockDim.x) sm.koff[c] = 0.f;
    }
    __syncthreads();
}

template <int D>
DEVI void finish(const KVArgs& a, Merge& sm, int b, int h, int split) {
    __syncthreads();
    const int S1 = a.FS + a.NSPLIT;
    for (int i = threadIdx.x; i < a.QH * D; i += blockDim.x) {
        const int hh = i / D, c = i % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < 4; ++w) M = fmaxf(M, sm.m[w][hh]);
        const float Ms = M == -INFINITY ? 0.f : M;
        float o = 0.f, l = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            const float e = sm.m[w][hh] == -INFINITY ? 0.f : ex2(sm.m[w][hh] - Ms);
            o += e * sm.o[w][hh][c];
            l += e * sm.l[w][hh];
        }
        const size_t out = ((size_t)b * a.H * a.QH + h * a.QH + hh) * S1 + split;
        a.o[out * D + c] = o;
        if (c == 0) {
            a.ml[out * 2] = M;
            a.ml[out * 2 + 1] = l;
        }
    }
}

// The float segment (sink copies, staging, residual window), 64 tokens per program: scores with a
// lane per token (16 per warp; the queries in shared memory), the values with a lane per D/32
// channels; element type E.
template <int D, typename E>
DEVI void float_segment(const KVArgs& a, Merge& sm, int b, int h, int part) {
    constexpr int C = D / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (a.probe & 2) return;
    const E* fk = reinterpret_cast<const E*>(a.fk);
    const E* fv = reinterpret_cast<const E*>(a.fv);
    const size_t rows = ((size_t)b * a.H + h) * a.F;
    const int f0 = part * 64 + warp * 16;
    const int f = lane < 16 ? f0 + lane : a.F;     // lanes 16.. hold no token
    float s[8];
#pragma unroll
    for (int hh = 0; hh < 8; ++hh) s[hh] = 0.f;
    if (f < a.F) {
#pragma unroll 4
        for (int c = 0; c < D; c += 8) {
            float k[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) k[j] = tof(fk[(rows + f) * D + c + j]);
#pragma unroll
            for (int hh = 0; hh < 8; ++hh)
#pragma unroll
                for (int j = 0; j < 8; ++j) s[hh] = fmaf(sm.q[hh][c + j], k[j], s[hh]);
        }
    }
    float m[8], l[8], acc[8][C];
#pragma unroll
    for (int hh = 0; hh < 8; ++hh) {
        float x = f < a.F ? s[hh] : -INFINITY;
#pragma unroll
        for (int y = 16; y; y >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, y));
        m[hh] = x;
        s[hh] = f < a.F ? ex2(s[hh] - (x == -INFINITY ? 0.f : x)) : 0.f;     // p
        float z = s[hh];
#pragma unroll
        for (int y = 16; y; y >>= 1) z += __shfl_xor_sync(0xffffffffu, z, y);
        l[hh] = z;
#pragma unroll
        for (int j = 0; j < C; ++j) acc[hh][j] = 0.f;
    }
    // every load unconditional (rows clamped; p = 0 past the end), so all 16 are in flight at once
    float v[16][C];
#pragma unroll
    for (int tt = 0; tt < 16; ++tt) {
        const size_t r = rows + min(f0 + tt, a.F - 1);
#pragma unroll
        for (int j = 0; j < C; ++j) v[tt][j] = tof(fv[r * D + lane * C + j]);
    }
#pragma unroll
    for (int tt = 0; tt < 16; ++tt) {
#pragma unroll
        for (int hh = 0; hh < 8; ++hh) {
            const float p = __shfl_sync(0xffffffffu, s[hh], tt);
#pragma unroll
            for (int j = 0; j < C; ++j) acc[hh][j] = fmaf(p, v[tt][j], acc[hh][j]);
        }
    }
#pragma unroll
    for (int hh = 0; hh < 8; ++hh) {
#pragma unroll
        for (int j = 0; j < C; ++j) sm.o[warp][hh][lane * C + j] = acc[hh][j];
        if (lane == 0) {
            sm.m[warp][hh] = m[hh];
            sm.l[warp][hh] = l[hh];
        }
    }
}

template <int D, int KB, int VB, bool VTAB, int MINB>
__global__ void __launch_bounds__(128, MINB) kv_decode_kernel(const KVArgs a) {
    constexpr int KS = D / 16;                  // k-steps of S^T, m-tiles of O^T
    constexpr int CH = D / 4;                   // channels of a lane's key chunk
    using T = Tile<D, KB, VB>;
    __shared__ Merge sm;
    __shared__ uint32_t tab[VTAB ? 256 : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, y = blockIdx.y;  // y < FS: a part of the float segment; else page split y - FS
    const int b = bh / a.H, h = bh % a.H;
    stage_queries<D>(a, sm, b, h);
    if (y < a.FS) {
        by_dtype(a.f_dtype, [&](auto z) { float_segment<D, decltype(z)>(a, sm, b, h, y); });
        finish<D>(a, sm, b, h, y);
        return;
    }
    const int split = y - a.FS;
    if constexpr (VTAB) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) tab[i] = a.vtab[i];
        __syncthreads();
    }
    const int start = split * a.TPS;
    const int end = min(start + a.TPS, a.Q);
    const int ntiles = (max(end - start, 0) + 15) / 16;   // the last may end inside (an open group)
    const int first = warp * ntiles / 4, last = (warp + 1) * ntiles / 4;

    float acc[KS][4];
#pragma unroll
    for (int i = 0; i < KS; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f, sp0 = 0.f, sp1 = 0.f, sz0 = 0.f, sz1 = 0.f;
    uint32_t qb[KS][2];
    float bias0 = 0.f, bias1 = 0.f;
    long long cur_grow = -1;

    T cur, nxt;
    if (first < last) load_tile<D, KB, VB>(a, b, h, start + first * 16, end, g, t, cur);
    for (int k = first; k < last; ++k) {
        const int tok = start + k * 16;
        if (k + 1 < last) load_tile<D, KB, VB>(a, b, h, tok + 16, end, g, t, nxt);
        if (a.probe & 8) {                      // timing probe: the loads alone
            uint32_t x = 0;
#pragma unroll
            for (int i = 0; i < T::CK; ++i) x ^= cur.k0[i] ^ cur.k1[i];
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int i = 0; i < T::CV; ++i) x ^= cur.v[r][i];
            acc[0][0] += __uint_as_float(x & 0x007FFFFFu) + cur.vs0 + cur.vs1;
            if (k + 1 < last) cur = nxt;
            continue;
        }
        if (cur.grow != cur_grow) {             // a new key group: q * r and the bias
            cur_grow = cur.grow;
            // this lane's CH scales (and zero points) of the group: vector loads, all in flight
            __half rz[2][CH];
            const uint4* r4 = reinterpret_cast<const uint4*>(a.ks + (size_t)cur_grow * D + t * CH);
#pragma unroll
            for (int i = 0; i < CH / 8; ++i) *reinterpret_cast<uint4*>(&rz[0][8 * i]) = __ldg(r4 + i);
            if (a.kmode == 1) {
                const uint4* z4 = reinterpret_cast<const uint4*>(a.kz + (size_t)cur_grow * D + t * CH);
#pragma unroll
                for (int i = 0; i < CH / 8; ++i) *reinterpret_cast<uint4*>(&rz[1][8 * i]) = __ldg(z4 + i);
            } else {
#pragma unroll
                for (int i = 0; i < CH; ++i) rz[1][i] = __float2half(0.f);
            }
            float bp = 0.f;
#pragma unroll
            for (int s = 0; s < KS; ++s) {
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int e = key_elem<KB>(s, j);
                    const float qv = sm.q[g][t * CH + e];
                    const float rv = __half2float(rz[0][e]);
                    v[j] = qv * rv * a.k_alpha;
                    const float mv = a.k_beta * rv + __half2float(rz[1][e]) + sm.koff[t * CH + e];
                    bp = fmaf(qv, mv, bp);
                }
                qb[s][0] = h2(__floats2half2_rn(v[0], v[1]));
                qb[s][1] = h2(__floats2half2_rn(v[2], v[3]));
            }
            bp += __shfl_xor_sync(0xffffffffu, bp, 1);
            bp += __shfl_xor_sync(0xffffffffu, bp, 2);
            bias0 = __shfl_sync(0xffffffffu, bp, (2 * t) * 4);
            bias1 = __shfl_sync(0xffffffffu, bp, (2 * t + 1) * 4);
        }
        // scores S^T: tokens g, g + 8 (rows) x query heads 2t, 2t + 1 (columns); two accumulators
        // so that consecutive mma do not wait on each other
        float c[4] = {0.f, 0.f, 0.f, 0.f}, c2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            uint32_t af[4];
            if constexpr (KB == 4) {
                uint32_t x0 = cur.k0[s / 2], x1 = cur.k1[s / 2];
                if (s % 2) { x0 >>= 8; x1 >>= 8; }
                af[0] = fix_lo(and_or(x0, 0x000F000Fu, 0x64006400u));
                af[1] = fix_lo(and_or(x1, 0x000F000Fu, 0x64006400u));
                af[2] = fix_hi(and_or(x0, 0x00F000F0u, 0x64006400u));
                af[3] = fix_hi(and_or(x1, 0x00F000F0u, 0x64006400u));
            } else {
                const uint32_t x0 = cur.k0[s], x1 = cur.k1[s];
                af[0] = fix_lo(__byte_perm(x0, 0x64646464u, 0x4240));
                af[1] = fix_lo(__byte_perm(x1, 0x64646464u, 0x4240));
                af[2] = fix_lo(__byte_perm(x0, 0x64646464u, 0x4341));
                af[3] = fix_lo(__byte_perm(x1, 0x64646464u, 0x4341));
            }
            if (s % 2) mma16816(c2, af, qb[s]);
            else mma16816(c, af, qb[s]);
        }
        c[0] += c2[0]; c[1] += c2[1]; c[2] += c2[2]; c[3] += c2[3];
        float s0 = c[0] + bias0, s1 = c[1] + bias1, s2 = c[2] + bias0, s3 = c[3] + bias1;
        // sink tokens (read from their fp copies) and tokens past the end
        if (tok + g < a.SKIP || tok + g >= end) s0 = s1 = -INFINITY;
        if (tok + g + 8 < a.SKIP || tok + g + 8 >= end) s2 = s3 = -INFINITY;
        float x0 = fmaxf(s0, s2), x1 = fmaxf(s1, s3);
#pragma unroll
        for (int x = 4; x < 32; x <<= 1) {
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, x));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, x));
        }
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        const float z0 = n0 == -INFINITY ? 0.f : n0, z1 = n1 == -INFINITY ? 0.f : n1;
        const float corr0 = ex2(m0 - z0), corr1 = ex2(m1 - z1);
        const float p0 = ex2(s0 - z0), p1 = ex2(s1 - z1), p2 = ex2(s2 - z0), p3 = ex2(s3 - z1);
        m0 = n0; m1 = n1;
        l0 = fmaf(l0, corr0, p0 + p2);
        l1 = fmaf(l1, corr1, p1 + p3);
        const __half2 h01 = __floats2half2_rn(p0 * cur.vs0, p1 * cur.vs0);   // tokens g: heads 2t, 2t+1
        const __half2 h23 = __floats2half2_rn(p2 * cur.vs1, p3 * cur.vs1);   // tokens g + 8
        sp0 = fmaf(sp0, corr0, __low2float(h01) + __low2float(h23));
        sp1 = fmaf(sp1, corr1, __high2float(h01) + __high2float(h23));
        sz0 = fmaf(sz0, corr0, p0 * cur.vz0 + p2 * cur.vz1);
        sz1 = fmaf(sz1, corr1, p1 * cur.vz0 + p3 * cur.vz1);
        const uint32_t pb[2] = {trans8x8(h2(h01)), trans8x8(h2(h23))};
        if (__any_sync(0xffffffffu, corr0 != 1.f || corr1 != 1.f)) {   // the running max moved
#pragma unroll
            for (int i = 0; i < KS; ++i) {
                acc[i][0] *= corr0; acc[i][1] *= corr1; acc[i][2] *= corr0; acc[i][3] *= corr1;
            }
        }
        // values O^T += V^T P: m-tile i = channel rows g, g + 8
#pragma unroll
        for (int i = 0; i < KS; ++i) {
            if (a.probe & 1) break;             // timing probe: no values
            uint32_t af[4];
            if constexpr (VB == 4) {
                const int w = i / 4, by = i % 4;
                if constexpr (VTAB) {
                    const uint32_t y01 = __byte_perm(cur.v[0][w], cur.v[1][w], by | ((4 + by) << 4));
                    const uint32_t y89 = __byte_perm(cur.v[2][w], cur.v[3][w], by | ((4 + by) << 4));
                    af[0] = tab[(y01 & 0x0Fu) | ((y01 >> 4) & 0xF0u)];
                    af[1] = tab[((y01 >> 4) & 0x0Fu) | ((y01 >> 8) & 0xF0u)];
                    af[2] = tab[(y89 & 0x0Fu) | ((y89 >> 4) & 0xF0u)];
                    af[3] = tab[((y89 >> 4) & 0x0Fu) | ((y89 >> 8) & 0xF0u)];
                } else {
                    const uint32_t sel = by | (by << 4) | ((4 + by) << 8) | ((4 + by) << 12);
                    const uint32_t z01 = __byte_perm(cur.v[0][w], cur.v[1][w], sel);
                    const uint32_t z89 = __byte_perm(cur.v[2][w], cur.v[3][w], sel);
                    af[0] = fix_lo(and_or(z01, 0x000F000Fu, 0x64006400u));
                    af[1] = fix_hi(and_or(z01, 0x00F000F0u, 0x64006400u));
                    af[2] = fix_lo(and_or(z89, 0x000F000Fu, 0x64006400u));
                    af[3] = fix_hi(and_or(z89, 0x00F000F0u, 0x64006400u));
                }
            } else {
                const int w = i / 2, bl = 2 * (i % 2);
                const uint32_t sl = bl | ((4 + bl) << 8), sh = (bl + 1) | ((5 + bl) << 8);
                af[0] = fix_lo(and_or(__byte_perm(cur.v[0][w], cur.v[1][w], sl), 0x00FF00FFu, 0x64006400u));
                af[1] = fix_lo(and_or(__byte_perm(cur.v[0][w], cur.v[1][w], sh), 0x00FF00FFu, 0x64006400u));
                af[2] = fix_lo(and_or(__byte_perm(cur.v[2][w], cur.v[3][w], sl), 0x00FF00FFu, 0x64006400u));
                af[3] = fix_lo(and_or(__byte_perm(cur.v[2][w], cur.v[3][w], sh), 0x00FF00FFu, 0x64006400u));
            }
            mma16816(acc[i], af, pb);
        }
        if (k + 1 < last) cur = nxt;
    }
    // per-lane partial sums over its tokens -> per head
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
        sp0 += __shfl_xor_sync(0xffffffffu, sp0, x);
        sp1 += __shfl_xor_sync(0xffffffffu, sp1, x);
        sz0 += __shfl_xor_sync(0xffffffffu, sz0, x);
        sz1 += __shfl_xor_sync(0xffffffffu, sz1, x);
    }
    const float add0 = a.v_beta * sp0 + sz0, add1 = a.v_beta * sp1 + sz1;
#pragma unroll
    for (int i = 0; i < KS; ++i) {
        int c0, c1;                              // channels of rows g and g + 8 of m-tile i
        if constexpr (VB == 4) {
            c0 = 2 * (g * (D / 16) + i);
            c1 = c0 + 1;
        } else {
            c0 = g * (D / 8) + 2 * i;
            c1 = c0 + 1;
        }
        sm.o[warp][2 * t][c0] = fmaf(acc[i][0], a.v_alpha, add0);
        sm.o[warp][2 * t + 1][c0] = fmaf(acc[i][1], a.v_alpha, add1);
        sm.o[warp][2 * t][c1] = fmaf(acc[i][2], a.v_alpha, add0);
        sm.o[warp][2 * t + 1][c1] = fmaf(acc[i][3], a.v_alpha, add1);
    }
    if (g == 0) {
        sm.m[warp][2 * t] = m0; sm.m[warp][2 * t + 1] = m1;
        sm.l[warp][2 * t] = l0; sm.l[warp][2 * t + 1] = l1;
    }
    finish<D>(a, sm, b, h, y);
}

// out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the splits of one query head (a block of
// 256 threads): the split weights once in shared memory, then 8 groups of 32 lanes, each lane 4
// channels and each group every 8th split (few loads per thread, all in flight), summed at the end.
__global__ void __launch_bounds__(256) kv_combine_kernel(const KVArgs a) {
    __shared__ float w[1024];
    __shared__ float red[2][8];
    __shared__ float4 part[8][32];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
    const int S1 = a.FS + a.NSPLIT;
    const float* ml = a.ml + (size_t)row * S1 * 2;
    float M = -INFINITY;
    for (int s = tid; s < S1; s += 256) M = fmaxf(M, ml[2 * s]);
    for (int x = 16; x; x >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, x));
    if (lane == 0) red[0][grp] = M;
    __syncthreads();
    M = red[0][0];
#pragma unroll
    for (int i = 1; i < 8; ++i) M = fmaxf(M, red[0][i]);
    float d = 0.f;
    for (int s = tid; s < S1; s += 256) {
        const float m = ml[2 * s];
        const float e = m == -INFINITY ? 0.f : ex2(m - M);
        w[s] = e;
        d = fmaf(e, ml[2 * s + 1], d);
    }
    for (int x = 16; x; x >>= 1) d += __shfl_xor_sync(0xffffffffu, d, x);
    if (lane == 0) red[1][grp] = d;
    __syncthreads();
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (4 * lane < a.D) {
        const float* o = a.o + (size_t)row * S1 * a.D + 4 * lane;
#pragma unroll 4
        for (int s = grp; s < S1; s += 8) {
            const float4 v = *reinterpret_cast<const float4*>(o + (size_t)s * a.D);
            const float e = w[s];
            acc.x = fmaf(e, v.x, acc.x); acc.y = fmaf(e, v.y, acc.y);
            acc.z = fmaf(e, v.z, acc.z); acc.w = fmaf(e, v.w, acc.w);
        }
    }
    part[grp][lane] = acc;
    __syncthreads();
    if (grp == 0 && 4 * lane < a.D) {
        float den = 0.f, r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            den += red[1][i];
            r[0] += part[i][lane].x; r[1] += part[i][lane].y; r[2] += part[i][lane].z; r[3] += part[i][lane].w;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const size_t i = (size_t)row * a.D + 4 * lane + j;
            const float v = r[j] / den;
            if (a.q_dtype == 1) reinterpret_cast<__half*>(a.out)[i] = __float2half_rn(v);
            else if (a.q_dtype == 2) reinterpret_cast<__nv_bfloat16*>(a.out)[i] = __float2bfloat16_rn(v);
            else reinterpret_cast<float*>(a.out)[i] = v;
        }
    }
}

template <int D, int KB, int VB, bool VTAB>
static int launch(const KVArgs& a, cudaStream_t stream) {
    const dim3 grid(a.B * a.H, a.FS + a.NSPLIT);
    if (a.minb == 4) kv_decode_kernel<D, KB, VB, VTAB, 4><<<grid, 128, 0, stream>>>(a);
    else kv_decode_kernel<D, KB, VB, VTAB, 1><<<grid, 128, 0, stream>>>(a);
    const int rc = (int)cudaGetLastError();
    if (rc) return rc;
    if (!(a.probe & 4)) kv_combine_kernel<<<a.B * a.H * a.QH, 256, 0, stream>>>(a);
    return (int)cudaGetLastError();
}

// 0: launched; < 0: a combination this library does not hold; > 0: a CUDA error code.
extern "C" int qins_kv_decode(const KVArgs* a, void* stream) {
    if (a->QH < 1 || a->QH > 8 || a->G % 16 || a->P % a->G || a->TPS % 16 || a->TPS <= 0
        || a->FS != (a->F + 63) / 64 || a->FS + a->NSPLIT < 1 || a->FS + a->NSPLIT > 1024) return -1;
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    const bool tab = a->use_tab != 0;
    if (a->D == 128) {
        if (a->KB == 4 && a->VB == 4) return tab ? launch<128, 4, 4, true>(*a, st) : launch<128, 4, 4, false>(*a, st);
        if (a->KB == 8 && a->VB == 8 && !tab) return launch<128, 8, 8, false>(*a, st);
    } else if (a->D == 64) {
        if (a->KB == 4 && a->VB == 4) return tab ? launch<64, 4, 4, true>(*a, st) : launch<64, 4, 4, false>(*a, st);
        if (a->KB == 8 && a->VB == 8 && !tab) return launch<64, 8, 8, false>(*a, st);
    }
    return -2;
}

extern "C" int qins_kv_abi(void) { return (int)sizeof(KVArgs); }
