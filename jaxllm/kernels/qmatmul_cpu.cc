// Weight-only quantized matmul for XLA:CPU: y [M, O] = x [M, I] @ dequantize(W) [I, O].
//
// Why this exists: XLA:CPU never fuses an int8 -> float convert into a dot, so the XLA
// formulations in quantize.py read int8 weights no faster than float32 ones (see
// benchmarks/RESULTS.md). Decoding a few rows of x is bound by reading the weight, so here
// each 16-column slice of a weight row is loaded as bytes, widened to floats in registers and
// multiplied at once: memory traffic is the int8 (or packed int4) bytes and nothing else.
//
// The same tiles multiply float32 weights (bits 32, no scales; model.py's `linear` for decode-sized
// x): XLA:CPU's dot reads a [M > 1, I] @ [I, O] float32 product at under half the memory bandwidth.
//
// Layouts (quantize.py): bits 8: values int8 [I, O], scales f32 [1, O], one per column.
// bits 4: values uint8 [I/2, O], scales f32 [I/G, O]; in group k, packed row k*G/2 + j holds
// input row k*G + j in its low nibble and k*G + G/2 + j in its high nibble (two's complement).
//
// Work is split into column chunks handed out through an atomic counter. The calling thread
// takes chunks too and waits only for chunks another thread has already started, so a task
// that XLA's pool runs late finds nothing left to do: no deadlock, whatever the pool's state.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define JAXLLM_AVX512 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* x;     // [M, I]
  const uint8_t* w;   // rows x O: [I, O] int8 or float32, [I/2, O] packed int4; tiled: [ceil(O/T), rows, T]
  const float* s;     // [I/G, O] (none for float32 weights)
  float* y;           // [M, O]
  int64_t m, i, o, bits, group;
  int64_t tile = 0;   // T > 0: column tiles of T stored one after another (zero-padded past O)
  int64_t rows = 0;   // stored rows: I (int8, float32) or I/2 (int4)
  int64_t size = 1;   // bytes per stored element: 4 for float32 weights
  int64_t k0 = 0, k1 = 0;  // input rows this pass adds into y: all of them, or a block of a float32 weight
};

// Where stored row k, column c lives, and the distance between rows of one tile.
inline const uint8_t* at(const Problem& p, int64_t k, int64_t c) {
  return p.w + p.size * (p.tile ? (c / p.tile) * p.rows * p.tile + k * p.tile + c % p.tile : k * p.o + c);
}
inline int64_t row_stride(const Problem& p) { return p.tile ? p.tile : p.o; }

// ------------------------------------------------------------------------ portable reference
// Used for column tails narrower than one vector, and for whole problems without AVX-512.

void columns_scalar(const Problem& p, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < p.m; ++r) {
    const float* xr = p.x + r * p.i;
    for (int64_t c = c0; c < c1; ++c) {
      float acc = 0.f;
      if (p.bits == 32) {
        acc = p.k0 ? p.y[r * p.o + c] : 0.f;
        for (int64_t k = p.k0; k < p.k1; ++k) acc += xr[k] * *reinterpret_cast<const float*>(at(p, k, c));
      } else if (p.bits == 8) {
        for (int64_t k = 0; k < p.i; ++k) acc += xr[k] * float(int8_t(*at(p, k, c)));
        acc *= p.s[c];
      } else {
        const int64_t half = p.group / 2;
        for (int64_t g = 0; g < p.i / p.group; ++g) {
          float gacc = 0.f;
          for (int64_t j = 0; j < half; ++j) {
            const int8_t b = static_cast<int8_t>(*at(p, g * half + j, c));
            const int lo = int8_t(b << 4) >> 4, hi = b >> 4;
            gacc += xr[g * p.group + j] * float(lo) + xr[g * p.group + half + j] * float(hi);
          }
          acc += gacc * p.s[g * p.o + c];
        }
      }
      p.y[r * p.o + c] = acc;
    }
  }
}

#ifdef JAXLLM_AVX512
// ------------------------------------------------------------------------ AVX-512 tiles
// A tile is MT rows of x times NV vectors of 16 columns, its accumulators held in registers.

constexpr int kLanes = 16;
constexpr int64_t kPrefetchRows = 12;  // 6-24 measured the same end to end
// A float32 weight goes through in blocks of this many input rows: each pass of a tile over a
// block prefetches its columns of the next block into L2, so for M > 2 (several passes over a
// block, each reading one slice of its columns) the loads of the next block overlap this one's
// FMAs. One pass over all rows, or prefetching into L1, measured up to 1.5x slower at M = 8.
constexpr int64_t kF32Rows = 64;

