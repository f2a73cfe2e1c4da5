// y = x W^T (+ b) for 1..16 rows of x over 4-bit codes with one decode table per tensor, on the
// tensor cores: the codes are looked up in a pair table in shared memory straight into the
// mma.sync operand registers. Built by kernels/cuda_qlinear.py with nvcc into a shared library
// and called through ctypes on the caller's stream (CUDA graphs capture it).
//
// Codes are the module's K-major words (weights/linear.py moves them so on CUDA): word w of
// output n at qw[w * QS + n], 8 codes along K, code i in bits 4i..4i+3. Group scales likewise:
// scale (n, group) at s[group * SS + n] (fp16).
//
// A warp owns 32 outputs and a run of whole groups along K (groups of G = 32, 64 or 128 codes;
// the tensor's last group takes the remainder of K, as codec/grid.py); a step ("chunk") is 32
// codes along K. Lane (g, t) = (lane / 4, lane % 4) loads 16 bytes: word 4c + t of outputs 4g .. 4g + 3.
// Those four words feed two m16n8k16 products per half chunk: tile 0 takes outputs 4g (row g)
// and 4g + 1 (row g + 8), tile 1 outputs 4g + 2 and 4g + 3. The order of K inside a product is
// free as long as x follows it: k-slots 2t, 2t+1, 2t+8, 2t+9 of the first product are codes
// 0, 1, 2, 3 of the lane's word, of the second codes 4..7, so each lane's B operand is x[g,
// 8(4c + t) .. + 7], one 16-byte load (rows g >= M are zero; a second n-tile takes rows 8..15).
// A byte of two codes is one lookup in a 256-entry table of half2 (lut[b & 15], lut[b >> 4]),
// replicated 32 times so that lane l always reads bank l (no bank conflicts): 32 KB, or 64 KB laid
// out so that one PRMT makes the address (see look).
//
// The codes may instead be tiled (cuda_qlinear.tile_codes): a warp's chunk is then 512
// contiguous bytes and its run of chunks one stream, where K-major reads four 128-byte pieces
// N words apart per chunk (H200: 8192 x 28672 at batch 1 in 43.9 us against 54.7).
//
// A group's products accumulate in fp32 apart; the group scale multiplies them once into the
// running sum. The block's warps split K; their sums meet in shared memory in a fixed order. With
// several blocks per output tile (split-K across blocks, sm_90) the blocks of a tile form one
// thread-block cluster and the first adds the others' sums from their shared memory in rank
// order: one launch, no workspace, and the result does not depend on scheduling.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <type_traits>
#include <cooperative_groups.h>

namespace cg = cooperative_groups;

#define DEVI __device__ __forceinline__

struct QLArgs {
    const void* x;              // (M, K), row stride LDX elements, fp16 or bf16 (dtype)
    const uint32_t* qw;         // K-major words, qw[w * QS + n]
    const __half* s;            // K-major group scales, s[group * SS + n]
    const uint32_t* tab;        // (256,) pair table in x's dtype
    const void* bias;           // (N,) or null, bias_dtype
    void* y;                    // (M, N), x's dtype
    int M, N, K, QS, SS, LDX, G, SPLITS, dtype, bias_dtype, warps, depth;
    int tiled;                  // 0: qw K-major; else qw tiled with this many chunks per tile (tile_codes)
    int wide;                   // 1: the 64 KB table (one PRMT per lookup), 0: the 32 KB one (see look)
};

