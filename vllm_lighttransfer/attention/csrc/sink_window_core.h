// Sink + window attention over the paged KV cache, on CPU: the kernel core.
//
// What it does
//   run_items() computes a lazy layer's attention for a range of work
//   items; an item is (request, query tile, KV heads): one KV head when the
//   tile has many rows (prefill), all of them when it has few (decode).
//   Each reads only the key chunks it may attend to, the sink range
//   [0, min(sink, t_last + 1)) and the window range
//   [max(sink, t_first - window + 1), t_last], block by block through the
//   block table, straight from the cache (no gathered copy). Online softmax
//   in float32; the query heads of one KV head are folded into the rows.
//
// Semantics
//   Query at position t attends key k iff k <= t and (k < sink or
//   k > t - window). The sink range and the window range never overlap, so
//   no key is counted twice; inside a chunk a row's allowed keys are one
//   interval [lo, hi). Keys outside both ranges are never loaded, so freed
//   (null) blocks, which may hold anything, are never read.
//
// Layout
//   kv_cache [num_blocks, num_kv_heads, block_size, 2 * head_size], any
//   strides but a contiguous last dimension: key in [..., :D], value in
//   [..., D:], as paged.py's write_kv stores them.
//
// Cost
//   A tile of Q queries reads sink + window + Q - 1 keys once for all its
//   Q x (heads per KV head) rows. Scores: with many rows (prefill), a key
//   chunk is transposed once and every row is a broadcast-FMA over 32 keys;
//   with few rows (decode), dot products straight from the key rows (bf16:
//   pair products, 16 keys' partial sums reduced by one add tree). A decode
//   item covers every KV head of its request, so it reads each block's
//   heads as one contiguous stretch, and prefetches the next block into L2.
//   P @ V: up to four rows at a time (no padding rows in decode),
//   accumulators in registers. exp: a polynomial on whole vectors (libm's
//   scalar exp dominated otherwise).
//
// Portability
//   Plain C++ with GCC/Clang vector extensions (16 floats): the compiler
//   lowers them to AVX-512, AVX2 (two halves) or NEON, whatever -march
//   allows. No torch headers: the torch binding (sink_window_cpu.cpp)
//   includes this file; so can a stand-alone harness.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lt {

// One native vector: 16 floats with AVX-512, else 8 (AVX2, NEON pairs...).
#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
constexpr int KC = 32;            // keys per chunk
constexpr int NK = KC / VL;       // vectors per chunk row
// AVX512-BF16 (vdpbf16ps: 32 bf16 products per instruction, float32 sums)
// for the two matrix products of bfloat16 caches with many rows.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool HAS_BF16_DOT = true;
#else
constexpr bool HAS_BF16_DOT = false;
#endif
constexpr float NEG = -1.0e30f;   // a masked score: finite (-ffast-math assumes no inf)

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(f16 x) { return static_cast<float>(*reinterpret_cast<const _Float16*>(&x.bits)); }

inline void from_f(float v, float* d) { *d = v; }
inline void from_f(float v, bf16* d) {
  // Round to nearest even, as torch does.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
    d->bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  d->bits = static_cast<uint16_t>(u >> 16);
}
inline void from_f(float v, f16* d) {
  _Float16 h = static_cast<_Float16>(v);
  std::memcpy(&d->bits, &h, 2);
}

