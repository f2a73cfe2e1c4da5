// CPU fast path of qlinear: y = x W^T + b with W decoded from packed codes inside the dot
// product (AVX2 + FMA + F16C), never materialised whole.
//
// Layout (codec/packing.py): a row of N_pad codes is split into bit planes of width 8, 4, 2
// or 1; 8 consecutive codes of a plane of width w occupy 8w contiguous bits of one word
// (w <= 4) or two words (w = 8). Group k of a row covers codes [k g, (k+1) g), the last group
// also the remainder; g is a multiple of 32, so a group is whole 32-code blocks.
//
// Decode of 8 codes -> 8 floats (`lookup`):
//   bits <= 3  one _mm256_permutevar8x32_ps on the table in one register
//   bits 4     two permutes (table halves) and a blend on code bit 3
//   bits 5     four permutes, three blends on bits 3 and 4
//   bits 6, 8  _mm256_i32gather_ps from the table (L1)
// Per group: acc = sum_i T[c_i] x_i (fp32 FMA), then y += s * acc (+ m * sum_i x_i).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Planes {            // bit planes of one code width, low bits first
  int n;
  int width[2];
  int shift[2];
};

constexpr Planes planes_of(int bits) {
  switch (bits) {
    case 8: return {1, {8, 0}, {0, 0}};
    case 6: return {2, {4, 2}, {0, 4}};
    case 5: return {2, {4, 1}, {0, 4}};
    case 4: return {1, {4, 0}, {0, 0}};
    case 3: return {2, {2, 1}, {0, 2}};
    default: return {1, {2, 0}, {0, 0}};
  }
}

// 8 codes of one plane of width W, chunk c (codes 8c .. 8c+7), plane base pointer p
template <int W>
inline __m256i plane8(const uint32_t* p, int64_t c) {
  if constexpr (W == 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 * c));
    return _mm256_cvtepu8_epi32(b);
  } else {
    // 8 codes take 8W bits: word (8W c) / 32, bit offset (8W c) % 32
    const int64_t bit = 8 * W * c;
    uint32_t word = p[bit >> 5] >> (bit & 31);
    const __m256i sh = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), sh);
    return _mm256_and_si256(v, _mm256_set1_epi32((1 << W) - 1));
  }
}

template <int BITS>
inline __m256i codes8(const uint32_t* row, int64_t plane1, int64_t c) {
  constexpr Planes P = planes_of(BITS);
  __m256i idx = plane8<P.width[0]>(row, c);
  if constexpr (P.n == 2) {
    __m256i hi = plane8<P.width[1]>(row + plane1, c);
    idx = _mm256_or_si256(idx, _mm256_slli_epi32(hi, P.shift[1]));
  }
  return idx;
}

// the table of one curvature held in registers (bits <= 5) or read from L1
template <int BITS>
struct Table {
  __m256 t[4];
  const float* p;
  inline void load(const float* tab) {
    p = tab;
    if constexpr (BITS <= 3) {
      float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < (1 << BITS); ++i) buf[i] = tab[i];
      t[0] = _mm256_loadu_ps(buf);
    } else if constexpr (BITS <= 5) {
      for (int i = 0; i < (1 << (BITS - 3)); ++i) t[i] = _mm256_loadu_ps(tab + 8 * i);
    }
  }
  inline __m256 lookup(__m256i idx) const {
    if constexpr (BITS <= 3) {
      return _mm256_permutevar8x32_ps(t[0], idx);
    } else if constexpr (BITS == 4) {
      __m256 lo = _mm256_permutevar8x32_ps(t[0], idx);
      __m256 hi = _mm256_permutevar8x32_ps(t[1], idx);
      return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    } else if constexpr (BITS == 5) {
      __m256 b3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
      __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], idx), _mm256_permutevar8x32_ps(t[1], idx), b3);
      __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], idx), _mm256_permutevar8x32_ps(t[3], idx), b3);
      return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
    } else {
      return _mm256_i32gather_ps(p, idx, 4);
    }
  }
};

// qins in closed form (bits 6 and 8: no gather): code c -> j = c - (N - 1), N = 2^(bits-1),
// value j / (N (1 + a) - a |j|) = sign(j) v(|j| / N), v(t) = t / (1 + a (1 - t)) (codec/qins.py);
// reciprocal + one Newton step: within 2 ulp of the float64-built table (tests check it);
// NEWTON false (the approximate gemv): the 12-bit reciprocal alone, |relative error| <= 1.5 2^-12
// (under a tenth of the 8-bit step everywhere), three fewer instructions per 8 codes
template <int BITS, bool NEWTON = true>
struct Closed {
  __m256 neg_a, base;
  inline void load(const float* curv) {
    constexpr float N = float(1 << (BITS - 1));
    const float a = *curv;
    neg_a = _mm256_set1_ps(-a);
    base = _mm256_set1_ps(N * (1.f + a));
  }
  inline __m256 lookup(__m256i idx) const {
    const __m256 j = _mm256_cvtepi32_ps(_mm256_sub_epi32(idx, _mm256_set1_epi32((1 << (BITS - 1)) - 1)));
    const __m256 aj = _mm256_andnot_ps(_mm256_set1_ps(-0.f), j);
    const __m256 den = _mm256_fmadd_ps(aj, neg_a, base);
    __m256 r = _mm256_rcp_ps(den);
    if constexpr (NEWTON) r = _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, _mm256_set1_ps(2.f)));
    return _mm256_mul_ps(j, r);
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(const at::Half* h, int64_t i) {
  return _cvtsh_ss(reinterpret_cast<const uint16_t*>(h)[i]);
}