DEVI float tof(float x) { return x; }
DEVI float tof(__half x) { return __half2float(x); }
DEVI float tof(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> DEVI T fromf(float v);
template <> DEVI __half fromf<__half>(float v) { return __float2half_rn(v); }
template <> DEVI __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <bool BF16>
DEVI void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    if constexpr (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// The table entry of byte J of word w for this lane. Wide table (64 KB): entry e of lane l is
// the shared word e * 64 + l (bank l, half the words unused), at byte 256 e + 4 l: one PRMT puts
// byte J in bits 8..15 over u = 4 l, and one LDS reads it (u also carries the top byte of the
// table's shared-window address, the block's rank in its cluster on sm_90; the rest of that
// address is TABLE_AT, the LDS's immediate: dynamic shared memory starts after the 1 KB the
// system keeps on sm_80 and newer, which the kernel checks). Narrow table (32 KB, twice the
// blocks per SM): entry e of lane l is word e * 32 + l, and u = the table's address + 4 l:
// PRMT, IMAD, LDS.
constexpr uint32_t TABLE_AT = 0x400;
template <bool WIDE, int J>
DEVI uint32_t look(uint32_t u, uint32_t w) {
    uint32_t v;
    if constexpr (WIDE)
        asm("ld.shared.b32 %0, [%1+1024];" : "=r"(v) : "r"(__byte_perm(w, u, 0x7504u | (J << 4))));
    else
        asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(u + __byte_perm(w, 0u, 0x4440u | J) * 128u));
    return v;
}

struct Stage {
    uint4 w;                    // word 4c + t of outputs 4g .. 4g + 3
    uint4 x0, x1;               // x[g, 8(4c + t) ...], x[g + 8, ...]
    uint2 s;                    // the group scales of outputs 4g .. 4g + 3, when `close`
    bool close;                 // the chunk is the last of its group in this warp's run
};

// One lane's walk over its run of chunks [c0, c1): chunks are loaded in order, so the pointers
// advance as they go (no per-chunk address arithmetic). Groups are G codes (CPG chunks) and the
// tensor's last group takes the remainder of K (codec/grid.py), so a run closes a group every
// CPG chunks before clast (the start of its last group) and its last group at c1 - 1.
template <int NT, int CPG>
struct Walk {
    const uint4* q;             // codes of the next chunk to load: word 4c + t of outputs n .. n + 3
    const uint4* x0;            // x[g, 8(4c + t)]
    const uint4* x1;            // x[g + 8, ...]
    const uint2* s;             // scales of outputs n .. n + 3, the next group to close
    uint32_t qstep, sstep;      // uint4 per chunk of codes, uint2 per group of scales
    int c, c0, c1, clast, words, t;

    // the next chunk, inside the run and before its last group (so inside K): no checks
    DEVI void fast(Stage& st, bool close) {
        st.w = __ldg(q);
        st.x0 = __ldg(x0);
        if constexpr (NT == 2) st.x1 = __ldg(x1);
        st.close = close;
        next(st);
    }

    // the next chunk, when it is below c1; x past K reads as zero (codes there are padding)
    DEVI void load(Stage& st) {
        const bool live = c < c1;
        if (live) st.w = __ldg(q);
        const bool kin = live && 4 * c + t < words;
        st.x0 = kin ? __ldg(x0) : make_uint4(0, 0, 0, 0);
        if constexpr (NT == 2) st.x1 = kin ? __ldg(x1) : make_uint4(0, 0, 0, 0);
        st.close = live && (c == c1 - 1 || ((c - c0 + 1) % CPG == 0 && c < clast));
        next(st);
    }

    // the group's scales when st closes it; then every pointer to the following chunk
    DEVI void next(Stage& st) {
        if (st.close) {
            st.s = __ldg(s);
            s += sstep;
        }
        q += qstep;
        x0 += 4;
        if constexpr (NT == 2) x1 += 4;
        ++c;
    }
};

template <bool BF16, int NT, bool WIDE>
DEVI void product(float (&c)[NT][2][4], const Stage& st, uint32_t u) {
    // tile 0: outputs 4g (word .x, row g) and 4g + 1 (.y, row g + 8); tile 1: .z and .w
    const uint32_t wr[4] = {st.w.x, st.w.y, st.w.z, st.w.w};
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
        const uint32_t lo = wr[2 * tile], hi = wr[2 * tile + 1];
        const uint32_t a00 = look<WIDE, 0>(u, lo), a01 = look<WIDE, 0>(u, hi);
        const uint32_t a02 = look<WIDE, 1>(u, lo), a03 = look<WIDE, 1>(u, hi);
        const uint32_t a10 = look<WIDE, 2>(u, lo), a11 = look<WIDE, 2>(u, hi);
        const uint32_t a12 = look<WIDE, 3>(u, lo), a13 = look<WIDE, 3>(u, hi);
        mma<BF16>(c[0][tile], a00, a01, a02, a03, st.x0.x, st.x0.y);
        mma<BF16>(c[0][tile], a10, a11, a12, a13, st.x0.z, st.x0.w);
        if constexpr (NT == 2) {
            mma<BF16>(c[1][tile], a00, a01, a02, a03, st.x1.x, st.x1.y);
            mma<BF16>(c[1][tile], a10, a11, a12, a13, st.x1.z, st.x1.w);
        }
    }
}