// Prefetches stored row k + Ahead of this tile's columns, or, near the tile's last row, the
// first rows of the next tile (columns from next_c): each tile then starts warm. Always inlined:
// a call inside a tile's loop would clobber its accumulators (measured 1.6x slower at M = 8).
template <int NV, int64_t Size = 1, int64_t Ahead = kPrefetchRows, int Hint = _MM_HINT_T0>
__attribute__((always_inline)) inline void prefetch_ahead(const Problem& p, int64_t rows, int64_t k, int64_t c0, int64_t next_c) {
  int64_t t = k + Ahead, c = c0;
  if (t >= rows) {
    if (next_c < 0) return;
    t -= rows;
    c = next_c;
  }
  const uint8_t* a = at(p, t, c);
  for (int64_t b = 0; b < NV * kLanes * Size; b += 64) _mm_prefetch(reinterpret_cast<const char*>(a + b), static_cast<_mm_hint>(Hint));
}

// Lanes of the vector at column c that hold real columns (a tiled weight's last tile is padded).
inline __mmask16 valid(const Problem& p, int64_t c) {
  const int64_t n = p.o - c;
  return n >= kLanes ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

inline __m512 widen_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// How a tile reads one 16-column vector of a stored row, whether columns have a scale, and how
// far ahead (rows) and into which cache it prefetches. A float32 weight prefetches one block of
// rows ahead (kF32Rows) into L2.
struct Int8 {
  static constexpr int64_t size = 1, ahead = kPrefetchRows;
  static constexpr int hint = _MM_HINT_T0;
  static constexpr bool scaled = true;
  static __m512 load(const uint8_t* a) { return widen_i8(a); }
};
struct Float32 {
  static constexpr int64_t size = 4, ahead = kF32Rows;
  static constexpr int hint = _MM_HINT_T1;
  static constexpr bool scaled = false;
  static __m512 load(const uint8_t* a) { return _mm512_loadu_ps(reinterpret_cast<const float*>(a)); }
};

template <int MT, int NV, class E>  // int8 or float32 weights: one element per input row
void tile_dense(const Problem& p, int64_t r0, int64_t c0, int64_t next_c) {
  __m512 acc[MT][NV];  // a later block of rows adds to what the earlier ones left in y
  for (int r = 0; r < MT; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = p.k0 ? _mm512_maskz_loadu_ps(valid(p, c0 + v * kLanes), p.y + (r0 + r) * p.o + c0 + v * kLanes)
                       : _mm512_setzero_ps();
  const uint8_t* w = at(p, 0, c0);
  const int64_t ld = row_stride(p) * E::size;
  const float* x = p.x + r0 * p.i;
  for (int64_t k = p.k0; k < p.k1; ++k) {
    const uint8_t* row = w + k * ld;
    prefetch_ahead<NV, E::size, E::ahead, E::hint>(p, p.i, k, c0, next_c);
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = E::load(row + v * kLanes * E::size);
    for (int r = 0; r < MT; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * p.i + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xb, wv[v], acc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + v * kLanes;
    const __mmask16 ok = valid(p, c);
    const __m512 scale = E::scaled ? _mm512_maskz_loadu_ps(ok, p.s + c) : _mm512_set1_ps(1.f);
    for (int r = 0; r < MT; ++r) _mm512_mask_storeu_ps(p.y + (r0 + r) * p.o + c, ok, E::scaled ? _mm512_mul_ps(acc[r][v], scale) : acc[r][v]);
  }
}

template <int MT, int NV>
void tile_int4(const Problem& p, int64_t r0, int64_t c0, int64_t next_c) {
  // Each group's integer products accumulate in registers (gacc); the group's scale is applied
  // once per group, into the tile's running sums (acc).
  const int64_t half = p.group / 2;
  const float* x = p.x + r0 * p.i;
  const __m512 nibbles = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const uint8_t* w = at(p, 0, c0);
  const int64_t ld = row_stride(p);
  __m512 acc[MT][NV];
  for (int r = 0; r < MT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.i / p.group; ++g) {
    __m512 gacc[MT][NV];
    for (int r = 0; r < MT; ++r)
      for (int v = 0; v < NV; ++v) gacc[r][v] = _mm512_setzero_ps();
    const float* xg = x + g * p.group;
    for (int64_t j = 0; j < half; ++j) {
      const uint8_t* row = w + (g * half + j) * ld;
      prefetch_ahead<NV>(p, p.i / 2, g * half + j, c0, next_c);
      for (int v = 0; v < NV; ++v) {
        // A nibble indexes a 16-entry table of its two's-complement values: vpermps reads only
        // the low 4 bits of each lane, so the low nibble needs no masking and both skip a convert.
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + v * kLanes)));
        const __m512 lo = _mm512_permutexvar_ps(b, nibbles);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), nibbles);
        for (int r = 0; r < MT; ++r) {
          gacc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(xg[r * p.i + j]), lo, gacc[r][v]);
          gacc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(xg[r * p.i + half + j]), hi, gacc[r][v]);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const __m512 scale = _mm512_maskz_loadu_ps(valid(p, c0 + v * kLanes), p.s + g * p.o + c0 + v * kLanes);
      for (int r = 0; r < MT; ++r) acc[r][v] = _mm512_fmadd_ps(gacc[r][v], scale, acc[r][v]);
    }
  }
  for (int v = 0; v < NV; ++v)
    for (int r = 0; r < MT; ++r)
      _mm512_mask_storeu_ps(p.y + (r0 + r) * p.o + c0 + v * kLanes, valid(p, c0 + v * kLanes), acc[r][v]);
}