struct Args {
  const uint32_t* q; int64_t W;        // (O, W) packed words
  const at::Half* s; const at::Half* m; int64_t G;   // (O, G) or null
  const float* tab; int64_t A;         // (A, 2^bits), or (A,) curvatures when closed
  int64_t gs, n_pad, plane1;           // group size, codes per row, plane-1 offset in words
};

// y[r, o] for M (<= 4) rows of xp (M, n_pad) fp32, rows o0..o1 of W; xs (M, G) group sums of x
template <int BITS, class Dec, int M>
void gemv_rows(const Args& a, const float* xp, const float* xs, const float* bias, float* y,
               int64_t O, int64_t o0, int64_t o1) {
  constexpr int U = M == 1 ? 4 : (M == 2 ? 2 : 1);   // independent FMA chains per x row
  constexpr int T = std::is_same_v<Dec, Closed<BITS>> || std::is_same_v<Dec, Closed<BITS, false>> ? 1 : 1 << BITS;
  Dec tab;
  if (a.A == 1) tab.load(a.tab);
  for (int64_t o = o0; o < o1; ++o) {
    if (a.A != 1) tab.load(a.tab + o * T);
    const uint32_t* row = a.q + o * a.W;
    __m256 racc[M];
    float roff[M];
    for (int m = 0; m < M; ++m) { racc[m] = _mm256_setzero_ps(); roff[m] = 0.f; }
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.gs / 8;
      const int64_t c1 = (g == a.G - 1) ? a.n_pad / 8 : (g + 1) * a.gs / 8;   // multiple of 4
      __m256 acc[M][U];
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
      for (int64_t c = c0; c < c1; c += 4) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          __m256 v = tab.lookup(codes8<BITS>(row, a.plane1, c + k));
          for (int m = 0; m < M; ++m)
            acc[m][k % U] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + m * a.n_pad + 8 * (c + k)), acc[m][k % U]);
        }
      }
      const float s = a.s ? half_to_float(a.s, o * a.G + g) : 1.f;
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        __m256 t = acc[m][0];
        for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[m][u]);
        racc[m] = _mm256_fmadd_ps(t, sv, racc[m]);
        if (a.m) roff[m] += half_to_float(a.m, o * a.G + g) * xs[m * a.G + g];
      }
    }
    const float b = bias ? bias[o] : 0.f;
    for (int m = 0; m < M; ++m) y[m * O + o] = hsum(racc[m]) + roff[m] + b;
  }
}