template <int NT>
DEVI void fold(float (&acc)[NT][2][4], float (&part)[NT][2][4], uint2 sv) {
    const __half2 s01 = *reinterpret_cast<const __half2*>(&sv.x);
    const __half2 s23 = *reinterpret_cast<const __half2*>(&sv.y);
    const float sc[4] = {__low2float(s01), __high2float(s01), __low2float(s23), __high2float(s23)};
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int tile = 0; tile < 2; ++tile)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[j][tile][e] = fmaf(part[j][tile][e], sc[2 * tile + (e >> 1)], acc[j][tile][e]);
                part[j][tile][e] = 0.f;
            }
}

// blocks per SM the registers are fitted to (no spills at either batch tile); a 64 KB table
// lets at most 3 blocks share an SM
template <int NT, int WARPS, int DEPTH, bool WIDE>
constexpr int min_blocks() {
    return (WARPS == 8 ? (DEPTH <= 2 ? 3 : 2) : (WIDE ? 3 : DEPTH <= 2 ? 6 : 4)) / NT;
}

template <bool WIDE>
constexpr int table_bytes() { return 256 * (WIDE ? 64 : 32) * 4; }

template <typename T, int NT, int WARPS, int DEPTH, int CPG, bool WIDE>
__global__ void __launch_bounds__(WARPS * 32, min_blocks<NT, WARPS, DEPTH, WIDE>())
qlinear4_kernel(const QLArgs a) {
    constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
    extern __shared__ __align__(16) uint32_t smem[];  // the table; then the block's sums
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // entry e of the table at words e * (32 or 64) + l: a warp loads 32 entries, one per lane, and
    // writes each to its 32 copies in one conflict-free store
    for (int b = warp * 32; b < 256; b += WARPS * 32) {
        const uint32_t v = __ldg(a.tab + b + lane);
#pragma unroll
        for (int e = 0; e < 32; ++e) smem[(b + e) * (WIDE ? 64 : 32) + lane] = __shfl_sync(0xffffffffu, v, e);
    }
    __syncthreads();
    const uint32_t tab = (uint32_t)__cvta_generic_to_shared(smem);
    const uint32_t u = WIDE ? (tab & 0xff000000u) | 4 * lane : tab + 4 * lane;
    if (WIDE && (tab & 0x00ffffffu) != TABLE_AT) {            // another shared layout: NaN, never a wrong sum
        for (int idx = threadIdx.x; idx < a.M * 32; idx += WARPS * 32)
            if (blockIdx.y == 0 && blockIdx.x * 32 + (idx & 31) < a.N)
                reinterpret_cast<T*>(a.y)[(size_t)(idx >> 5) * a.N + blockIdx.x * 32 + (idx & 31)] = fromf<T>(__int_as_float(0x7fc00000));
        return;
    }

    const int n0 = blockIdx.x * 32;
    const int chunks = (a.K + 31) / 32;               // chunks of 32 codes (K padded to 32 codes)
    const int groups = max(1, a.K / a.G);
    const int slices = a.SPLITS * WARPS, slice = blockIdx.y * WARPS + warp;
    const int g0 = (int)((long long)groups * slice / slices), g1 = (int)((long long)groups * (slice + 1) / slices);
    const int c0 = g0 * CPG, c1 = g1 == groups ? chunks : g1 * CPG;
    const int n = n0 + 4 * g;
    // loads stay inside the tensor: outputs past N read the last four (N % 4 == 0) and rows of x
    // past M the last row; their sums are never stored
    const int nl = min(n, a.N - 4);
    const int wt0 = 4 * c0 + t;                       // the lane's first word
    const uint16_t* x = reinterpret_cast<const uint16_t*>(a.x);
    Walk<NT, CPG> wk;
    if (a.tiled) {                                    // a warp's chunk: 512 contiguous bytes, lane l's 16 at 16 l
        wk.q = reinterpret_cast<const uint4*>(a.qw) + ((size_t)blockIdx.x * a.tiled + c0) * 32 + lane;
        wk.qstep = 32;
    } else {
        wk.q = reinterpret_cast<const uint4*>(a.qw + (size_t)wt0 * a.QS + nl);
        wk.qstep = (uint32_t)a.QS;                    // 4 rows of QS words, in uint4
    }
    wk.x0 = reinterpret_cast<const uint4*>(x + (size_t)min(g, a.M - 1) * a.LDX + 8 * wt0);
    wk.x1 = reinterpret_cast<const uint4*>(x + (size_t)min(g + 8, a.M - 1) * a.LDX + 8 * wt0);
    wk.s = reinterpret_cast<const uint2*>(a.s + (size_t)g0 * a.SS + nl);
    wk.sstep = (uint32_t)a.SS / 4;
    wk.c = c0;
    wk.c0 = c0;
    wk.c1 = c1;
    wk.clast = c0 + (g1 - g0 - 1) * CPG;
    wk.words = a.K / 8;
    wk.t = t;

    float acc[NT][2][4] = {};
    float part[NT][2][4] = {};
    Stage st[DEPTH] = {};
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) wk.load(st[i]);
    int c = c0;
    // rounds of U chunks far from the run's end: loads without checks and group ends known at
    // compile time (a round starts a whole number of groups after c0, and never reaches clast)
    constexpr int U = DEPTH > CPG ? DEPTH : CPG;
    for (; c + U + DEPTH + 2 * CPG <= c1; c += U) {
#pragma unroll
        for (int i = 0; i < U; ++i) {
            Stage& cur = st[i % DEPTH];
            product<BF16, NT, WIDE>(part, cur, u);
            if ((i + 1) % CPG == 0) fold<NT>(acc, part, cur.s);
            wk.fast(cur, (i + DEPTH + 1) % CPG == 0);
        }
    }
    for (; c + DEPTH <= c1; c += DEPTH) {             // the run's end: checked loads
#pragma unroll
        for (int i = 0; i < DEPTH; ++i) {
            const Stage cur = st[i];
            wk.load(st[i]);
            product<BF16, NT, WIDE>(part, cur, u);
            if (cur.close) fold<NT>(acc, part, cur.s);
        }
    }