template <int MT, int NV>
void tile(const Problem& p, int64_t r0, int64_t c0, int64_t next_c) {
  if (p.bits == 8) tile_dense<MT, NV, Int8>(p, r0, c0, next_c);
  else if (p.bits == 4) tile_int4<MT, NV>(p, r0, c0, next_c);
  else tile_dense<MT, NV, Float32>(p, r0, c0, next_c);
}

// Rows [r0, r0 + MT) over columns [c0, c1): wide tiles, then single vectors, then a scalar tail.
template <int MT, int NV>
void row_block(const Problem& p, int64_t r0, int64_t c0, int64_t c1) {
  int64_t c = c0;
  if (p.tile) {  // chunks start on tile boundaries, tiles are whole (zero-padded), stores are masked
    for (; c < c1; c += NV * kLanes) tile<MT, NV>(p, r0, c, c + NV * kLanes < c1 ? c + NV * kLanes : -1);
    return;
  }
  auto next = [c1](int64_t c) { return c < c1 ? c : int64_t(-1); };
  for (; c + NV * kLanes <= c1; c += NV * kLanes) tile<MT, NV>(p, r0, c, next(c + NV * kLanes));
  if constexpr (NV > 4) {  // four vectors keep four independent FMA chains per row of x
    for (; c + 4 * kLanes <= c1; c += 4 * kLanes) tile<MT, 4>(p, r0, c, next(c + 4 * kLanes));
  }
  for (; c + kLanes <= c1; c += kLanes) tile<MT, 1>(p, r0, c, next(c + kLanes));
  if (c < c1) {
    Problem rows = p;
    rows.x = p.x + r0 * p.i;
    rows.y = p.y + r0 * p.o;
    rows.m = MT;
    columns_scalar(rows, c, c1);
  }
}

// Rows of x in blocks of eight, then four (then 3, 2 or 1), each block with its own tile width:
// NV8 vectors for blocks of 8 rows, NV4 for 3-4 rows, NV2 for 2 rows, NV1 for one row. Every
// block widens each weight vector once, so fewer, taller blocks widen less per product.
template <int NV8, int NV4, int NV2, int NV1>
void by_rows(const Problem& p, int64_t c0, int64_t c1) {
  int64_t r = 0;
  for (; r + 8 <= p.m; r += 8) row_block<8, NV8>(p, r, c0, c1);
  for (; r + 4 <= p.m; r += 4) row_block<4, NV4>(p, r, c0, c1);
  switch (p.m - r) {
    case 3: row_block<3, NV4>(p, r, c0, c1); break;
    case 2: row_block<2, NV2>(p, r, c0, c1); break;
    case 1: row_block<1, NV1>(p, r, c0, c1); break;
  }
}