// ---- 4-, 5- and 6-bit codes against int16 activations (the gemv path for those widths) ----
// The table values become int16 levels L = round(T * 16383 / max|T|) (error <= 2^-15 of
// max|T|), split into low-byte and high-byte vpshufb tables of 16 entries each. x is quantized
// per group of each row to int16 with |xq| <= 8191 (error <= max|x_g| / 16382) and laid out in
// the order the unpacks produce. Two decodes of the codes (5/6 bits: the high bits of plane 1
// pick the sub-table by compare + blend):
//   block64 (4, 5 bits)  32 bytes of 4-bit codes: even codes in the low nibbles, odd in the high
//                        ones, two vpshufb pairs and four unpacks to 4 x 16 int16 levels, four
//                        vpmaddwd (x in `perm64` order; a group's 32-code tail as a unit)
//   unit (6 bits; tails) 16 bytes broadcast to both lanes, low nibbles in lane 0 and high
//                        nibbles in lane 1, two unpacks to 2 x 16 levels, two vpmaddwd (`perm32`);
//                        a 6-bit block is two units
// Every 128 codes at most (16 products of |L xq| < 2^27 per lane: < 2^31, no overflow) the
// int32 sums are converted and added to an fp32 accumulator with the factor s_g * f * xs_g.
// Measured int8 activations and int8 levels (vpmaddubsw, as llama.cpp) instead: ~1.4x faster
// per layer, but KL(reference || fast) 1.1e-2 on the default model (levels alone 1.6e-3, x
// alone 9.2e-3; issue 16 asks < 1e-4), so int16 stays.
// the levels of a 4-, 5- or 6-bit table: 2^(BITS-4) sub-tables of 16 entries, each as a
// low-byte and a high-byte vpshufb table (duplicated in both lanes)
template <int BITS>
struct LevQ {
  static constexpr int S = 1 << (BITS - 4);
  __m256i lo[S], hi[S];
  float f;                 // level -> table value
  inline void load(const float* tab) {
    constexpr int T = 1 << BITS;
    float mx = 0.f;
    for (int i = 0; i < T; ++i) mx = std::max(mx, std::fabs(tab[i]));
    const float inv = mx > 0.f ? 16383.f / mx : 0.f;
    alignas(32) uint8_t lo8[32], hi8[32];
    for (int t = 0; t < S; ++t) {
      for (int i = 0; i < 16; ++i) {
        const int v = static_cast<int>(std::lrintf(tab[16 * t + i] * inv));
        lo8[i] = lo8[i + 16] = static_cast<uint8_t>(v & 0xff);
        hi8[i] = hi8[i + 16] = static_cast<uint8_t>((v >> 8) & 0xff);
      }
      lo[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo8));
      hi[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi8));
    }
    f = mx / 16383.f;
  }
  // the qins closed form of codec/qins.py for a curvature a (as Closed), then load
  inline void load_closed(float a) {
    constexpr int T = 1 << BITS, N = 1 << (BITS - 1);
    float tab[T];
    for (int c = 0; c < T; ++c) {
      const float j = float(c - (N - 1));
      tab[c] = j / (float(N) * (1.f + a) - a * std::fabs(j));
    }
    load(tab);
  }
  // codes [k, k + 32) of a row (plane 0: 4-bit codes; plane 1 at word offset plane1: the high
  // 1 or 2 bits) -> levels in two int16 vectors, in perm32 order
  inline void unit(const uint32_t* row, int64_t plane1, int64_t k, __m256i& w0, __m256i& w1) const {
    const __m256i m = _mm256_set1_epi8(0x0f);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(row) + k / 2;
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i nib = _mm256_blend_epi32(_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 0xF0);
    __m256i hb = nib, one = nib, l, h;             // 4 bits: pick reads neither
    if constexpr (BITS == 5) {
      // bit of code 2q (lane 0) / 2q+1 (lane 1): byte q/4 of the plane, bit (2q) % 8 / (2q+1) % 8
      int32_t word;
      std::memcpy(&word, reinterpret_cast<const uint8_t*>(row + plane1) + k / 8, 4);
      const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                           0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
      one = _mm256_setr_epi8(1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64,
                             2, 8, 32, -128, 2, 8, 32, -128, 2, 8, 32, -128, 2, 8, 32, -128);
      hb = _mm256_shuffle_epi8(_mm256_set1_epi32(word), idx);
    } else if constexpr (BITS == 6) {
      // 2 bits of code 2q (lane 0) / 2q+1 (lane 1): byte q/2, bits at 4 (q % 2) / 4 (q % 2) + 2
      int64_t dword;
      std::memcpy(&dword, reinterpret_cast<const uint8_t*>(row + plane1) + k / 4, 8);
      const __m256i idx = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                           0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
      one = _mm256_setr_epi8(1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16, 1, 16,
                             4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64, 4, 64);
      hb = _mm256_shuffle_epi8(_mm256_set1_epi64x(dword), idx);
    }
    pick(nib, hb, one, l, h);
    w0 = _mm256_unpacklo_epi8(l, h);
    w1 = _mm256_unpackhi_epi8(l, h);
  }
  // low and high level bytes of 32 codes: nib their low 4 bits, hb their plane-1 bits spread so
  // that (hb & one) == one picks sub-table 1 (5 bits), (hb & 3 one) == c one sub-table c (6 bits)
  inline void pick(__m256i nib, __m256i hb, __m256i one, __m256i& l, __m256i& h) const {
    l = _mm256_shuffle_epi8(lo[0], nib);
    h = _mm256_shuffle_epi8(hi[0], nib);
    if constexpr (BITS == 5) {
      const __m256i sel = _mm256_cmpeq_epi8(_mm256_and_si256(hb, one), one);
      l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(lo[1], nib), sel);
      h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(hi[1], nib), sel);
    } else if constexpr (BITS == 6) {
      const __m256i two = _mm256_add_epi8(one, one), three = _mm256_add_epi8(two, one);
      const __m256i f = _mm256_and_si256(hb, three);
      const __m256i s1 = _mm256_cmpeq_epi8(f, one), s2 = _mm256_cmpeq_epi8(f, two), s3 = _mm256_cmpeq_epi8(f, three);
      l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(lo[1], nib), s1);
      h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(hi[1], nib), s1);
      l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(lo[2], nib), s2);
      h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(hi[2], nib), s2);
      l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(lo[3], nib), s3);
      h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(hi[3], nib), s3);
    }
  }
  // codes [k, k + 64) -> levels in four int16 vectors, in perm64 order: one 32-byte load holds
  // the 64 low nibbles, even codes (k + 2p) in the low nibbles, odd codes in the high ones
  inline void block64(const uint32_t* row, int64_t plane1, int64_t k, __m256i w[4]) const {
    if constexpr (BITS == 6) {      // two units (perm32 order): pairs of 64-code blocks measured
      unit(row, plane1, k, w[0], w[1]);          // ~10% slower with eight table registers
      unit(row, plane1, k + 32, w[2], w[3]);
      return;
    }
    const __m256i m = _mm256_set1_epi8(0x0f);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(row) + k / 2));
    const __m256i n0 = _mm256_and_si256(v, m), n1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    __m256i l0, h0, l1, h1;
    if constexpr (BITS == 4) {
      pick(n0, n0, n0, l0, h0);
      pick(n1, n1, n1, l1, h1);
    } else {
      // bit of code k + 2p (+1): byte p/4 of the plane's 8 bytes, bit 2 (p % 4) (+1)
      int64_t q;
      std::memcpy(&q, reinterpret_cast<const uint8_t*>(row + plane1) + k / 8, 8);
      const __m256i idx = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                           4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
      const __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi64x(q), idx);
      const __m256i b0 = _mm256_set1_epi32(0x40100401);            // bytes 1, 4, 16, 64
      pick(n0, hb, b0, l0, h0);
      pick(n1, hb, _mm256_add_epi8(b0, b0), l1, h1);
    }
    w[0] = _mm256_unpacklo_epi8(l0, h0);
    w[1] = _mm256_unpackhi_epi8(l0, h0);
    w[2] = _mm256_unpacklo_epi8(l1, h1);
    w[3] = _mm256_unpackhi_epi8(l1, h1);
  }
};