template <typename T>
inline void load_row(const T* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}
template <>
inline void load_row<bf16>(const bf16* __restrict src, float* __restrict dst, int n) {
  // bfloat16 is the top half of a float32: a shift the compiler vectorises.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  for (int i = 0; i < n; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef _Float16 vhf __attribute__((vector_size(VL * 2)));

// One vector of VL elements of the cache's dtype, as floats.
inline vf vload_cvt(const float* p) { return vload(p); }
inline vf vload_cvt(const bf16* p) {
#if defined(__AVX512F__)
  // Two instructions: widen to 32 bits, shift into the high half.
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  vf f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#elif defined(__AVX2__)
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  vf f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#else
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
inline vf vload_cvt(const f16* p) {
  vhf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vf);
}

inline vf vsplat(float x) { return vf{} + x; }
inline float vsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) for x <= 0 (scores minus their running max), whole vectors:
// 2^n * 2^f with |f| <= 1/2 and 2^f by its degree-6 Taylor polynomial
// (relative error below 2e-7); inputs below -87 give about 1e-38.
inline vf vexp(vf x) {
  x = vmax(x, vsplat(-87.0f));
  const vf y = x * 1.44269504088896341f;
  const vi n = __builtin_convertvector(y - 0.5f, vi);  // toward zero: round for y <= 0
  const vf f = y - __builtin_convertvector(n, vf);
  vf p = vsplat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline float sexp(float x) { return vexp(vsplat(x))[0]; }

struct Params {
  const void* query;    // [T, H, D]
  int64_t q_s0, q_s1;   // strides (elements)
  const void* kv;       // [NB, Hkv, BS, 2D]
  int64_t kv_sb, kv_sh, kv_ss;
  void* out;            // [>= T, H, D]
  int64_t o_s0, o_s1;
  const int32_t* qsl;   // [R + 1]
  const int32_t* seq_lens;  // [R]
  const int32_t* table;     // [R, max_blocks]
  int64_t table_stride;
  int num_reqs, num_heads, num_kv_heads, head_size, block_size;
  int64_t sink, window;
  float scale;
  int tile;
};

struct Item {
  int32_t req, j0, j1, h0, h1;  // queries [j0, j1) of request req, KV heads [h0, h1)
};

inline std::vector<Item> make_items(const Params& p) {
  std::vector<Item> items;
  for (int r = 0; r < p.num_reqs; ++r) {
    const int q_len = p.qsl[r + 1] - p.qsl[r];
    for (int j0 = 0; j0 < q_len; j0 += p.tile) {
      const int j1 = std::min(q_len, j0 + p.tile);
      if ((j1 - j0) * (p.num_heads / p.num_kv_heads) < 8) {
        // Few rows (decode): one item reads every KV head of a block in a
        // row, one contiguous stretch of the cache instead of one per head.
        items.push_back({r, j0, j1, 0, p.num_kv_heads});
      } else {
        for (int h = 0; h < p.num_kv_heads; ++h) items.push_back({r, j0, j1, h, h + 1});
      }
    }
  }
  return items;
}

// Scratch reused across the items of one thread.
struct Scratch {
  std::vector<float> qf, acc, kt, kr, vb, s, m, l;
  std::vector<uint32_t> qb, kt2, v2;  // bf16 pairs (AVX512-BF16 path)
  std::vector<int64_t> tpos;
};

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// Scores of every row against one key chunk on bf16 pairs: the chunk's keys
// transposed as 32-bit words (two bf16 of one key), each query pair
// broadcast; sc = (q . k) * scale.
template <int D>
inline void bf16_dot_scores(Scratch& w, const uint32_t* qb_rows, const uint16_t* kp, int64_t ks, int n,
                            int rows_pad, float scale, float* sc) {
  constexpr int P = D / 2;  // pairs per row
  uint32_t* kt2 = w.kt2.data();  // [P, KC]
  for (int k = 0; k < n; ++k) {
    const uint32_t* kw = reinterpret_cast<const uint32_t*>(kp + k * ks);
    for (int q = 0; q < P; ++q) kt2[q * KC + k] = kw[q];
  }
  for (int q = 0; q < P; ++q)
    for (int k = n; k < KC; ++k) kt2[q * KC + k] = 0u;
  const __m512 sv = _mm512_set1_ps(scale);
  for (int i = 0; i < rows_pad; i += 8) {
    const uint32_t* qb = qb_rows + static_cast<size_t>(i) * P;
    __m512 a[8][2];
    for (int u = 0; u < 8; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
    for (int q = 0; q < P; ++q) {
      const __m512i k0 = _mm512_loadu_si512(kt2 + q * KC);
      const __m512i k1 = _mm512_loadu_si512(kt2 + q * KC + 16);
      for (int u = 0; u < 8; ++u) {
        const __m512i x = _mm512_set1_epi32(static_cast<int>(qb[u * P + q]));
        a[u][0] = _mm512_dpbf16_ps(a[u][0], (__m512bh)k0, (__m512bh)x);
        a[u][1] = _mm512_dpbf16_ps(a[u][1], (__m512bh)k1, (__m512bh)x);
      }
    }
    for (int u = 0; u < 8; ++u) {
      _mm512_storeu_ps(sc + (i + u) * KC, _mm512_mul_ps(a[u][0], sv));
      _mm512_storeu_ps(sc + (i + u) * KC + 16, _mm512_mul_ps(a[u][1], sv));
    }
  }
}

// The chunk's values interleaved as words (V[2j][d], V[2j+1][d]), once per
// chunk; a missing last odd key is 0.
template <int D>
inline void bf16_pair_values(Scratch& w, const uint16_t* vp, int64_t vs, int n) {
  uint32_t* v2 = w.v2.data();  // [KC / 2, D]
  for (int j = 0; j < (n + 1) / 2; ++j) {
    const uint16_t* lo = vp + (2 * j) * vs;
    if (2 * j + 1 < n) {
      const uint16_t* hi = lo + vs;
      for (int d = 0; d < D; ++d)
        v2[j * D + d] = static_cast<uint32_t>(lo[d]) | (static_cast<uint32_t>(hi[d]) << 16);
    } else {
      for (int d = 0; d < D; ++d) v2[j * D + d] = static_cast<uint32_t>(lo[d]);
    }
  }
}

// o[u] += P[u, :n] @ V[:n] on bf16 pairs for RB rows (probability rows
// p0r, stride KC; zero past n), values from bf16_pair_values.
template <int D, int RB>
inline void bf16_dot_values(Scratch& w, int n, const float* p0r, vf (&o)[RB][D / VL]) {
  constexpr int NV = D / VL;
  const uint32_t* v2 = w.v2.data();
  const int pairs = (n + 1) / 2;
  // Probabilities as bf16 pairs: word j = (p[2j], p[2j + 1]).
  uint32_t pb[RB][KC / 2];
  for (int u = 0; u < RB; ++u) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p0r + u * KC + 16), _mm512_loadu_ps(p0r + u * KC));
    std::memcpy(pb[u], &b, sizeof(pb[u]));
  }
  __m512 acc[RB][NV];
  for (int u = 0; u < RB; ++u)
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[u][v], &o[u][v], sizeof(__m512));
  for (int j = 0; j < pairs; ++j) {
    __m512i vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_si512(v2 + j * D + v * 16);
    for (int u = 0; u < RB; ++u) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(pb[u][j]));
      for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_dpbf16_ps(acc[u][v], (__m512bh)vv[v], (__m512bh)x);
    }
  }
  for (int u = 0; u < RB; ++u)
    for (int v = 0; v < NV; ++v) std::memcpy(&o[u][v], &acc[u][v], sizeof(__m512));
}