#pragma unroll
    for (int i = 0; i < DEPTH - 1; ++i) {             // the last chunks, already loaded
        if (c + i < c1) {
            product<BF16, NT, WIDE>(part, st[i], u);
            if (st[i].close) fold<NT>(acc, part, st[i].s);
        }
    }

    // the block's sums: red[warp][output 0..31][row 0..15]; accumulator element e of tile `tile`
    // is output 4g + 2 tile + (e >> 1), row 8 j + 2t + (e & 1)
    __syncthreads();                                  // every warp is done with the table
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int tile = 0; tile < 2; ++tile)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                red[(warp * 32 + 4 * g + 2 * tile + (e >> 1)) * 16 + 8 * j + 2 * t + (e & 1)] = acc[j][tile][e];
    __syncthreads();
    // the block's sum over its warps, in a fixed order, into sum[m * 32 + output] (after red)
    float* sum = red + WARPS * 32 * 16;
    const int count = 32 * a.M;
    for (int idx = threadIdx.x; idx < count; idx += WARPS * 32) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) v += red[(w * 32 + (idx & 31)) * 16 + (idx >> 5)];
        sum[idx] = v;
    }
    // split-K: the SPLITS blocks of a tile are one cluster; the first adds the others' sums from
    // their shared memory (distributed shared memory), in rank order
    int nsplit = 1;