// position of code r (0..63) of a block in LevQ::block64's four vectors: even codes 2p in
// vectors 0-1, odd in 2-3; byte p of a nibble vector sits in lane p / 16, unpack lo (p % 16 < 8)
// or hi, slot p % 8
inline int perm64(int r) {
  const int p = r >> 1;
  return ((r & 1) * 2 + ((p >> 3) & 1)) * 16 + (p >> 4) * 8 + (p & 7);
}

// position of code k (0..31 within a unit) in the two int16 vectors of LevQ::unit
inline int perm32(int k) {
  const int half = k >> 4, r = k & 15;              // vector 0 holds codes 0..15, vector 1 16..31
  return half * 16 + ((r & 1) ? 8 + (r >> 1) : (r >> 1));
}

// xq (M, n_pad) int16 for the block kernels: per group, blocks of 64 codes in perm64 order (units:
// two perm32 halves, the 6-bit decode) and a tail of 32 in perm32 order; xs (M, G) the factor of
// each group, xsum (M, G) sums of x
void quantize_x64(const float* x, int64_t M, int64_t I, int64_t n_pad, int64_t gs, int64_t G,
                  int16_t* xq, float* xs, float* xsum, bool units) {
  int p64[64], p32[32];
  for (int r = 0; r < 64; ++r) p64[r] = units ? (r & ~31) + perm32(r & 31) : perm64(r);
  for (int r = 0; r < 32; ++r) p32[r] = perm32(r);
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * I;
    int16_t* q = xq + m * n_pad;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs, k1 = (g == G - 1) ? n_pad : (g + 1) * gs, ke = std::min(k1, I);
      __m256 vmx = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 8 <= ke; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        vmx = _mm256_max_ps(vmx, _mm256_and_ps(v, absm));
        vsum = _mm256_add_ps(vsum, v);
      }
      alignas(32) float b[8];
      _mm256_store_ps(b, vmx);
      float mx = std::max({b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]}), sum = hsum(vsum);
      for (; k < ke; ++k) { mx = std::max(mx, std::fabs(xr[k])); sum += xr[k]; }
      const float inv = mx > 0.f ? 8191.f / mx : 0.f;
      xs[m * G + g] = mx / 8191.f;
      xsum[m * G + g] = sum;
      for (int64_t b0 = k0; b0 < k1;) {
        const bool full = b0 + 64 <= k1;
        const int len = full ? 64 : 32;
        alignas(32) int32_t t[64];
        const __m256 iv = _mm256_set1_ps(inv);
        for (int r = 0; r < len; r += 8) {
          __m256 v;
          if (b0 + r + 8 <= I) {
            v = _mm256_loadu_ps(xr + b0 + r);
          } else {
            alignas(32) float z[8];
            for (int i = 0; i < 8; ++i) z[i] = b0 + r + i < I ? xr[b0 + r + i] : 0.f;
            v = _mm256_load_ps(z);
          }
          _mm256_store_si256(reinterpret_cast<__m256i*>(t + r), _mm256_cvtps_epi32(_mm256_mul_ps(v, iv)));
        }
        for (int r = 0; r < len; ++r) q[b0 + (full ? p64[r] : p32[r])] = static_cast<int16_t>(t[r]);
        b0 += len;
      }
    }
  }
}

// int32 lanes of sum L x over 64 codes (block64 levels against their x)
inline __m256i dot64(const __m256i w[4], const int16_t* xp) {
  const __m256i* xv = reinterpret_cast<const __m256i*>(xp);
  return _mm256_add_epi32(
      _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(xv)), _mm256_madd_epi16(w[1], _mm256_loadu_si256(xv + 1))),
      _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(xv + 2)), _mm256_madd_epi16(w[3], _mm256_loadu_si256(xv + 3))));
}

// int32 lanes of sum L x over codes [k, ke) (<= 128: no int32 overflow) of one row
template <int BITS>
inline __m256i dot_span(const LevQ<BITS>& lev, const uint32_t* row, int64_t plane1, const int16_t* xq,
                        int64_t k, int64_t ke) {
  __m256i acc = _mm256_setzero_si256();
  for (; k + 64 <= ke; k += 64) {
    __m256i w[4];
    lev.block64(row, plane1, k, w);
    acc = _mm256_add_epi32(acc, dot64(w, xq + k));
  }
  if (k < ke) {
    __m256i w0, w1;
    lev.unit(row, plane1, k, w0, w1);
    const __m256i* xv = reinterpret_cast<const __m256i*>(xq + k);
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                                 _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1))));
  }
  return acc;
}