// Sixteen vectors to one: lane k of the result is the sum of v[k]'s lanes
// (a transposing add tree: 45 instructions for 16 sums, where 16
// horizontal sums take about 130).
inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: lane sums of keys 4j..4j+3
    s2[j] = _mm512_add_ps(_mm512_shuffle_ps(s1[2 * j], s1[2 * j + 1], 0x44),
                          _mm512_shuffle_ps(s1[2 * j], s1[2 * j + 1], 0xEE));
  for (int j = 0; j < 2; ++j)
    s3[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * j], s2[2 * j + 1], 0x88),
                          _mm512_shuffle_f32x4(s2[2 * j], s2[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
}

// Decode scores (few rows): sc[i][k] = (q_i . k_k) * scale for the n keys
// of a chunk, straight from the bf16 key rows: per row and key D / 32
// pair products into one vector, sixteen keys' vectors reduced at once.
template <int D>
inline void bf16_decode_scores(const uint32_t* qb, const uint16_t* kp, int64_t ks, int n, int rows,
                               float scale, float* sc) {
  constexpr int NZ = D / 32;  // vectors per row
  const __m512 sv = _mm512_set1_ps(scale);
  for (int i = 0; i < rows; ++i) {
    __m512i q[NZ];
    for (int z = 0; z < NZ; ++z) q[z] = _mm512_loadu_si512(qb + static_cast<size_t>(i) * (D / 2) + z * 16);
    for (int k0 = 0; k0 < n; k0 += 16) {
      __m512 v[16];
      for (int k = 0; k < 16; ++k) {
        v[k] = _mm512_setzero_ps();
        if (k0 + k < n)
          for (int z = 0; z < NZ; ++z)
            v[k] = _mm512_dpbf16_ps(v[k], (__m512bh)_mm512_loadu_si512(kp + (k0 + k) * ks + z * 32), (__m512bh)q[z]);
      }
      _mm512_storeu_ps(sc + i * KC + k0, _mm512_mul_ps(reduce16(v), sv));
    }
  }
}
#else
template <int D>
inline void bf16_dot_scores(Scratch&, const uint32_t*, const uint16_t*, int64_t, int, int, float, float*) {}
template <int D>
inline void bf16_pair_values(Scratch&, const uint16_t*, int64_t, int) {}
template <int D, int RB>
inline void bf16_dot_values(Scratch&, int, const float*, vf (&)[RB][D / VL]) {}
template <int D>
inline void bf16_decode_scores(const uint32_t*, const uint16_t*, int64_t, int, int, float, float*) {}
#endif

// D: head size when it is a multiple of 16 (vector path); 0: any head size
// (scalar loops, same algorithm).
template <typename T, int D>
void run_item(const Params& p, const Item& it, Scratch& w) {
  const int hs = D > 0 ? D : p.head_size;
  constexpr int NV = D / VL;  // vectors per row (vector path)
  const int group = p.num_heads / p.num_kv_heads;
  const int r = it.req, nh = it.h1 - it.h0;
  const int q_len = p.qsl[r + 1] - p.qsl[r];
  const int64_t ctx = static_cast<int64_t>(p.seq_lens[r]) - q_len;
  const int nq = it.j1 - it.j0;
  const int rows = nq * group;
  const int rows_pad = (rows + 7) / 8 * 8;  // row blocks of 4 and 8 never run past it
  const int64_t t_first = ctx + it.j0, t_last = ctx + it.j1 - 1;
  const T* q_base = static_cast<const T*>(p.query);
  const T* kv_base = static_cast<const T*>(p.kv);
  T* o_base = static_cast<T*>(p.out);

  // Per KV head of the item: rows_pad rows of queries, accumulators, max, sum.
  const size_t hstride = static_cast<size_t>(rows_pad) * hs;
  // bf16 caches with AVX512-BF16 and a head size that is a multiple of 32
  // take both products on bf16 pairs (queries as stored, in w.qb); the
  // others on float queries, pre-scaled (w.qf).
  constexpr bool dp_type = HAS_BF16_DOT && std::is_same<T, bf16>::value && D > 0 && D % 32 == 0;
  if (!dp_type) w.qf.assign(nh * hstride, 0.f);
  w.acc.assign(nh * hstride, 0.f);
  w.m.assign(static_cast<size_t>(nh) * rows_pad, NEG);
  w.l.assign(static_cast<size_t>(nh) * rows_pad, 0.f);
  w.s.assign(static_cast<size_t>(rows_pad) * KC, 0.f);
  w.tpos.assign(rows_pad, -1);
  w.kt.resize(static_cast<size_t>(hs) * KC);
  w.kr.resize(static_cast<size_t>(hs) * KC);
  w.vb.resize(static_cast<size_t>(hs) * KC);
  for (int jj = 0; jj < nq; ++jj) {
    const T* qrow = q_base + (p.qsl[r] + it.j0 + jj) * p.q_s0;
    for (int g = 0; g < group; ++g) {
      const int i = jj * group + g;
      if constexpr (!dp_type)
        for (int hh = 0; hh < nh; ++hh) {
          float* dst = w.qf.data() + hh * hstride + static_cast<size_t>(i) * hs;
          load_row<T>(qrow + ((it.h0 + hh) * group + g) * p.q_s1, dst, hs);
          for (int d = 0; d < hs; ++d) dst[d] *= p.scale;
        }
      w.tpos[i] = t_first + jj;
    }
  }
  const int32_t* row_table = p.table + r * p.table_stride;
  const bool many = rows >= 8;
  // bf16 cache, many rows, AVX512-BF16: both products on bf16 pairs
  // (queries and keys as stored, probabilities rounded to bf16 like a
  // bf16 flash kernel's), float32 accumulation.
  const bool dp = dp_type && many;
  if (dp_type) {
    w.qb.assign(nh * hstride / 2, 0u);
    if (dp) w.kt2.resize(static_cast<size_t>(hs / 2) * KC);
    w.v2.resize(static_cast<size_t>(KC / 2) * hs);
    for (int jj = 0; jj < nq; ++jj) {
      const T* qrow = q_base + (p.qsl[r] + it.j0 + jj) * p.q_s0;
      for (int g = 0; g < group; ++g)
        for (int hh = 0; hh < nh; ++hh)
          std::memcpy(w.qb.data() + hh * hstride / 2 + static_cast<size_t>(jj * group + g) * (hs / 2),
                      qrow + ((it.h0 + hh) * group + g) * p.q_s1, sizeof(uint16_t) * hs);
    }
  }

  // The next chunk's keys and values into L2 while this one is computed: the
  // blocks of a request lie anywhere in the cache, so the hardware sees a
  // new stream every block (decode over many requests waits on memory).
  auto prefetch = [&](int64_t p0, int n) {
#if defined(__AVX2__) || defined(__AVX512F__)
    const int64_t blk = row_table[p0 / p.block_size];
    for (int hh = 0; hh < nh; ++hh) {
      const char* c = reinterpret_cast<const char*>(kv_base + blk * p.kv_sb + (it.h0 + hh) * p.kv_sh +
                                                    (p0 % p.block_size) * p.kv_ss);
      const int64_t bytes = ((n - 1) * p.kv_ss + 2 * hs) * static_cast<int64_t>(sizeof(T));
      for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
    }
#else
    (void)p0;
    (void)n;
#endif
  };

  // Keys [p0, p0 + n) (one block) against the rows of KV head hh.
  auto chunk = [&](int64_t p0, int n, int hh) {
    const int64_t blk = row_table[p0 / p.block_size];
    const T* kp = kv_base + blk * p.kv_sb + (it.h0 + hh) * p.kv_sh + (p0 % p.block_size) * p.kv_ss;
    const float* qf = dp_type ? nullptr : w.qf.data() + hh * hstride;
    float* acc = w.acc.data() + hh * hstride;
    float* m = w.m.data() + hh * rows_pad;
    float* l = w.l.data() + hh * rows_pad;
    const uint32_t* qb = dp_type ? w.qb.data() + hh * hstride / 2 : nullptr;
    float* vb = w.vb.data();
    float* sc = w.s.data();
    // Values as floats once per chunk when many rows will read them; with
    // few rows (decode) they are read and converted in place.
    if (D == 0 || (many && !dp))
      for (int k = 0; k < n; ++k) load_row<T>(kp + k * p.kv_ss + hs, vb + k * hs, hs);
    if (dp) {
      if constexpr (dp_type) {
        bf16_dot_scores<D>(w, qb, reinterpret_cast<const uint16_t*>(kp), p.kv_ss, n, rows_pad, p.scale, sc);
        bf16_pair_values<D>(w, reinterpret_cast<const uint16_t*>(kp + hs), p.kv_ss, n);
      }
    } else if (many) {
      float* kt = w.kt.data();  // [hs, KC]
      float* kr = w.kr.data();
      for (int k = 0; k < n; ++k) load_row<T>(kp + k * p.kv_ss, kr + k * hs, hs);
      for (int k = n; k < KC; ++k) std::memset(kr + k * hs, 0, sizeof(float) * hs);
      for (int d = 0; d < hs; ++d)
        for (int k = 0; k < KC; ++k) kt[d * KC + k] = kr[k * hs + d];
      // SR rows at a time: SR x NK accumulators (16 vectors) in registers.
      constexpr int SR = NK <= 2 ? 8 : 4;
      for (int i = 0; i < rows_pad; i += SR) {
        const float* q0 = qf + static_cast<size_t>(i) * hs;
        vf a[SR][NK] = {};
        for (int d = 0; d < hs; ++d) {
          vf k[NK];
          for (int c = 0; c < NK; ++c) k[c] = vload(kt + d * KC + c * VL);
          for (int u = 0; u < SR; ++u) {
            const float x = q0[u * hs + d];
            for (int c = 0; c < NK; ++c) a[u][c] += x * k[c];
          }
        }
        for (int u = 0; u < SR; ++u)
          for (int c = 0; c < NK; ++c) vstore(sc + (i + u) * KC + c * VL, a[u][c]);
      }
    } else if (dp_type) {
      if constexpr (dp_type)
        bf16_decode_scores<D>(qb, reinterpret_cast<const uint16_t*>(kp), p.kv_ss, n, rows, p.scale, sc);
    } else {
      float* kr = w.kr.data();
      if constexpr (D == 0)
        for (int k = 0; k < n; ++k) load_row<T>(kp + k * p.kv_ss, kr + k * hs, hs);
      if constexpr (D > 0) {
        // Key outer, rows inner: each key row is loaded once for all rows.
        for (int k = 0; k < n; ++k) {
          vf kv[NV];
          for (int v = 0; v < NV; ++v) kv[v] = vload_cvt(kp + k * p.kv_ss + v * VL);
          for (int i = 0; i < rows; ++i) {
            const float* q0 = qf + static_cast<size_t>(i) * hs;
            vf a = vload(q0) * kv[0];
            for (int v = 1; v < NV; ++v) a += vload(q0 + v * VL) * kv[v];
            sc[i * KC + k] = vsum(a);
          }
        }
      } else {
        for (int i = 0; i < rows; ++i) {
          const float* q0 = qf + static_cast<size_t>(i) * hs;
          for (int k = 0; k < n; ++k) {
            const float* kk = kr + k * hs;
            float a = 0.f;
            for (int d = 0; d < hs; ++d) a += q0[d] * kk[d];
            sc[i * KC + k] = a;
          }
        }
      }
    }
    // Mask to each row's interval [lo, hi), online softmax: scores become
    // probabilities (0 outside the interval), rows' running max and sum move.
    const bool in_sink = p0 < p.sink;
    float corr[4];
    for (int i0 = 0; i0 < rows_pad; i0 += 4) {
      bool any = false;
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u;
        float* si = sc + i * KC;
        const int64_t t = w.tpos[i];
        int lo = in_sink ? 0 : static_cast<int>(std::max<int64_t>(0, t - p.window + 1 - p0));
        int hi = t < 0 ? 0 : static_cast<int>(std::min<int64_t>(n, t - p0 + 1));
        if (lo >= hi) {
          corr[u] = 1.f;
          for (int k = 0; k < KC; ++k) si[k] = 0.f;
          continue;
        }
        any = true;
        vi idx = {};
        for (int k = 0; k < VL; ++k) idx[k] = k;
        vf sv[NK];
        float m_chunk = NEG;
        for (int c = 0; c < NK; ++c) {
          const vi kk = idx + c * VL;
          sv[c] = ((kk >= lo) & (kk < hi)) ? vload(si + c * VL) : vsplat(NEG);
          for (int k = 0; k < VL; ++k) m_chunk = std::max(m_chunk, sv[c][k]);
        }
        const float m_new = std::max(m[i], m_chunk);
        corr[u] = sexp(m[i] - m_new);
        vf sum{};
        for (int c = 0; c < NK; ++c) {
          const vi kk = idx + c * VL;
          const vf e = ((kk >= lo) & (kk < hi)) ? vexp(sv[c] - m_new) : vf{};
          sum += e;
          vstore(si + c * VL, e);
        }
        l[i] = l[i] * corr[u] + vsum(sum);
        m[i] = m_new;
      }
      if (!any) continue;
      // acc[i0..i0+3] = acc * corr + P[i0..i0+3, :n] @ V[:n]
      if constexpr (D > 0) {
        // Rows in blocks of RB so the accumulators (RB x NV vectors) stay
        // in registers: 4 rows of 64 floats with AVX-512, 2 with AVX2.
        constexpr int RB = NV * 4 <= 16 ? 4 : (NV * 2 <= 16 ? 2 : 1);
        auto block = [&](auto rows_c, int u0) {
          constexpr int R = decltype(rows_c)::value;
          float* a0 = acc + static_cast<size_t>(i0 + u0) * hs;
          const float* p0r = sc + (i0 + u0) * KC;
          vf o[R][NV];
          for (int u = 0; u < R; ++u)
            for (int v = 0; v < NV; ++v) o[u][v] = vload(a0 + u * hs + v * VL) * corr[u0 + u];
          auto accumulate = [&](auto row_of) {
            for (int k = 0; k < n; ++k) {
              const auto* vr = row_of(k);
              float c[R];
              for (int u = 0; u < R; ++u) c[u] = p0r[u * KC + k];
              for (int v = 0; v < NV; ++v) {
                const vf x = vload_cvt(vr + v * VL);
                for (int u = 0; u < R; ++u) o[u][v] += c[u] * x;
              }
            }
          };
          if (dp) {
            if constexpr (dp_type) bf16_dot_values<D, R>(w, n, p0r, o);
          } else if (many)
            accumulate([&](int k) { return vb + k * hs; });
          else
            accumulate([&](int k) { return kp + k * p.kv_ss + hs; });
          for (int u = 0; u < R; ++u)
            for (int v = 0; v < NV; ++v) vstore(a0 + u * hs + v * VL, o[u][v]);
        };
        for (int u0 = 0; u0 < 4; u0 += RB) {
          // Few rows (decode: the query heads of one KV head, often 3 or
          // 7): exactly the rows there are, no padding rows.
          const int left = many ? RB : rows - (i0 + u0);
          if (left <= 0) break;
          if (left >= RB)
            block(std::integral_constant<int, RB>{}, u0);
          else if (left == 3)
            block(std::integral_constant<int, 3>{}, u0);
          else if (left == 2)
            block(std::integral_constant<int, 2>{}, u0);
          else
            block(std::integral_constant<int, 1>{}, u0);
        }
      } else {
        for (int u = 0; u < 4; ++u) {
          float* ai = acc + static_cast<size_t>(i0 + u) * hs;
          const float* pi = sc + (i0 + u) * KC;
          for (int d = 0; d < hs; ++d) ai[d] *= corr[u];
          for (int k = 0; k < n; ++k)
            for (int d = 0; d < hs; ++d) ai[d] += pi[k] * vb[k * hs + d];
        }
      }
    }
  };

  auto chunk_len = [&](int64_t pos, int64_t b) {
    const int64_t block_end = (pos / p.block_size + 1) * p.block_size;
    return static_cast<int>(std::min<int64_t>(std::min<int64_t>(b, block_end), pos + KC) - pos);
  };
  auto range = [&](int64_t a, int64_t b) {
    for (int64_t pos = a; pos < b;) {
      const int n = chunk_len(pos, b);
      if (pos + n < b) prefetch(pos + n, chunk_len(pos + n, b));
      for (int hh = 0; hh < nh; ++hh) chunk(pos, n, hh);
      pos += n;
    }
  };
  range(0, std::min<int64_t>(p.sink, t_last + 1));
  range(std::max<int64_t>(p.sink, t_first - p.window + 1), t_last + 1);

  for (int jj = 0; jj < nq; ++jj) {
    T* orow = o_base + (p.qsl[r] + it.j0 + jj) * p.o_s0;
    for (int hh = 0; hh < nh; ++hh)
      for (int g = 0; g < group; ++g) {
        const int i = jj * group + g;
        const float inv = 1.f / w.l[hh * rows_pad + i];
        const float* ai = w.acc.data() + hh * hstride + static_cast<size_t>(i) * hs;
        T* dst = orow + ((it.h0 + hh) * group + g) * p.o_s1;
        for (int d = 0; d < hs; ++d) from_f(ai[d] * inv, dst + d);
      }
  }
}

template <typename T>
void run_items(const Params& p, const Item* items, int64_t begin, int64_t end) {
  Scratch w;
  for (int64_t i = begin; i < end; ++i) {
    switch (p.head_size) {
      case 64: run_item<T, 64>(p, items[i], w); break;
      case 128: run_item<T, 128>(p, items[i], w); break;
      case 32: run_item<T, 32 % VL == 0 ? 32 : 0>(p, items[i], w); break;
      default: run_item<T, 0>(p, items[i], w); break;
    }
  }
}

}  // namespace lt