#if __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    nsplit = a.SPLITS;
    if (nsplit > 1) {
        cluster.sync();
        if (cluster.block_rank() != 0) {
            cluster.sync();                           // stay resident until rank 0 has read
            return;
        }
    }
#endif
    __syncthreads();
    T* y = reinterpret_cast<T*>(a.y);
    for (int idx = threadIdx.x; idx < count; idx += WARPS * 32) {
        const int m = idx >> 5, nn = n0 + (idx & 31);
        if (nn >= a.N) continue;
        float v = sum[idx];
#if __CUDA_ARCH__ >= 900
        for (int r = 1; r < nsplit; ++r) v += *cluster.map_shared_rank(sum + idx, r);
#endif
        if (a.bias) {
            if (a.bias_dtype == 1) v += tof(reinterpret_cast<const __half*>(a.bias)[nn]);
            else if (a.bias_dtype == 2) v += tof(reinterpret_cast<const __nv_bfloat16*>(a.bias)[nn]);
            else v += reinterpret_cast<const float*>(a.bias)[nn];
        }
        y[(size_t)m * a.N + nn] = fromf<T>(v);
    }
#if __CUDA_ARCH__ >= 900
    if (nsplit > 1) cluster.sync();
#endif
}

template <typename T, int NT, int WARPS, int DEPTH, int CPG, bool WIDE>
static int launch_g(const QLArgs& a, cudaStream_t st) {
    static bool opted[64] = {};                       // the 64 KB opt-in, once per device
    int dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && dev < 64 && !opted[dev]) {
        const int rc = (int)cudaFuncSetAttribute(qlinear4_kernel<T, NT, WARPS, DEPTH, CPG, WIDE>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, table_bytes<WIDE>());
        if (rc) return rc;
        opted[dev] = true;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((a.N + 31) / 32, a.SPLITS);
    cfg.blockDim = dim3(WARPS * 32);
    cfg.dynamicSmemBytes = table_bytes<WIDE>();
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = a.SPLITS;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = a.SPLITS > 1 ? 1 : 0;
    return (int)cudaLaunchKernelEx(&cfg, qlinear4_kernel<T, NT, WARPS, DEPTH, CPG, WIDE>, a);
}

template <typename T, int NT, int WARPS, int DEPTH>
static int launch(const QLArgs& a, cudaStream_t st) {
    switch (a.G) {
        case 32: return a.wide ? launch_g<T, NT, WARPS, DEPTH, 1, true>(a, st) : launch_g<T, NT, WARPS, DEPTH, 1, false>(a, st);
        case 64: return a.wide ? launch_g<T, NT, WARPS, DEPTH, 2, true>(a, st) : launch_g<T, NT, WARPS, DEPTH, 2, false>(a, st);
        case 128: return a.wide ? launch_g<T, NT, WARPS, DEPTH, 4, true>(a, st) : launch_g<T, NT, WARPS, DEPTH, 4, false>(a, st);
        default: return -4;
    }
}

template <typename T, int NT>
static int by_shape(const QLArgs& a, cudaStream_t st) {
    if (a.warps == 8 && a.depth == 4) return launch<T, NT, 8, 4>(a, st);
    if (a.warps == 8 && a.depth == 2) return launch<T, NT, 8, 2>(a, st);
    if (a.warps == 4 && a.depth == 4) return launch<T, NT, 4, 4>(a, st);
    return -3;
}

extern "C" int qins_qlinear4(const QLArgs* a, void* stream) {
    if (a->M < 1 || a->M > 16 || a->G % 32 || a->G <= 0 || a->K % 8 || a->N % 4 || a->QS % 4
        || a->SS % 4 || a->LDX % 8 || a->SPLITS < 1 || a->SPLITS > 8)
        return -1;
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    if (a->dtype == 1) return a->M <= 8 ? by_shape<__half, 1>(*a, st) : by_shape<__half, 2>(*a, st);
    if (a->dtype == 2) return a->M <= 8 ? by_shape<__nv_bfloat16, 1>(*a, st) : by_shape<__nv_bfloat16, 2>(*a, st);
    return -2;
}

extern "C" int qins_qlinear_abi(void) { return (int)sizeof(QLArgs); }