// one x row (generation) and one table: two output rows at a time, their accumulators in named
// registers (arrays indexed in loops were spilled to the stack). NB > 0: every group but the
// last is NB blocks of 64 codes (group size 64 or 128), unrolled with no per-group loop logic
// (one block per group made the bookkeeping cost as much as the dot product); the last group
// and NB = 0 take the general loop.
template <int BITS, int NB>
void gemvq_m1(const Args& a, const LevQ<BITS>& lev, const int16_t* xq, const float* xs, const float* xsum,
              const float* bias, float* y, int64_t o0, int64_t o1) {
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(a.s);
  auto rows = [&](int64_t o, bool two) {
    const uint32_t* r0 = a.q + o * a.W;
    const uint32_t* r1 = two ? r0 + a.W : r0;
    const int64_t i0 = o * a.G, i1 = (o + two) * a.G;
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    float off0 = 0.f, off1 = 0.f;
    int64_t g = 0;
    if constexpr (NB > 0) {
      for (; g < a.G - 1; ++g) {
        const int64_t k = g * (64 * NB);
        __m256i w[4];
        lev.block64(r0, a.plane1, k, w);
        __m256i a0 = dot64(w, xq + k);
        lev.block64(r1, a.plane1, k, w);
        __m256i a1 = dot64(w, xq + k);
        if constexpr (NB == 2) {
          lev.block64(r0, a.plane1, k + 64, w);
          a0 = _mm256_add_epi32(a0, dot64(w, xq + k + 64));
          lev.block64(r1, a.plane1, k + 64, w);
          a1 = _mm256_add_epi32(a1, dot64(w, xq + k + 64));
        }
        const float xg = xs[g] * lev.f;
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_set1_ps(_cvtsh_ss(sc[i0 + g]) * xg), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_set1_ps(_cvtsh_ss(sc[i1 + g]) * xg), f1);
      }
    }
    for (; g < a.G; ++g) {
      const int64_t k0 = g * a.gs, k1 = (g == a.G - 1) ? a.n_pad : (g + 1) * a.gs;
      const float xg = xs[g] * lev.f;
      const float s0 = a.s ? _cvtsh_ss(sc[i0 + g]) * xg : xg;
      const float s1 = a.s ? _cvtsh_ss(sc[i1 + g]) * xg : xg;
      for (int64_t kb = k0; kb < k1; kb += 128) {
        const int64_t ke = std::min(k1, kb + 128);
        const __m256i a0 = dot_span(lev, r0, a.plane1, xq, kb, ke);
        const __m256i a1 = dot_span(lev, r1, a.plane1, xq, kb, ke);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_set1_ps(s0), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_set1_ps(s1), f1);
      }
      if (a.m) {
        off0 += half_to_float(a.m, i0 + g) * xsum[g];
        off1 += half_to_float(a.m, i1 + g) * xsum[g];
      }
    }
    y[o] = hsum(f0) + off0 + (bias ? bias[o] : 0.f);
    if (two) y[o + 1] = hsum(f1) + off1 + (bias ? bias[o + 1] : 0.f);
  };
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) rows(o, true);
  if (o < o1) rows(o, false);
}

// M (<= 4) x rows (short chunks, per-row tables): one output row at a time
template <int BITS, int M>
void gemvq64_rows(const Args& a, const LevQ<BITS>& lev0, bool closed, const int16_t* xq, const float* xs,
                  const float* xsum, const float* bias, float* y, int64_t O, int64_t o0, int64_t o1) {
  LevQ<BITS> lev = lev0;
  for (int64_t o = o0; o < o1; ++o) {
    if (a.A != 1) {
      if (closed) lev.load_closed(a.tab[o]); else lev.load(a.tab + o * (1 << BITS));
    }
    const uint32_t* row = a.q + o * a.W;
    __m256 facc[M];
    float roff[M];
    for (int m = 0; m < M; ++m) { facc[m] = _mm256_setzero_ps(); roff[m] = 0.f; }
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t k0 = g * a.gs, k1 = (g == a.G - 1) ? a.n_pad : (g + 1) * a.gs;
      const float s = (a.s ? half_to_float(a.s, o * a.G + g) : 1.f) * lev.f;
      for (int64_t kb = k0; kb < k1; kb += 128) {
        const int64_t ke = std::min(k1, kb + 128);
        __m256i acc[M];
        for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
        int64_t k = kb;
        for (; k + 64 <= ke; k += 64) {
          __m256i w[4];
          lev.block64(row, a.plane1, k, w);
          for (int m = 0; m < M; ++m) acc[m] = _mm256_add_epi32(acc[m], dot64(w, xq + m * a.n_pad + k));
        }
        if (k < ke) {
          __m256i w0, w1;
          lev.unit(row, a.plane1, k, w0, w1);
          for (int m = 0; m < M; ++m) {
            const __m256i* xv = reinterpret_cast<const __m256i*>(xq + m * a.n_pad + k);
            acc[m] = _mm256_add_epi32(acc[m], _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                                               _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1))));
          }
        }
        for (int m = 0; m < M; ++m)
          facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(s * xs[m * a.G + g]), facc[m]);
      }
      if (a.m)
        for (int m = 0; m < M; ++m) roff[m] += half_to_float(a.m, o * a.G + g) * xsum[m * a.G + g];
    }
    const float b = bias ? bias[o] : 0.f;
    for (int m = 0; m < M; ++m) y[m * O + o] = hsum(facc[m]) + roff[m] + b;
  }
}