void columns(const Problem& p, int64_t c0, int64_t c1) {
  // Register budget: MT * NV accumulators (int4 also holds a group's sums and two widened
  // vectors per NV). Tiled weights take tiles no wider than one stored tile (kTile = 8 vectors).
  if (p.bits == 32) {  // blocks of kF32Rows input rows, each added into y
    Problem block = p;
    for (block.k0 = 0; block.k0 < p.i; block.k0 = block.k1) {
      block.k1 = std::min(p.i, block.k0 + kF32Rows);
      by_rows<2, 4, 8, 8>(block, c0, c1);
    }
  } else if (p.bits == 4) by_rows<1, 2, 4, 8>(p, c0, c1);
  else if (p.tile) by_rows<2, 4, 8, 8>(p, c0, c1);
  else by_rows<2, 4, 8, 16>(p, c0, c1);
}
#else
void columns(const Problem& p, int64_t c0, int64_t c1) {
  Problem all = p;
  all.k1 = p.i;
  columns_scalar(all, c0, c1);
}
#endif

// ------------------------------------------------------------------------ work sharing

constexpr int64_t kTile = 128;  // columns per stored tile (quantize.py's KERNEL_TILE)
constexpr int64_t kBytesPerChunk = 128 << 10;  // no chunk gets less weight than this: handing it to a thread costs more

struct Work {
  Problem p;
  int64_t chunk = 0, n_chunks = 0;  // columns per chunk, chunks
  std::atomic<int64_t> next{0}, done{0};
};

void drain(Work& work) {
  for (int64_t c; (c = work.next.fetch_add(1, std::memory_order_relaxed)) < work.n_chunks;) {
    const int64_t c0 = c * work.chunk;
    columns(work.p, c0, std::min(c0 + work.chunk, work.p.o));
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// Splits p's columns into chunks and multiplies them on the calling thread and the pool's.
void run(ffi::ThreadPool& pool, const Problem& p) {
  auto work = std::make_shared<Work>();
  work->p = p;
  // Up to four chunks per thread (threads that start late still find work), each a multiple
  // of 64 columns (of a whole tile when tiled) and none under kBytesPerChunk of weight.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bytes = p.rows * p.o * p.size, unit = p.tile ? p.tile : 64;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(4 * threads, bytes / kBytesPerChunk));
  work->chunk = ((p.o + want - 1) / want + unit - 1) / unit * unit;
  work->n_chunks = (p.o + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min(threads, work->n_chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { drain(*work); });
  drain(*work);
  while (work->done.load(std::memory_order_acquire) < work->n_chunks) std::this_thread::yield();
}

ffi::Error qmatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> s,
                   ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group, int64_t tile) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || sd.size() != 2 || wd.size() != (tile ? 3 : 2))
    return ffi::Error::InvalidArgument("qmatmul: x and scales must be 2-D, w 2-D (3-D when tiled)");
  const int64_t m = xd[0], i = xd[1], o = sd[1], rows = bits == 8 ? i : i / 2;
  const bool shape_ok = tile ? (tile == kTile && wd[1] == rows && wd[2] == tile && wd[0] == (o + tile - 1) / tile)
                             : (wd[0] == rows && wd[1] == o);
  if ((bits != 8 && bits != 4) || group <= 0 || i % group || (bits == 4 && group % 2) || !shape_ok ||
      sd[0] != i / group || w.element_type() != (bits == 8 ? ffi::S8 : ffi::U8))
    return ffi::Error::InvalidArgument("qmatmul: weight shape, dtype or group size does not match x");
  if (m == 0 || o == 0) return ffi::Error::Success();
  run(pool, Problem{x.typed_data(), static_cast<const uint8_t*>(w.untyped_data()), s.typed_data(), y->typed_data(),
                    m, i, o, bits, group, tile, rows, 1, 0, i});
  return ffi::Error::Success();
}

ffi::Error matmul_f32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[0] != xd[1])
    return ffi::Error::InvalidArgument("matmul_f32: x must be [M, I] and w [I, O]");
  const int64_t m = xd[0], i = xd[1], o = wd[1];
  if (m == 0 || o == 0) return ffi::Error::Success();
  run(pool, Problem{x.typed_data(), reinterpret_cast<const uint8_t*>(w.typed_data()), nullptr, y->typed_data(),
                    m, i, o, 32, i, 0, i, 4, 0, i});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatmul, qmatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatmulF32, matmul_f32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 512 when built with the AVX-512 tiles, 0 for the portable loops (too slow to prefer over XLA).
extern "C" int jaxllm_qmatmul_simd() {
#ifdef JAXLLM_AVX512
  return 512;
#else
  return 0;
#endif
}