template <int BITS>
void gemvq64(const Args& a, bool closed, const int16_t* xq, const float* xs, const float* xsum, const float* bias,
             float* y, int64_t M, int64_t O, int64_t grain) {
  LevQ<BITS> lev;
  if (a.A == 1) {
    if (closed) lev.load_closed(a.tab[0]); else lev.load(a.tab);
  }
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    if (M == 1 && a.A == 1) {
      const bool fixed = a.s && !a.m && a.G > 1;
      if (fixed && a.gs == 64) gemvq_m1<BITS, 1>(a, lev, xq, xs, xsum, bias, y, o0, o1);
      else if (fixed && a.gs == 128) gemvq_m1<BITS, 2>(a, lev, xq, xs, xsum, bias, y, o0, o1);
      else gemvq_m1<BITS, 0>(a, lev, xq, xs, xsum, bias, y, o0, o1);
      return;
    }
    for (int64_t m = 0; m < M; m += 4) {
      const int16_t* xm = xq + m * a.n_pad;
      const float* sm = xs + m * a.G;
      const float* um = xsum + m * a.G;
      float* ym = y + m * O;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: gemvq64_rows<BITS, 1>(a, lev, closed, xm, sm, um, bias, ym, O, o0, o1); break;
        case 2: gemvq64_rows<BITS, 2>(a, lev, closed, xm, sm, um, bias, ym, O, o0, o1); break;
        case 3: gemvq64_rows<BITS, 3>(a, lev, closed, xm, sm, um, bias, ym, O, o0, o1); break;
        default: gemvq64_rows<BITS, 4>(a, lev, closed, xm, sm, um, bias, ym, O, o0, o1); break;
      }
    }
  });
}

// decoded rows o0..o1 of W into buf (o1 - o0, n_pad) fp32: T[c] * s (+ m)
template <int BITS, class Dec>
void decode_rows(const Args& a, float* buf, int64_t o0, int64_t o1, int64_t base) {
  constexpr int T = std::is_same_v<Dec, Closed<BITS>> || std::is_same_v<Dec, Closed<BITS, false>> ? 1 : 1 << BITS;
  Dec tab;
  if (a.A == 1) tab.load(a.tab);
  for (int64_t o = o0; o < o1; ++o) {
    if (a.A != 1) tab.load(a.tab + o * T);
    const uint32_t* row = a.q + o * a.W;
    float* out = buf + (o - base) * a.n_pad;
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t c0 = g * a.gs / 8;
      const int64_t c1 = (g == a.G - 1) ? a.n_pad / 8 : (g + 1) * a.gs / 8;
      const __m256 sv = _mm256_set1_ps(a.s ? half_to_float(a.s, o * a.G + g) : 1.f);
      const __m256 mv = _mm256_set1_ps(a.m ? half_to_float(a.m, o * a.G + g) : 0.f);
      for (int64_t c = c0; c < c1; ++c)
        _mm256_storeu_ps(out + 8 * c, _mm256_fmadd_ps(tab.lookup(codes8<BITS>(row, a.plane1, c)), sv, mv));
    }
  }
}

template <int BITS, class Dec>
void gemv(const Args& a, const float* xp, const float* xs, const float* bias, float* y,
          int64_t M, int64_t O, int64_t grain) {
  at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t m = 0; m < M; m += 4) {
      const float* xm = xp + m * a.n_pad;
      const float* sm = xs + m * a.G;
      float* ym = y + m * O;
      switch (std::min<int64_t>(4, M - m)) {
        case 1: gemv_rows<BITS, Dec, 1>(a, xm, sm, bias, ym, O, o0, o1); break;
        case 2: gemv_rows<BITS, Dec, 2>(a, xm, sm, bias, ym, O, o0, o1); break;
        case 3: gemv_rows<BITS, Dec, 3>(a, xm, sm, bias, ym, O, o0, o1); break;
        default: gemv_rows<BITS, Dec, 4>(a, xm, sm, bias, ym, O, o0, o1); break;
      }
    }
  });
}

// f(Decoder<bits>{}): the table in registers / L1, or the qins closed form (bits 6, 8)
template <typename F>
void by_bits(int64_t bits, bool closed, F&& f, bool approx = false) {
  TORCH_CHECK(!closed || bits == 6 || bits == 8, "qins cpu: the closed form is built for 6 and 8 bits");
  switch (bits) {
    case 2: f(Table<2>{}); break;
    case 3: f(Table<3>{}); break;
    case 4: f(Table<4>{}); break;
    case 5: f(Table<5>{}); break;
    case 6: if (closed) f(Closed<6>{}); else f(Table<6>{}); break;
    case 8: if (closed && approx) f(Closed<8, false>{}); else if (closed) f(Closed<8>{}); else f(Table<8>{}); break;
    default: TORCH_CHECK(false, "qins cpu: unsupported bit width ", bits);
  }
}
template <class D> struct BitsOf;
template <int B> struct BitsOf<Table<B>> { static constexpr int value = B; };
template <int B, bool N> struct BitsOf<Closed<B, N>> { static constexpr int value = B; };

Args make_args(const at::Tensor& qweight, const c10::optional<at::Tensor>& scales,
               const c10::optional<at::Tensor>& offsets, const at::Tensor& table,
               int64_t bits, int64_t group_size, int64_t in_features, bool closed) {
  TORCH_CHECK(qweight.dtype() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous 2-D int32 tensor");
  TORCH_CHECK(table.dtype() == at::kFloat && table.dim() == 2 && table.is_contiguous() &&
              table.size(1) == (closed ? 1 : int64_t(1) << bits),
              "table must be a contiguous (A, 2^bits) float32 tensor (closed: (A, 1) curvatures)");
  TORCH_CHECK(table.size(0) == 1 || table.size(0) == qweight.size(0), "table rows must be 1 or O");
  const int64_t O = qweight.size(0);
  const int64_t n_pad = (in_features + 31) / 32 * 32;
  const Planes P = planes_of(int(bits));
  int64_t words = 0;
  for (int i = 0; i < P.n; ++i) words += n_pad * P.width[i] / 32;
  TORCH_CHECK(qweight.size(1) == words, "qweight has ", qweight.size(1), " words per row, expected ", words);
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t G = std::max<int64_t>(1, in_features / group_size);
  TORCH_CHECK(G == 1 || group_size % 32 == 0, "group_size must be a multiple of 32 (or cover the row)");
  Args a;
  a.q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  a.W = words;
  a.s = nullptr; a.m = nullptr;
  for (auto* t : {&scales, &offsets}) {
    if (t->has_value()) {
      const at::Tensor& v = t->value();
      TORCH_CHECK(v.dtype() == at::kHalf && v.is_contiguous() && v.dim() == 2 && v.size(0) == O && v.size(1) == G,
                  "scales/offsets must be contiguous (O, G) float16");
    }
  }
  if (scales.has_value()) a.s = scales->data_ptr<at::Half>();
  if (offsets.has_value()) a.m = offsets->data_ptr<at::Half>();
  a.G = G;
  a.tab = table.data_ptr<float>();
  a.A = table.size(0);
  a.gs = group_size;
  a.n_pad = n_pad;
  a.plane1 = n_pad * P.width[0] / 32;
  return a;
}

// x (M, I) float32 contiguous -> (M, n_pad) zero padded, and (M, G) group sums (offsets only)
std::pair<at::Tensor, at::Tensor> prep_x(const at::Tensor& x, const Args& a, int64_t in_features) {
  at::Tensor xp = x;
  if (a.n_pad != in_features) xp = at::constant_pad_nd(x, {0, a.n_pad - in_features}, 0);
  at::Tensor xs;
  if (a.m) {
    const int64_t M = x.size(0);
    if (a.G == 1) {
      xs = xp.sum(1, true);
    } else {
      at::Tensor head = xp.narrow(1, 0, (a.G - 1) * a.gs).reshape({M, a.G - 1, a.gs}).sum(2);
      at::Tensor last = xp.narrow(1, (a.G - 1) * a.gs, a.n_pad - (a.G - 1) * a.gs).sum(1, true);
      xs = at::cat({head, last}, 1);
    }
    xs = xs.contiguous();
  } else {
    xs = at::zeros({1}, x.options());
  }
  return {xp.contiguous(), xs};
}

// y (M, O) float32 = x (M, I) float32 @ W^T + bias, W decoded in the dot product (M <= small)
at::Tensor gemv_op(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& scales,
                   const c10::optional<at::Tensor>& offsets, const at::Tensor& table,
                   const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                   int64_t in_features, bool closed, int64_t grain, bool approx = false) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.size(1) == in_features, "x must be (M, I) float32");
  Args a = make_args(qweight, scales, offsets, table, bits, group_size, in_features, closed);
  auto [xp, xs] = prep_x(x.contiguous(), a, in_features);
  const int64_t M = x.size(0), O = qweight.size(0);
  at::Tensor y = at::empty({M, O}, x.options());
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value()) { bc = bias->to(at::kFloat).contiguous(); b = bc.data_ptr<float>(); }
  by_bits(bits, closed, [&](auto D) {
    using Dec = decltype(D);
    gemv<BitsOf<Dec>::value, Dec>(a, xp.data_ptr<float>(), xs.data_ptr<float>(), b, y.data_ptr<float>(), M, O, grain);
  }, approx);
  return y;
}

// y (M, O) = x @ W^T + bias in x's dtype (float32, or bfloat16 where the CPU multiplies bf16
// natively) by tiles of `tile` rows: decode a tile into an fp32 buffer (threads over rows),
// round it to x's dtype if that is bf16 (what the reference's decode to bf16 gives), then one
// GEMM per tile; the buffer is the only float weight held.
at::Tensor tiled_op(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& scales,
                    const c10::optional<at::Tensor>& offsets, const at::Tensor& table,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                    int64_t in_features, bool closed, int64_t tile) {
  TORCH_CHECK((x.dtype() == at::kFloat || x.dtype() == at::kBFloat16) && x.dim() == 2 && x.size(1) == in_features,
              "x must be (M, I) float32 or bfloat16");
  Args a = make_args(qweight, scales, offsets, table, bits, group_size, in_features, closed);
  const int64_t M = x.size(0), O = qweight.size(0);
  const bool bf16 = x.dtype() == at::kBFloat16;
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, O}, x.options());
  at::Tensor buf = at::empty({std::min(tile, O), a.n_pad}, x.options().dtype(at::kFloat));
  at::Tensor part = at::empty({M, std::min(tile, O)}, x.options());
  at::Tensor wbuf = bf16 ? at::empty({std::min(tile, O), in_features}, x.options()) : at::Tensor();
  for (int64_t o0 = 0; o0 < O; o0 += tile) {
    const int64_t n = std::min(tile, O - o0);
    float* bp = buf.data_ptr<float>();
    by_bits(bits, closed, [&](auto D) {
      using Dec = decltype(D);
      at::parallel_for(o0, o0 + n, 8, [&](int64_t r0, int64_t r1) {
        decode_rows<BitsOf<Dec>::value, Dec>(a, bp, r0, r1, o0);
      });
    });
    at::Tensor w = buf.narrow(0, 0, n).narrow(1, 0, in_features);
    if (bf16) w = wbuf.narrow(0, 0, n).copy_(w);   // rounded to bf16 into the one tile buffer
    at::Tensor out = part.narrow(1, 0, n);
    at::mm_out(out, xc, w.t());
    y.narrow(1, o0, n).copy_(out);
  }
  if (bias.has_value()) y.add_(bias->to(y.scalar_type()));
  return y;
}

// y (..., O) = x (..., I) @ W^T + bias in x's dtype (fp32, bf16 or fp16), one call per layer:
//   M <= gemv_max, 4/5/6 bits, x16    the int16-activation gemv (gemvq; 6-bit qins closed form too)
//   M <= gemv_max                      the fp32 gemv (gemv; approx: 8-bit qins without the Newton step)
//   larger M, bf16 x, bf16_gemm        bf16 tiles + the CPU's bf16 GEMM (tiled, no fp32 copy of x)
//   larger M                           fp32 tiles + fp32 GEMM (tiled)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& scales,
                     const c10::optional<at::Tensor>& offsets, const at::Tensor& table,
                     const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                     int64_t in_features, bool closed, int64_t grain, int64_t tile, int64_t gemv_max, bool approx,
                     bool bf16_gemm) {
  const bool x16 = approx;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x must be (..., ", in_features, ")");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "x must be float32, bfloat16 or float16");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = qweight.size(0);
  const int64_t M = x.numel() / in_features;
  // generation's path (few float32 rows, 4-6 bits): no tensor but y is made per call
  if (x16 && M <= gemv_max && (bits == 4 || bits == 5 || bits == 6) && (!closed || bits == 6) && M > 0) {
    Args a = make_args(qweight, scales, offsets, table, bits, group_size, in_features, closed);
    at::Tensor xc = dt == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
    thread_local std::vector<int16_t> xq;      // (M, n_pad) int16 x, then (2, M, G) factors, sums
    thread_local std::vector<float> xs;
    xq.resize(M * a.n_pad);
    xs.resize(2 * M * a.G);
    quantize_x64(xc.data_ptr<float>(), M, in_features, a.n_pad, a.gs, a.G, xq.data(), xs.data(),
                 xs.data() + M * a.G, bits == 6);
    at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));
    const float* b = nullptr;
    at::Tensor bc;
    if (bias.has_value()) {
      bc = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
      b = bc.data_ptr<float>();
    }
    auto run = [&](auto f) {
      f(a, closed, xq.data(), xs.data(), xs.data() + M * a.G, b, y.data_ptr<float>(), M, qweight.size(0), grain);
    };
    if (bits == 4) run(gemvq64<4>); else if (bits == 5) run(gemvq64<5>); else run(gemvq64<6>);
    return dt == at::kFloat ? y : y.to(dt);
  }
  if (M > gemv_max && dt == at::kBFloat16 && bf16_gemm) {   // bf16 x, bf16 tiles, the CPU's bf16 GEMM
    at::Tensor xb = x.reshape({-1, in_features}).contiguous();
    return tiled_op(xb, qweight, scales, offsets, table, bias, bits, group_size, in_features, closed, tile)
        .view(out_shape);
  }
  const at::Tensor xf = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  at::Tensor y;
  if (M > gemv_max) {
    y = tiled_op(xf, qweight, scales, offsets, table, bias, bits, group_size, in_features, closed, tile);
  } else {
    y = gemv_op(xf, qweight, scales, offsets, table, bias, bits, group_size, in_features, closed, grain, x16);
  }
  return (dt == at::kFloat ? y : y.to(dt)).view(out_shape);
}

// (O, I) float32: the whole weight decoded (tests compare it with the reference decode)
at::Tensor decode_op(const at::Tensor& qweight, const c10::optional<at::Tensor>& scales,
                     const c10::optional<at::Tensor>& offsets, const at::Tensor& table,
                     int64_t bits, int64_t group_size, int64_t in_features, bool closed) {
  Args a = make_args(qweight, scales, offsets, table, bits, group_size, in_features, closed);
  const int64_t O = qweight.size(0);
  at::Tensor buf = at::empty({O, a.n_pad}, qweight.options().dtype(at::kFloat));
  float* bp = buf.data_ptr<float>();
  by_bits(bits, closed, [&](auto D) {
    using Dec = decltype(D);
    at::parallel_for(0, O, 8, [&](int64_t r0, int64_t r1) { decode_rows<BitsOf<Dec>::value, Dec>(a, bp, r0, r1, 0); });
  });
  return buf.narrow(1, 0, in_features).contiguous();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", [](const at::Tensor& x, const at::Tensor& q, const c10::optional<at::Tensor>& s,
                   const c10::optional<at::Tensor>& o, const at::Tensor& t, const c10::optional<at::Tensor>& b,
                   int64_t bits, int64_t gs, int64_t I, bool closed, int64_t grain) {
          return gemv_op(x, q, s, o, t, b, bits, gs, I, closed, grain, false);
        }, "x @ W^T + b, W decoded inside the dot product (small M), exact decode");
  m.def("tiled", &tiled_op, "x @ W^T + b by decoded tiles of W and a GEMM per tile (large M)");
  m.def("linear", &linear_op, "x @ W^T + b in x's dtype: the gemv (int16 x for 4-bit) or tiles + GEMM by M");
  m.def("decode", &decode_op, "the whole weight decoded to float32");
}
