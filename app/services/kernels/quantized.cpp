// Chipi's CPU kernels for quantized linear layers (AVX2, and AVX-512 VNNI where the CPU has it), registered as
// torch.ops.chipi.*.
//
// Weights are stored in blocks of 32 along the input dimension, as llama.cpp's Q4_1 and Q8_0 do:
// - q4: 16 bytes per block, byte j holding the block's weight j in its low nibble and weight j + 16 in its high
//   one, and a float16 scale and min per block (each row's scales, then its mins): weight = scale * q + min, q in 0..15;
// - q8: 32 signed bytes and a float16 scale per block: weight = scale * q.
// A product reads 5 (q4) or 8.5 (q8) bits per weight instead of float32's 32. Each block of 32 activations is rounded
// to 16-bit integers with a scale of its own (a relative error under 2e-5, far below the weights' own rounding), so
// that a block's 32 products are 2 integer multiply-adds (exact in 32-bit sums) instead of 32 float ones; the mins'
// term uses the float activations. The result is what float32 computes on the dequantized weights, to about 1e-5.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/Half.h>
#include <immintrin.h>

// AMX tiles need Linux (which lends them to a process through arch_prctl) and a compiler with their intrinsics.
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define CHIPI_AMX_BUILD 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define CHIPI_AMX_BUILD 0
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
// A block's bytes (q4: 16, q8: 32) and float16 values (q4: its scale and min, q8: its scale).
constexpr int64_t bytes_per_block(bool q4) { return q4 ? kBlock / 2 : kBlock; }
constexpr int64_t scales_per_block(bool q4) { return q4 ? 2 : 1; }
// How many output rows ahead the block kernel asks for weights: the hardware prefetcher alone left a decode step's
// 4-bit products at about 8 GB/s of the 20 that 2 threads stream. 8 rows (4.6 KB of the 8-bit output layer) read
// that layer for one row 8% faster than 4 did on an AMD EPYC (Zen 3); 16 were slower.
constexpr int64_t kPrefetchRows = 8;
// From this many rows on, each tile's product is large enough to share between threads.
constexpr int64_t kLargeRows = 256;

// Calls f(std::integral_constant<int, R>) with R = min(count, kMax) (count >= 1): a batch's row count as the
// compile-time count the block kernels are instantiated for, so each row's sums stay in registers.
template <int kMax, typename F>
inline void with_rows(int64_t count, F&& f) {
  if constexpr (kMax == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (count >= kMax) {
    f(std::integral_constant<int, kMax>{});
  } else {
    with_rows<kMax - 1>(count, f);
  }
}

// Per block: q4 keeps (scale, min), q8 its scale, as float16 bits.
inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// A block's 32 weights as two vectors of 16 16-bit integers: weights 0-15 and 16-31.
template <bool kQ4>
inline void unpack_block(const uint8_t* block, __m256i& first, __m256i& second) {
  if constexpr (kQ4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    first = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, nibble));
    second = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
  } else {
    first = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    second = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16)));
  }
}

// Activations rounded to 16-bit integers per block of 32: x[k] ~ x_scales[k / 32] * x16[k].
struct Rounded {
  const int16_t* x16;
  const float* x_scales;
  const float* block_sums;  // the float sum of each block (for q4's mins)
};

// Adds block b's products for R rows to acc: the block's integer dot products with the rounded activations, times
// the block's combined scale (weight scale times the row's activation scale) for each row.
template <bool kQ4, int R>
__attribute__((always_inline)) inline void add_block(const Rounded& rows, int64_t K, int64_t blocks,
                                                     const uint8_t* block, const float* combined, int64_t b,
                                                     __m256 (&acc)[R]) {
  __m256i first, second;
  unpack_block<kQ4>(block, first, second);
  for (int r = 0; r < R; ++r) {
    const int16_t* xb = rows.x16 + r * K + b * kBlock;
    const __m256i products = _mm256_add_epi32(
        _mm256_madd_epi16(first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
        _mm256_madd_epi16(second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), _mm256_broadcast_ss(combined + r * blocks + b), acc[r]);
  }
}

// For output row n: each block's weight scale times each row's activation scale (into combined, [R, blocks]), and
// for q4 the mins' share of each row's result: the sum over blocks of min * the block's float sum of x.
template <bool kQ4, int R>
inline void row_scales(const Rounded& rows, int64_t blocks, const uint16_t* scales, float* combined,
                       float (&mins)[R]) {
  int64_t b = 0;
  __m256 min_acc[R];
  for (int r = 0; r < R; ++r) min_acc[r] = _mm256_setzero_ps();
  for (; b + 8 <= blocks; b += 8) {
    const __m256 weight = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b)));
    __m256 block_mins = _mm256_setzero_ps();
    if constexpr (kQ4)
      block_mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + blocks + b)));
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(combined + r * blocks + b, _mm256_mul_ps(weight, _mm256_loadu_ps(rows.x_scales + r * blocks + b)));
      if constexpr (kQ4)
        min_acc[r] = _mm256_fmadd_ps(block_mins, _mm256_loadu_ps(rows.block_sums + r * blocks + b), min_acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) mins[r] = kQ4 ? horizontal_sum(min_acc[r]) : 0.0f;
  for (; b < blocks; ++b) {
    const float weight = half_to_float(scales[b]);
    const float block_min = kQ4 ? half_to_float(scales[blocks + b]) : 0.0f;
    for (int r = 0; r < R; ++r) {
      combined[r * blocks + b] = weight * rows.x_scales[r * blocks + b];
      if constexpr (kQ4) mins[r] += block_min * rows.block_sums[r * blocks + b];
    }
  }
}

// Asks for the blocks and scales of the output row kPrefetchRows after this one (row, row_scales) while this one is
// computed.
inline void prefetch_row_ahead(const uint8_t* row, int64_t row_bytes, const uint16_t* row_scales,
                               int64_t scale_bytes) {
  const char* blocks_ahead = reinterpret_cast<const char*>(row) + kPrefetchRows * row_bytes;
  const char* scales_ahead = reinterpret_cast<const char*>(row_scales) + kPrefetchRows * scale_bytes;
  for (int64_t offset = 0; offset < row_bytes; offset += 64) _mm_prefetch(blocks_ahead + offset, _MM_HINT_T0);
  for (int64_t offset = 0; offset < scale_bytes; offset += 64) _mm_prefetch(scales_ahead + offset, _MM_HINT_T0);
}

// out[r, n] for the R rows starting at `rows` (row stride K) and the output columns [n_begin, n_end). Even and odd
// blocks add into separate accumulators, so that consecutive multiply-adds do not wait for each other.
template <bool kQ4, int R>
void dot_rows(Rounded rows, int64_t K, const uint8_t* weights, const uint16_t* scales, float* out, int64_t N,
              int64_t n_begin, int64_t n_end, float* combined) {
  constexpr int64_t kScales = scales_per_block(kQ4);
  const int64_t blocks = K / kBlock;
  const int64_t block_bytes = bytes_per_block(kQ4);
  const int64_t row_bytes = blocks * block_bytes, scale_bytes = blocks * kScales * 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = weights + n * row_bytes;
    if (n + kPrefetchRows < n_end) prefetch_row_ahead(row, row_bytes, scales + n * blocks * kScales, scale_bytes);
    float mins[R];
    row_scales<kQ4, R>(rows, blocks, scales + n * blocks * kScales, combined, mins);
    __m256 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      add_block<kQ4, R>(rows, K, blocks, row + b * block_bytes, combined, b, even);
      add_block<kQ4, R>(rows, K, blocks, row + (b + 1) * block_bytes, combined, b + 1, odd);
    }
    if (b < blocks) add_block<kQ4, R>(rows, K, blocks, row + b * block_bytes, combined, b, even);
    for (int r = 0; r < R; ++r) out[r * N + n] = horizontal_sum(_mm256_add_ps(even[r], odd[r])) + mins[r];
  }
}

// The horizontal sums of 8 vectors, as one vector: lane t holds the sum of v[t]'s lanes.
inline __m256 sum_each(const __m256 (&v)[8]) {
  const __m256 first = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 second = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // first: the sums of v[0..3]'s low halves, then of their high halves; second likewise for v[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(first, second, 0x20), _mm256_permute2f128_ps(first, second, 0x31));
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// One block of 32 activations as integers with a scale of its own (its largest magnitude maps to kLargest):
// q[i] holds x[8 i .. 8 i + 8) / scale, rounded; sum is the block's float sum.
template <int kLargest>
inline void scale_block(const float* x, __m256i (&q)[4], float& scale, float& sum) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 largest = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  scale = horizontal_max(largest) / static_cast<float>(kLargest);
  const __m256 inverse = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
}

// Rounds one block of 32 activations to 16-bit integers with a scale of its own (its largest magnitude maps to
// 32767), and sums the block in float.
inline void round_block(const float* x, int16_t* x16, float& scale, float& sum) {
  __m256i q[4];
  scale_block<32767>(x, q, scale, sum);
  for (int i = 0; i < 2; ++i) {
    // packs interleaves the 128-bit lanes of its two inputs; the permute puts the 16 values back in order
    const __m256i packed = _mm256_packs_epi32(q[2 * i], q[2 * i + 1]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + 16 * i), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}

// --- Blocks in panels of 8 output columns (4-bit ones on AVX2; two panels at a time with AVX-512 VNNI, below) -------
//
// The rows kernels (dot_rows, dot_rows_paired) pay a block's scaling (a conversion to float, a multiplication and a
// multiply-add) and a horizontal sum per output column and row: several concurrent rows (a batch of replies) were
// bound by that arithmetic, not by reading the weights. Here the 4-bit weights are stored in panels of 8 output
// columns, so that one vector holds 4 consecutive weights of each of the 8 columns, and a block's products for the
// 8 columns land in the 8 lanes of one vector: its scales and mins are applied once per 8 columns, with no
// horizontal sums. The products are `vpmaddubsw` (unsigned bytes times signed bytes, pairwise added): each 16-bit
// activation (rounded as round_block does) is split into its high byte (signed) and low byte (unsigned), so that
// the integer sums are exactly dot_rows' and the results match it to float32 rounding. Each row's sums are added in
// the same order whatever rows it is multiplied with, so batched results equal solo ones.
//
// Layout: weights [N / 8, blocks, 128] bytes: panel p, block b holds 4 chunks of 32 bytes; byte 4 col + i of chunk c
// holds column 8 p + col's weight 4 c + i in its low nibble and its weight 16 + 4 c + i in its high one (the rows
// layout's byte 4 c + i of that column's block). Scales [N / 8, blocks, 16] float16: the 8 columns' scales, then
// their mins. 8-bit weights (multiplied in panels with AVX-512 VNNI only): [N / 8, blocks, 256], 8 chunks, byte 4 col
// + i of chunk c holding the column's weight 4 c + i; scales [N / 8, blocks, 8].
constexpr int64_t kPanel = 8;
constexpr int64_t kTileRows = 16;  // the rows of a prompt an AMX tile takes (see tile_products, panel_linear)
// With AVX2 alone, products of up to this many rows (a short prompt, the new message of a conversation's next turn)
// are read by dot_panels with 16-bit activations too: for the default model's 30 layers on an AMD EPYC (Zen 3) they
// took 1.58x (16 rows), 1.27x (40) and 1.07x (128) less time than float32 products on dequantized tiles, which
// dequantize every weight for each product and win from about 192 rows on (1.09x there, 1.26x at 384).
constexpr int64_t kAvx2PanelRows = 128;
// How many blocks ahead (of 128 bytes) the panel kernel asks for weights: 2 KB, which made a decode step of one row
// 5% faster than asking for the block after next (the same from 1 to 4 KB; several rows, bound by arithmetic, alike).
constexpr int64_t kPanelPrefetchBlocks = 16;

// A panel's bytes per block (128 for q4, 256 for q8) and float16 values per block (q4: 8 scales, then 8 mins).
constexpr int64_t panel_block_bytes(bool q4) { return kPanel * bytes_per_block(q4); }
constexpr int64_t panel_block_scales(bool q4) { return kPanel * scales_per_block(q4); }

// Rows layout (see the top of this file) -> panels, for N % 8 == 0 output columns. A block's byte j (of 16 or 32)
// goes to byte 4 col + j % 4 of the panel's chunk j / 4: the q4 weights j and j + 16 stay paired in their byte.
template <bool kQ4>
std::tuple<at::Tensor, at::Tensor> to_panels(const at::Tensor& weights, const at::Tensor& scales) {
  TORCH_CHECK(weights.dim() == 2 && scales.dim() == (kQ4 ? 3 : 2) && weights.size(0) % kPanel == 0,
              "chipi to_panels: blocks in rows, a multiple of 8 of them, expected");
  constexpr int64_t kBlockBytes = bytes_per_block(kQ4), kScales = scales_per_block(kQ4);
  const int64_t N = weights.size(0), blocks = weights.size(1) / kBlockBytes, panels = N / kPanel;
  auto w = weights.contiguous();
  auto s = scales.contiguous();
  auto out = at::empty({panels, blocks, panel_block_bytes(kQ4)}, w.options());
  auto out_scales = at::empty({panels, blocks, panel_block_scales(kQ4)}, s.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  uint8_t* op = out.data_ptr<uint8_t>();
  auto* osp = reinterpret_cast<uint16_t*>(out_scales.data_ptr<at::Half>());
  at::parallel_for(0, panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* panel = op + (p * blocks + b) * panel_block_bytes(kQ4);
        uint16_t* panel_scales = osp + (p * blocks + b) * panel_block_scales(kQ4);
        for (int64_t col = 0; col < kPanel; ++col) {
          const int64_t n = p * kPanel + col;
          const uint8_t* block = wp + (n * blocks + b) * kBlockBytes;
          for (int64_t j = 0; j < kBlockBytes; ++j) panel[32 * (j / 4) + 4 * col + j % 4] = block[j];
          for (int64_t k = 0; k < kScales; ++k)  // rows: each row's scales, then (q4) its mins
            panel_scales[k * kPanel + col] = sp[(n * kScales + k) * blocks + b];
        }
      }
  });
  return {out, out_scales};
}

// Panels -> the rows layout (quantize_blocks' layout, and the one 8-bit layers are multiplied in without VNNI).
template <bool kQ4>
std::tuple<at::Tensor, at::Tensor> from_panels(const at::Tensor& weights, const at::Tensor& scales) {
  TORCH_CHECK(weights.dim() == 3 && scales.dim() == 3 && weights.size(2) == panel_block_bytes(kQ4),
              "chipi from_panels: blocks in panels expected");
  constexpr int64_t kBlockBytes = bytes_per_block(kQ4), kScales = scales_per_block(kQ4);
  const int64_t panels = weights.size(0), blocks = weights.size(1), N = panels * kPanel;
  auto w = weights.contiguous();
  auto s = scales.contiguous();
  auto out = at::empty({N, blocks * kBlockBytes}, w.options());
  auto out_scales = kQ4 ? at::empty({N, 2, blocks}, s.options()) : at::empty({N, blocks}, s.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  uint8_t* op = out.data_ptr<uint8_t>();
  auto* osp = reinterpret_cast<uint16_t*>(out_scales.data_ptr<at::Half>());
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* panel = wp + (p * blocks + b) * panel_block_bytes(kQ4);
      const uint16_t* panel_scales = sp + (p * blocks + b) * panel_block_scales(kQ4);
      for (int64_t col = 0; col < kPanel; ++col) {
        const int64_t n = p * kPanel + col;
        uint8_t* block = op + (n * blocks + b) * kBlockBytes;
        for (int64_t j = 0; j < kBlockBytes; ++j) block[j] = panel[32 * (j / 4) + 4 * col + j % 4];
        for (int64_t k = 0; k < kScales; ++k) osp[(n * kScales + k) * blocks + b] = panel_scales[k * kPanel + col];
      }
    }
  return {out, out_scales};
}

// A panel's block as 8 vectors of 32 weights (0..15), into unpacked[8][32]: vector v holds weights 4 v .. 4 v + 3
// of each of the 8 columns (column col's in bytes 4 col .. 4 col + 3).
inline void unpack_panel_block(const uint8_t* block, uint8_t* unpacked) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
    _mm256_store_si256(reinterpret_cast<__m256i*>(unpacked + 32 * c), _mm256_and_si256(bytes, nibble));
    _mm256_store_si256(reinterpret_cast<__m256i*>(unpacked + 32 * (c + 4)),
                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
  }
}

// Rows of activations rounded to 16-bit integers per block of 32 as round_block does (x[k] ~ scales[k / 32] *
// x16[k]), each split in two bytes for `vpmaddubsw`: x16 = 256 high + low, high signed (-128..127), low unsigned
// (0..255). sums: each block's float sum (for the mins' term, as in Rounded).
struct SplitRows {
  const int8_t* high;
  const uint8_t* low;
  const float* scales;
  const float* sums;
  const int32_t* corrections;  // for 8-bit weights: 32768 times each block's sum of high bytes (see dot_panel_pairs)

  // The rows from row m on.
  SplitRows from(int64_t m, int64_t K) const {
    const int64_t blocks = K / kBlock;
    return {high + m * K, low + m * K, scales + m * blocks, sums + m * blocks, corrections + m * blocks};
  }
};

// Or 8-bit activations (CHIPI_ACTIVATION_BITS=8, as llama.cpp rounds them): high holds each block rounded to 8-bit
// integers, its largest magnitude mapping to 127 (a relative error up to 1/254 of it), and there is no low byte.
inline void round_block8(const float* x, int8_t* x8, float& scale, float& sum) {
  __m256i q[4];
  scale_block<127>(x, q, scale, sum);
  // packs interleaves 128-bit lanes; the permute puts the 32 values back in order
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x8),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

inline void split_block(const float* x, int8_t* high, uint8_t* low, float& scale, float& sum) {
  alignas(32) int16_t x16[kBlock];
  round_block(x, x16, scale, sum);
  for (int half = 0; half < 2; ++half) {
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(x16 + 16 * half));
    // packs interleaves 128-bit lanes; the permute puts the 16 bytes of each half back in order
    const __m256i highs = _mm256_permute4x64_epi64(_mm256_packs_epi16(_mm256_srai_epi16(v, 8), v), 0xD8);
    const __m256i lows = _mm256_permute4x64_epi64(
        _mm256_packus_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0xFF)), v), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + 16 * half), _mm256_castsi256_si128(highs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(low + 16 * half), _mm256_castsi256_si128(lows));
  }
}

// out[r, 8 p .. 8 p + 8) for R rows (row stride K in rows, N in out) and the panels [p_begin, p_end).
template <bool kSplit, int R>
void dot_panels(const SplitRows& rows, int64_t K, const uint8_t* weights, const uint16_t* scales, float* out,
                int64_t N, int64_t p_begin, int64_t p_end) {
  const int64_t blocks = K / kBlock;
  alignas(32) uint8_t unpacked[8 * kBlock];
  const __m256i ones = _mm256_set1_epi16(1), high_weight = _mm256_set1_epi16(256);
  for (int64_t p = p_begin; p < p_end; ++p) {
    const uint8_t* panel = weights + p * blocks * 4 * kBlock;
    const uint16_t* panel_scales = scales + p * blocks * 2 * kPanel;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      // the hardware prefetcher alone falls behind, as in dot_rows
      const char* ahead = reinterpret_cast<const char*>(panel + (b + kPanelPrefetchBlocks) * 4 * kBlock);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      unpack_panel_block(panel + b * 4 * kBlock, unpacked);
      const uint16_t* block_scales = panel_scales + b * 2 * kPanel;
      const __m256 weight_scales = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block_scales)));
      const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block_scales + kPanel)));
      for (int r = 0; r < R; ++r) {
        const int32_t* high = reinterpret_cast<const int32_t*>(rows.high + r * K + b * kBlock);
        // per 16-bit lane, at most 8 x 2 x 15 x 128 (high) and 4 x 2 x 15 x 255 (each half of low): no overflow
        __m256i high_sums = _mm256_setzero_si256(), low_sums[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int v = 0; v < 8; ++v) {
          const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(unpacked + 32 * v));
          high_sums = _mm256_add_epi16(high_sums, _mm256_maddubs_epi16(w, _mm256_set1_epi32(high[v])));
          if constexpr (kSplit) {
            const int32_t* low = reinterpret_cast<const int32_t*>(rows.low + r * K + b * kBlock);
            low_sums[v / 4] = _mm256_add_epi16(low_sums[v / 4], _mm256_maddubs_epi16(_mm256_set1_epi32(low[v]), w));
          }
        }
        __m256i sums;
        if constexpr (kSplit)
          sums = _mm256_add_epi32(
              _mm256_madd_epi16(high_sums, high_weight),
              _mm256_add_epi32(_mm256_madd_epi16(low_sums[0], ones), _mm256_madd_epi16(low_sums[1], ones)));
        else
          sums = _mm256_madd_epi16(high_sums, ones);
        const __m256 combined = _mm256_mul_ps(weight_scales, _mm256_broadcast_ss(rows.scales + r * blocks + b));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), combined, acc[r]);
        acc[r] = _mm256_fmadd_ps(mins, _mm256_broadcast_ss(rows.sums + r * blocks + b), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * N + p * kPanel, acc[r]);
  }
}

template <bool kSplit>
void panel_products(const SplitRows& all, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp, float* op,
                    int64_t N) {
  const int64_t blocks = K / kBlock;
  at::parallel_for(0, N / kPanel, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += 8) {  // up to 8 rows share each unpacked block
      const SplitRows rows = all.from(m, K);
      float* om = op + m * N;
      with_rows<8>(M - m, [&](auto count) { dot_panels<kSplit, count>(rows, K, wp, sp, om, N, begin, end); });
    }
  });
}

bool has_avx512_vnni();
template <bool kQ4, bool kSplit>
void panel_pair_products(const SplitRows& all, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp,
                         float* op, int64_t N);
bool has_amx();
void tile_products(const SplitRows& all, int64_t M, int64_t tiled_rows, int64_t K, const uint8_t* wp,
                   const uint16_t* sp, float* op, int64_t N);

// x [M, K] times weights in panels, with activations rounded to activation_bits (16, or 8 for 4-bit weights) per
// block. 8-bit weights in panels need AVX-512 VNNI.
template <bool kQ4>
void panel_linear(const float* xp, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp, float* op,
                  int64_t N, int64_t activation_bits) {
  const int64_t blocks = K / kBlock;
  const bool split = activation_bits == 16;
  // A prompt's rows up to the last whole 16 go to AMX tiles (tile_products), in tile order: each 16 rows' bytes of a
  // block one after the other, so that a tile loads 512 consecutive bytes. The rest stay row by row after them.
  const int64_t tiled_rows = kQ4 && split && M >= kTileRows && has_amx() ? M / kTileRows * kTileRows : 0;
  std::vector<int8_t> high(M * K);
  std::vector<uint8_t> low(split ? M * K : 0);
  std::vector<float> x_scales(M * blocks), block_sums(M * blocks);
  std::vector<int32_t> corrections(kQ4 ? 0 : M * blocks);
  for (int64_t i = 0; i < M * blocks; ++i) {
    const int64_t m = i / blocks, b = i % blocks;
    const int64_t at = (m < tiled_rows ? (m / kTileRows * blocks + b) * kTileRows + m % kTileRows : i) * kBlock;
    if (split)
      split_block(xp + i * kBlock, high.data() + at, low.data() + at, x_scales[i], block_sums[i]);
    else
      round_block8(xp + i * kBlock, high.data() + at, x_scales[i], block_sums[i]);
    if constexpr (!kQ4) {
      int32_t high_sum = 0;
      for (int64_t k = 0; k < kBlock; ++k) high_sum += high[at + k];
      corrections[i] = 32768 * high_sum;
    }
  }
  const SplitRows rows{high.data(), low.data(), x_scales.data(), block_sums.data(), corrections.data()};
  if constexpr (kQ4) {
    if (tiled_rows) {
      tile_products(rows, M, tiled_rows, K, wp, sp, op, N);
    } else if (has_avx512_vnni()) {
      if (split)
        panel_pair_products<true, true>(rows, M, K, wp, sp, op, N);
      else
        panel_pair_products<true, false>(rows, M, K, wp, sp, op, N);
    } else if (split) {
      panel_products<true>(rows, M, K, wp, sp, op, N);
    } else {
      panel_products<false>(rows, M, K, wp, sp, op, N);
    }
  } else {
    TORCH_CHECK(has_avx512_vnni() && split, "chipi: 8-bit weights in panels need AVX-512 VNNI and 16-bit activations");
    panel_pair_products<false, true>(rows, M, K, wp, sp, op, N);
  }
}

// Panels [p_begin, p_end) of the float32 weights the blocks stand for, into out (rows 8 p_begin on, stride K).
template <bool kQ4>
void dequantize_panels(const uint8_t* weights, const uint16_t* scales, int64_t blocks, int64_t p_begin,
                       int64_t p_end, float* out) {
  const int64_t K = blocks * kBlock;
  alignas(32) uint8_t unpacked[8 * kBlock];
  alignas(32) uint8_t column[kBlock];
  for (int64_t p = p_begin; p < p_end; ++p)
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = weights + (p * blocks + b) * panel_block_bytes(kQ4);
      if constexpr (kQ4)
        unpack_panel_block(block, unpacked);
      else
        std::memcpy(unpacked, block, sizeof(unpacked));  // already one weight per byte, in unpacked's order
      const uint16_t* block_scales = scales + (p * blocks + b) * panel_block_scales(kQ4);
      for (int64_t col = 0; col < kPanel; ++col) {
        for (int v = 0; v < 8; ++v) std::memcpy(column + 4 * v, unpacked + 32 * v + 4 * col, 4);
        const __m256 scale = _mm256_set1_ps(half_to_float(block_scales[col]));
        const __m256 min = _mm256_set1_ps(kQ4 ? half_to_float(block_scales[kPanel + col]) : 0.0f);
        float* o = out + ((p - p_begin) * kPanel + col) * K + b * kBlock;
        for (int j = 0; j < 4; ++j) {
          const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(column + 8 * j));
          const __m256i q = kQ4 ? _mm256_cvtepu8_epi32(eight) : _mm256_cvtepi8_epi32(eight);
          _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale, min));
        }
      }
    }
}

// --- AVX-512 VNNI: the same products, a pair of blocks per 512-bit vector --------------------------------------------
//
// Where the CPU has AVX-512 (F, BW, VL) and VNNI, a pair of blocks is one vector: the activations of blocks 2p and
// 2p + 1 are laid out as [block 2p's values 0-15, block 2p + 1's values 0-15] and [their values 16-31], and the
// weights unpack into the same order, so that a multiply-add and a `vpdpwssd` (16-bit multiply, pairwise add,
// accumulate) leave block 2p's integer sums in lanes 0-7 and block 2p + 1's in lanes 8-15, each then scaled by its
// block's combined scale. Per row, 64 products take 5 instructions instead of 16: what several concurrent rows (a
// batch of replies) are bound by. The integer sums are the same exact ones, so the results match the AVX2 path's
// to float32 rounding; a row's result never depends on the other rows it is multiplied with (every row's sums are
// added in the same order, whatever R).
#define CHIPI_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// Activations rounded as round_block does, laid out in pairs of blocks (see above); an odd last block is paired with
// zeros. Per row: x16 [pairs * 64], x_scales_wide [pairs * 16] (each block's scale in the 8 lanes of its sums),
// block_sums [sums_stride] (each block's float sum, then zeros up to a multiple of 16).
struct PairedRows {
  const int16_t* x16;
  const float* x_scales_wide;
  const float* block_sums;
  int64_t blocks, pairs, sums_stride;
};

inline int64_t sums_stride(int64_t blocks) { return (blocks + 15) / 16 * 16; }

CHIPI_AVX512 void pair_rows(const float* x, int64_t M, int64_t K, int16_t* x16, float* x_scales_wide,
                            float* block_sums) {
  const int64_t blocks = K / kBlock, pairs = (blocks + 1) / 2, stride = sums_stride(blocks);
  alignas(64) int16_t rounded[2 * kBlock];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < pairs; ++p) {
      float scales[2] = {0.0f, 0.0f};
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t b = 2 * p + half;
        if (b < blocks)
          round_block(x + m * K + b * kBlock, rounded + half * kBlock, scales[half], block_sums[m * stride + b]);
        else
          std::fill(rounded + half * kBlock, rounded + (half + 1) * kBlock, int16_t{0});
      }
      // [block 2p's values 0-15, block 2p + 1's values 0-15], then their values 16-31
      int16_t* out = x16 + (m * pairs + p) * 64;
      for (int64_t part = 0; part < 2; ++part) {
        const __m256i first = _mm256_load_si256(reinterpret_cast<const __m256i*>(rounded + 16 * part));
        const __m256i second = _mm256_load_si256(reinterpret_cast<const __m256i*>(rounded + 32 + 16 * part));
        _mm512_storeu_si512(out + 32 * part, _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
      }
      _mm512_storeu_ps(x_scales_wide + (m * pairs + p) * 16,
                       _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(scales[0]), _mm512_set1_ps(scales[1])));
    }
}

// A pair of blocks' 64 weights as two vectors of 32 16-bit integers, in the paired layout; the second block's are
// zeros where the pair is an odd last block alone.
template <bool kQ4>
CHIPI_AVX512 inline void unpack_pair(const uint8_t* block, bool both, __m512i& first, __m512i& second) {
  if constexpr (kQ4) {
    const __m256i bytes = both ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block))
                               : _mm256_maskz_loadu_epi8(0xFFFFu, block);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    first = _mm512_cvtepu8_epi16(_mm256_and_si256(bytes, nibble));
    second = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
  } else {
    // 128-bit lanes: block 2p's values 0-15 and 16-31, then block 2p + 1's; reordered to (0, 2) and (1, 3)
    const __m512i bytes = both ? _mm512_loadu_si512(block) : _mm512_maskz_loadu_epi8(0xFFFFFFFFULL, block);
    const __m512i reordered = _mm512_shuffle_i64x2(bytes, bytes, 0xD8);
    first = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(reordered));
    second = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(reordered, 1));
  }
}

// The sums of the 16 lanes of 4 vectors, by the same tree for each (lane i + lane i + 8, then + 4, + 2, + 1), into
// out[0 .. count).
CHIPI_AVX512 inline void store_sums(__m512 a, __m512 b, __m512 c, __m512 d, float* out, int64_t stride, int count) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 all = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  all = _mm512_add_ps(all, _mm512_permute_ps(all, 0x4E));
  all = _mm512_add_ps(all, _mm512_permute_ps(all, 0xB1));
  alignas(64) float sums[16];
  _mm512_store_ps(sums, all);
  for (int i = 0; i < count; ++i) out[i * stride] = sums[4 * i];
}

// out[r, n] for R rows and the output columns [n_begin, n_end), as dot_rows does it, a pair of blocks at a time. For
// q4, each row's sum starts from the mins' share (the sum over blocks of min * the block's float sum of x).
template <bool kQ4, int R>
CHIPI_AVX512 void dot_rows_paired(const PairedRows& rows, const uint8_t* weights, const uint16_t* scales, float* out,
                                  int64_t N, int64_t n_begin, int64_t n_end, float* wide_scales) {
  constexpr int64_t kScales = scales_per_block(kQ4);
  const int64_t blocks = rows.blocks, pairs = rows.pairs;
  const int64_t block_bytes = bytes_per_block(kQ4);
  const int64_t row_bytes = blocks * block_bytes, scale_bytes = blocks * kScales * 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = weights + n * row_bytes;
    const uint16_t* row_scales = scales + n * blocks * kScales;
    if (n + kPrefetchRows < n_end) prefetch_row_ahead(row, row_bytes, row_scales, scale_bytes);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 16) {  // 16 blocks' weight scales (and mins) at a time
      const __mmask16 valid = blocks - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (blocks - b)) - 1);
      const __m512 block_scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, row_scales + b));
      for (int64_t q = 0; q < 8 && b / 2 + q < pairs; ++q) {  // each in the 8 lanes of its block's sums
        const __m512i lanes = _mm512_set_epi32(2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1, 2 * q + 1,
                                               2 * q + 1, 2 * q + 1, 2 * q, 2 * q, 2 * q, 2 * q, 2 * q, 2 * q, 2 * q,
                                               2 * q);
        _mm512_storeu_ps(wide_scales + (b / 2 + q) * 16, _mm512_permutexvar_ps(lanes, block_scales));
      }
      if constexpr (kQ4) {
        const __m512 mins = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, row_scales + blocks + b));
        for (int r = 0; r < R; ++r)
          acc[r] = _mm512_fmadd_ps(mins, _mm512_loadu_ps(rows.block_sums + r * rows.sums_stride + b), acc[r]);
      }
    }
    for (int64_t p = 0; p < pairs; ++p) {
      __m512i first, second;
      unpack_pair<kQ4>(row + 2 * p * block_bytes, 2 * p + 1 < blocks, first, second);
      const __m512 weight_scales = _mm512_loadu_ps(wide_scales + p * 16);
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = rows.x16 + (r * pairs + p) * 64;
        const __m512i sums = _mm512_dpwssd_epi32(_mm512_madd_epi16(first, _mm512_loadu_si512(xr)), second,
                                                 _mm512_loadu_si512(xr + 32));
        const __m512 combined =
            _mm512_mul_ps(weight_scales, _mm512_loadu_ps(rows.x_scales_wide + (r * pairs + p) * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), combined, acc[r]);
      }
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int r = 0; r < R; r += 4)
      store_sums(acc[r], r + 1 < R ? acc[r + 1] : zero, r + 2 < R ? acc[r + 2] : zero, r + 3 < R ? acc[r + 3] : zero,
                 out + r * N + n, N, std::min(4, R - r));
  }
}

template <bool kQ4>
CHIPI_AVX512 void paired_linear(const float* xp, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp,
                                float* op, int64_t N) {
  const int64_t blocks = K / kBlock, pairs = (blocks + 1) / 2, stride = sums_stride(blocks);
  std::vector<int16_t> x16(M * pairs * 64);
  std::vector<float> x_scales_wide(M * pairs * 16), block_sums(M * stride, 0.0f);
  pair_rows(xp, M, K, x16.data(), x_scales_wide.data(), block_sums.data());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // each pair's weight scales, a vector per pair: whole cache lines of their own, as each thread writes its own
    // for every output column (sharing a line with the other thread's made the products several times slower)
    std::vector<__m512> wide_scales(pairs);
    for (int64_t m = 0; m < M; m += 8) {  // up to 8 rows share each unpacked pair of blocks
      const PairedRows rows{x16.data() + m * pairs * 64, x_scales_wide.data() + m * pairs * 16,
                            block_sums.data() + m * stride, blocks, pairs, stride};
      float* om = op + m * N;
      float* ws = reinterpret_cast<float*>(wide_scales.data());
      with_rows<8>(M - m, [&](auto count) { dot_rows_paired<kQ4, count>(rows, wp, sp, om, N, begin, end, ws); });
    }
  });
}

// 32 bytes from each of two places as one vector.
CHIPI_AVX512 inline __m512i two_chunks(const uint8_t* first, const uint8_t* second) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second)), 1);
}

// 8 float16 values from each of two places as one vector of 16 floats.
CHIPI_AVX512 inline __m512 sixteen_halves(const uint16_t* first, const uint16_t* second) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(first))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(second)), 1));
}

// Panels p and p + 1 (each panel_bytes of blocks and panel_scales of scales), or panel p alone, read twice, where it is
// the last before p_end.
struct PanelPair {
  const uint8_t* first;
  const uint8_t* second;
  const uint16_t* first_scales;
  const uint16_t* second_scales;
  bool both;
};

inline PanelPair panel_pair(const uint8_t* weights, const uint16_t* scales, int64_t panel_bytes, int64_t panel_scales,
                            int64_t p, int64_t p_end) {
  const bool both = p + 1 < p_end;
  const uint8_t* first = weights + p * panel_bytes;
  const uint16_t* first_scales = scales + p * panel_scales;
  return {first, both ? first + panel_bytes : first, first_scales, both ? first_scales + panel_scales : first_scales,
          both};
}

// The panels two at a time (16 output columns, one 512-bit vector), with `vpdpbusd` (unsigned bytes times signed
// bytes, 4 at a time, added into 32-bit lanes): per row and block, 8 of them for 8-bit activations and 16 for 16-bit
// ones split as dot_panels splits them, with no 16-bit partial sums to widen. For 4-bit weights the integer sums and
// the float operations after them are dot_panels' own, so the results are the same. 8-bit weights are signed, as are
// the activations' high bytes: those products take the weights plus 128 (unsigned), and each block's corrections
// take the 128 times the sum of its high bytes back out, so the sums are exact too. An odd last panel is read twice
// and stored once.
template <bool kQ4, bool kSplit, int R>
CHIPI_AVX512 void dot_panel_pairs(const SplitRows& rows, int64_t K, const uint8_t* weights, const uint16_t* scales,
                                  float* out, int64_t N, int64_t p_begin, int64_t p_end) {
  constexpr int64_t kBytes = panel_block_bytes(kQ4), kScales = panel_block_scales(kQ4);
  const int64_t blocks = K / kBlock, panel_bytes = blocks * kBytes, panel_scales = blocks * kScales;
  const __m512i nibble = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t p = p_begin; p < p_end; p += 2) {
    const auto [first, second, first_scales, second_scales, both] =
        panel_pair(weights, scales, panel_bytes, panel_scales, p, p_end);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t offset = b * kBytes;
      // the two panels lie one after the other: read them as one stream, kPanelPrefetchBlocks pairs of blocks ahead
      const char* ahead = reinterpret_cast<const char*>(first) + 2 * (offset + kPanelPrefetchBlocks * kBytes);
      for (int64_t line = 0; line < 2 * kBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
      // w[v]: weights 4 v .. 4 v + 3 of the 16 columns, as in unpack_panel_block; unsigned: each plus 128 (q8)
      __m512i w[8], unsigned_w[8];
      for (int c = 0; c < 4; ++c) {
        if constexpr (kQ4) {
          const __m512i bytes = two_chunks(first + offset + 32 * c, second + offset + 32 * c);
          w[c] = unsigned_w[c] = _mm512_and_si512(bytes, nibble);
          w[c + 4] = unsigned_w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
        } else {
          for (int v = 2 * c; v < 2 * c + 2; ++v) {
            w[v] = two_chunks(first + offset + 32 * v, second + offset + 32 * v);
            unsigned_w[v] = _mm512_xor_si512(w[v], sign);
          }
        }
      }
      const int64_t at = b * kScales;
      const __m512 weight_scales = sixteen_halves(first_scales + at, second_scales + at);
      __m512 mins = _mm512_setzero_ps();
      if constexpr (kQ4) mins = sixteen_halves(first_scales + at + kPanel, second_scales + at + kPanel);
      for (int r = 0; r < R; ++r) {
        const int32_t* high = reinterpret_cast<const int32_t*>(rows.high + r * K + b * kBlock);
        // two chains of sums, so that one row's multiply-adds do not all wait for each other
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
        for (int v = 0; v < 8; v += 2) {
          even = _mm512_dpbusd_epi32(even, unsigned_w[v], _mm512_set1_epi32(high[v]));
          odd = _mm512_dpbusd_epi32(odd, unsigned_w[v + 1], _mm512_set1_epi32(high[v + 1]));
        }
        __m512i sums = _mm512_add_epi32(even, odd);
        if constexpr (kSplit) {
          const int32_t* low = reinterpret_cast<const int32_t*>(rows.low + r * K + b * kBlock);
          __m512i low_even = _mm512_setzero_si512(), low_odd = _mm512_setzero_si512();
          for (int v = 0; v < 8; v += 2) {
            low_even = _mm512_dpbusd_epi32(low_even, _mm512_set1_epi32(low[v]), w[v]);
            low_odd = _mm512_dpbusd_epi32(low_odd, _mm512_set1_epi32(low[v + 1]), w[v + 1]);
          }
          sums = _mm512_add_epi32(_mm512_slli_epi32(sums, 8), _mm512_add_epi32(low_even, low_odd));
        }
        if constexpr (!kQ4) sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(rows.corrections[r * blocks + b]));
        const __m512 combined = _mm512_mul_ps(weight_scales, _mm512_set1_ps(rows.scales[r * blocks + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), combined, acc[r]);
        if constexpr (kQ4) acc[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(rows.sums[r * blocks + b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * N + p * kPanel, both ? 0xFFFF : 0x00FF, acc[r]);
  }
}

template <bool kQ4, bool kSplit>
void panel_pair_products(const SplitRows& all, int64_t M, int64_t K, const uint8_t* wp, const uint16_t* sp,
                         float* op, int64_t N) {
  const int64_t panels = N / kPanel;
  at::parallel_for(0, (panels + 1) / 2, 2, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += 8) {  // up to 8 rows share each unpacked block
      const SplitRows rows = all.from(m, K);
      float* om = op + m * N;
      with_rows<8>(M - m, [&](auto count) {
        dot_panel_pairs<kQ4, kSplit, count>(rows, K, wp, sp, om, N, 2 * begin, std::min(2 * end, panels));
      });
    }
  });
}

// --- AMX: a prompt's rows by tile products --------------------------------------------------------------------------
//
// Where the CPU has AMX (and Linux lends this process the tiles' state), 16 rows of a prompt at a time take a pair of
// panels' blocks as tiles: the 4-bit weights unpacked as dot_panel_pairs unpacks them are already a tile's layout
// (each 64-byte row holding 4 consecutive weights of each of the 16 columns), the activations' high bytes (signed)
// and low bytes (unsigned) of 16 rows and a block are two tiles, and `tdpbsud` / `tdpbuud` give the block's integer
// sums for 16 rows and 16 columns, the same exact sums as the `vpdpbusd`s, which then take dot_panel_pairs' own
// float operations: the same results, bit for bit. A block's sums come back through memory to be scaled, a cost the
// 16 rows share (a decode step's few rows did not gain by it).

#if CHIPI_AMX_BUILD
#define CHIPI_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

bool has_amx() {
  static const bool supported = [] {
    unsigned eax, ebx, ecx, edx;  // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8
    if (!has_avx512_vnni() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || (edx >> 24 & 3) != 3) return false;
    // Linux hands a process the tiles' register state only once asked for it (ARCH_REQ_XCOMP_PERM, XTILEDATA);
    // a virtual machine or kernel that does not allow it keeps the VNNI products.
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return supported;
}

// The tiles' shapes (palette 1): 0 and 1, then 5 and 6 (two blocks in turn), the high and low bytes' sums (16 rows
// of 16 int32); 2 and 3 those bytes of 16 rows' block (16 rows of 32); 4 the block's weights (8 rows of 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 32, 32, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 8, 16, 16};
};

// Block b's integer sums for the 16 rows from `high` and `low` (row stride K) into tiles high_tile and low_tile (a
// macro: the tile intrinsics take the tiles' numbers as literals).
#define CHIPI_TILE_BLOCK_SUMS(high_tile, low_tile, high, low, K, weights) \
  do {                                                                    \
    _tile_zero(high_tile);                                                \
    _tile_zero(low_tile);                                                 \
    _tile_loadd(2, high, K);                                              \
    _tile_loadd(3, low, K);                                               \
    _tile_loadd(4, weights, 64);                                          \
    _tile_dpbsud(high_tile, 2, 4);                                        \
    _tile_dpbuud(low_tile, 3, 4);                                         \
  } while (false)

// Adds a block's products for 16 rows to acc, from its integer sums stored in high_sums and low_sums [16][16], as
// dot_panel_pairs does.
CHIPI_AMX inline void scale_block_sums(const int32_t* high_sums, const int32_t* low_sums, const float* row_scales,
                                       const float* row_sums, int64_t blocks, __m512 weight_scales, __m512 mins,
                                       __m512* acc) {
  for (int r = 0; r < kTileRows; ++r) {
    const __m512i sums = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(high_sums + 16 * r), 8),
                                          _mm512_load_si512(low_sums + 16 * r));
    const __m512 combined = _mm512_mul_ps(weight_scales, _mm512_set1_ps(row_scales[r * blocks]));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), combined, acc[r]);
    acc[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(row_sums[r * blocks]), acc[r]);
  }
}

// out[r, 8 p ..) for rows [0, M) (a multiple of 16, in tile order: see panel_linear) and the panels
// [p_begin, p_end), two at a time (an odd last one read twice and stored once). unpacked: blocks * 512 bytes. Two
// blocks' sums are in tiles at a time (0 and 1 for even blocks, 5 and 6 for odd ones): block b's products run while
// block b - 1's sums are scaled.
CHIPI_AMX void tile_panel_pairs(const SplitRows& rows, int64_t M, int64_t K, const uint8_t* weights,
                                const uint16_t* scales, float* out, int64_t N, int64_t p_begin, int64_t p_end,
                                uint8_t* unpacked) {
  constexpr int64_t kBytes = panel_block_bytes(true), kScales = panel_block_scales(true);
  const int64_t blocks = K / kBlock, panel_bytes = blocks * kBytes, panel_scales = blocks * kScales;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const TileConfig config;
  _tile_loadconfig(&config);
  alignas(64) int32_t high_sums[kTileRows * 16], low_sums[kTileRows * 16];
  for (int64_t p = p_begin; p < p_end; p += 2) {
    const auto [first, second, first_scales, second_scales, both] =
        panel_pair(weights, scales, panel_bytes, panel_scales, p, p_end);
    for (int64_t b = 0; b < blocks; ++b)  // tile row v: weights 4 v .. 4 v + 3 of the 16 columns
      for (int c = 0; c < 4; ++c) {
        const __m512i bytes = two_chunks(first + b * kBytes + 32 * c, second + b * kBytes + 32 * c);
        _mm512_store_si512(unpacked + 512 * b + 64 * c, _mm512_and_si512(bytes, nibble));
        _mm512_store_si512(unpacked + 512 * b + 64 * (c + 4), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble));
      }
    for (int64_t m = 0; m < M; m += kTileRows) {
      const int8_t* high = rows.high + m * K;  // in tile order: [blocks][16 rows][32]
      const uint8_t* low = rows.low + m * K;
      __m512 acc[kTileRows];
      for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_ps();
      const auto scale_previous = [&](int64_t b) CHIPI_AMX {
        const int64_t at = (b - 1) * kScales;
        scale_block_sums(high_sums, low_sums, rows.scales + m * blocks + b - 1, rows.sums + m * blocks + b - 1,
                         blocks, sixteen_halves(first_scales + at, second_scales + at),
                         sixteen_halves(first_scales + at + kPanel, second_scales + at + kPanel), acc);
      };
      for (int64_t b = 0; b <= blocks; ++b) {
        if (b > 0 && b % 2 == 1) {  // block b - 1's sums, out of their tiles before block b's products start
          _tile_stored(0, high_sums, 64);
          _tile_stored(1, low_sums, 64);
        } else if (b > 0) {
          _tile_stored(5, high_sums, 64);
          _tile_stored(6, low_sums, 64);
        }
        const int8_t* h = high + b * kTileRows * kBlock;
        const uint8_t* l = low + b * kTileRows * kBlock;
        if (b < blocks && b % 2 == 0)
          CHIPI_TILE_BLOCK_SUMS(0, 1, h, l, kBlock, unpacked + 512 * b);
        else if (b < blocks)
          CHIPI_TILE_BLOCK_SUMS(5, 6, h, l, kBlock, unpacked + 512 * b);
        if (b > 0) scale_previous(b);
      }
      for (int64_t r = 0; r < kTileRows; ++r)
        _mm512_mask_storeu_ps(out + (m + r) * N + p * kPanel, both ? 0xFFFF : 0x00FF, acc[r]);
    }
  }
  _tile_release();
}

// x's rows (split; the first tiled_rows, a multiple of 16, in tile order: see panel_linear) times 4-bit weights in
// panels: 16 rows at a time by AMX tiles, the last few (M % 16) by dot_panel_pairs, whose results are the same bit
// for bit; the threads share the panels.
void tile_products(const SplitRows& all, int64_t M, int64_t tiled_rows, int64_t K, const uint8_t* wp,
                   const uint16_t* sp, float* op, int64_t N) {
  const int64_t panels = N / kPanel, blocks = K / kBlock;
  at::parallel_for(0, (panels + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const int64_t p_begin = 2 * begin, p_end = std::min(2 * end, panels);
    at::Tensor unpacked = at::empty({blocks * 512}, at::kByte);  // 64-byte aligned, as tile rows want
    tile_panel_pairs(all, tiled_rows, K, wp, sp, op, N, p_begin, p_end, unpacked.data_ptr<uint8_t>());
    for (int64_t m = tiled_rows; m < M; m += 8)
      with_rows<8>(M - m, [&](auto count) {
        dot_panel_pairs<true, true, count>(all.from(m, K), K, wp, sp, op + m * N, N, p_begin, p_end);
      });
  });
}
#else
bool has_amx() { return false; }
void tile_products(const SplitRows&, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*, float*, int64_t) {
  TORCH_CHECK(false, "chipi: built without AMX");
}
#endif  // CHIPI_AMX_BUILD

// Whether this CPU (and its operating system) runs the AVX-512 VNNI products.
bool has_avx512_vnni() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return supported;
}

template <bool kQ4>
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales);

template <bool kQ4>
at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& weights, const at::Tensor& scales,
                            int64_t matrix_rows, int64_t activation_bits = 16) {
  const int64_t K = input.size(-1);
  const bool panels = weights.dim() == 3;  // blocks in panels of 8 output columns
  const int64_t N = panels ? weights.size(0) * kPanel : scales.size(0);
  TORCH_CHECK(input.scalar_type() == at::kFloat, "chipi quantized_linear: float32 input expected");
  TORCH_CHECK(K % kBlock == 0 && (panels ? weights.size(1) * kBlock == K : scales.size(-1) * kBlock == K),
              "chipi quantized_linear: shapes do not match");
  TORCH_CHECK(activation_bits == 16 || (activation_bits == 8 && panels && kQ4),
              "chipi quantized_linear: activations of 16 bits, or of 8 for 4-bit weights in panels");
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous() &&
                  weights.numel() == N * (kQ4 ? K / 2 : K),
              "chipi quantized_linear: contiguous uint8 weights of the scales' shape expected");
  auto x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  auto shape = input.sizes().vec();
  shape.back() = N;
  // From matrix_rows rows on (a prompt): 16-bit activations, read by the panels' products with AVX-512 VNNI, which
  // took 4.2x (16 rows) to 2.8x (1,024 rows) less time than float32 products on dequantized tiles for the default
  // model's 30 layers on an AMD EPYC; with AVX2 alone, by them up to kAvx2PanelRows rows (see there); by float32
  // products on dequantized tiles elsewhere (more rows on AVX2, and the rows layout).
  const bool prompt = M >= matrix_rows;
  const bool integer_products = panels && (has_avx512_vnni() || (kQ4 && M <= kAvx2PanelRows));
  if (prompt && !integer_products) return tiled_linear<kQ4>(x, weights, scales).view(shape);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "chipi: float16 scales expected");
  const int64_t blocks = K / kBlock;
  const float* xp = x.data_ptr<float>();
  if (panels) {
    auto out = at::empty({M, N}, x.options());
    panel_linear<kQ4>(xp, M, K, weights.data_ptr<uint8_t>(),
                      reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), out.data_ptr<float>(), N,
                      prompt ? 16 : activation_bits);
    return out.view(shape);
  }
  if (has_avx512_vnni()) {
    auto out = at::empty({M, N}, x.options());
    paired_linear<kQ4>(xp, M, K, weights.data_ptr<uint8_t>(),
                       reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), out.data_ptr<float>(), N);
    return out.view(shape);
  }
  std::vector<int16_t> x16(M * K);
  std::vector<float> x_scales(M * blocks), block_sums(M * blocks);
  for (int64_t i = 0; i < M * blocks; ++i) round_block(xp + i * kBlock, x16.data() + i * kBlock, x_scales[i], block_sums[i]);
  auto out = at::empty({M, N}, x.options());
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // whole cache lines of its own, as each thread writes its own for every output column
    std::vector<__m256> combined((4 * blocks + 7) / 8);
    float* scratch = reinterpret_cast<float*>(combined.data());
    for (int64_t m = 0; m < M; m += 4) {  // up to 4 rows share each unpacked block
      const Rounded rows{x16.data() + m * K, x_scales.data() + m * blocks, block_sums.data() + m * blocks};
      float* om = op + m * N;
      with_rows<4>(M - m, [&](auto count) { dot_rows<kQ4, count>(rows, K, wp, sp, om, N, begin, end, scratch); });
    }
  });
  return out.view(shape);
}

// The float32 weights the blocks stand for, [N, K] (for products of many rows, which run faster as a matrix
// product on float32 weights than block by block).
// Rows [n_begin, n_end) of the float32 weights the blocks stand for, into out (row stride blocks * 32).
template <bool kQ4>
void dequantize_rows(const uint8_t* weights, const uint16_t* scales, int64_t blocks, int64_t n_begin, int64_t n_end,
                     float* out) {
  const int64_t block_bytes = bytes_per_block(kQ4);
  const int64_t scales_per_row = scales_per_block(kQ4) * blocks;
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i halves[2];
      unpack_block<kQ4>(weights + (n * blocks + b) * block_bytes, halves[0], halves[1]);
      const __m256 scale = _mm256_set1_ps(half_to_float(scales[n * scales_per_row + b]));
      const __m256 min = _mm256_set1_ps(kQ4 ? half_to_float(scales[n * scales_per_row + blocks + b]) : 0.0f);
      float* o = out + (n - n_begin) * blocks * kBlock + b * kBlock;
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 2; ++j) {
          const __m128i eight = j ? _mm256_extracti128_si256(halves[h], 1) : _mm256_castsi256_si128(halves[h]);
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
          _mm256_storeu_ps(o + 16 * h + 8 * j, _mm256_fmadd_ps(q, scale, min));
        }
    }
}

template <bool kQ4>
at::Tensor dequantize(const at::Tensor& weights, const at::Tensor& scales) {
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  if (weights.dim() == 3) {
    const int64_t panels = weights.size(0), blocks = weights.size(1);
    auto out = at::empty({panels * kPanel, blocks * kBlock}, scales.options().dtype(at::kFloat));
    float* op = out.data_ptr<float>();
    at::parallel_for(0, panels, 2, [&](int64_t begin, int64_t end) {
      dequantize_panels<kQ4>(wp, sp, blocks, begin, end, op + begin * kPanel * blocks * kBlock);
    });
    return out;
  }
  const int64_t N = scales.size(0);
  const int64_t blocks = scales.size(-1);
  auto out = at::empty({N, blocks * kBlock}, scales.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    dequantize_rows<kQ4>(wp, sp, blocks, begin, end, op + begin * blocks * kBlock);
  });
  return out;
}

// x [M, K] times the blocks' weights for many rows (a prompt): tiles of output rows are dequantized into a buffer
// that stays in the CPU's cache and multiplied there by a float32 matrix product, so the float32 weights are never
// written out whole (that alone took longer than the products).
template <bool kQ4>
at::Tensor tiled_linear(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales) {
  constexpr int64_t kTile = 128;
  const bool panels = weights.dim() == 3;
  const int64_t M = x.size(0), K = x.size(1), N = panels ? weights.size(0) * kPanel : scales.size(0);
  const int64_t blocks = K / kBlock;
  auto out = at::empty({M, N}, x.options());
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  // output rows [begin, end) dequantized into out; with panels, begin and end are multiples of 8 (the tiles' sizes)
  auto dequantize_range = [&](int64_t begin, int64_t end, float* tile) {
    if (panels)
      dequantize_panels<kQ4>(wp, sp, blocks, begin / kPanel, end / kPanel, tile);
    else
      dequantize_rows<kQ4>(wp, sp, blocks, begin, end, tile);
  };
  if (M >= kLargeRows) {  // a long prompt: the products dominate; each tile's runs on every thread
    constexpr int64_t kLargeTile = 1024;
    auto tile = at::empty({std::min(kLargeTile, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += kLargeTile) {
      const int64_t rows = std::min(kLargeTile, N - n0);
      float* tp = tile.data_ptr<float>();
      at::parallel_for(0, (rows + kPanel - 1) / kPanel, 2, [&](int64_t begin, int64_t end) {  // groups of 8 rows
        dequantize_range(n0 + begin * kPanel, n0 + std::min(end * kPanel, rows), tp + begin * kPanel * K);
      });
      out.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
    }
    return out;
  }
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference);  // the caller's mode, which is thread-local
    auto tile = at::empty({kTile, K}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTile, rows = std::min(kTile, N - n0);
      dequantize_range(n0, n0 + rows, tile.data_ptr<float>());
      // inside a parallel region, this product runs on the calling thread only
      out.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
    }
  });
  return out;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t matrix_rows,
                     int64_t activation_bits) {
  return quantized_linear<true>(x, w, s, matrix_rows, activation_bits);
}
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t matrix_rows) {
  return quantized_linear<false>(x, w, s, matrix_rows);
}
at::Tensor q4_dequantize(const at::Tensor& w, const at::Tensor& s) { return dequantize<true>(w, s); }
at::Tensor q8_dequantize(const at::Tensor& w, const at::Tensor& s) { return dequantize<false>(w, s); }

// RMSNorm of each row of x (float32 sums), times weight: transformers' LlamaRMSNorm in one pass.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "chipi rms_norm: float32");
  const int64_t D = input.size(-1);
  auto x = input.contiguous();
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = x.numel() / D;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * D;
      float squares = 0;
      for (int64_t i = 0; i < D; ++i) squares += row[i] * row[i];
      const float inverse = 1.0f / std::sqrt(squares / D + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) op[r * D + i] = wp[i] * (row[i] * inverse);
    }
  });
  return out;
}

// hidden += delta (in place), then the RMSNorm of the new hidden: a residual connection and the next norm in one pass.
at::Tensor add_rms_norm(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.is_contiguous() && hidden.scalar_type() == at::kFloat, "chipi add_rms_norm: contiguous float32");
  TORCH_CHECK(delta.numel() == hidden.numel(), "chipi add_rms_norm: shapes do not match");
  const auto d = delta.contiguous();
  const int64_t D = hidden.size(-1);
  float* hp = hidden.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  const int64_t n = hidden.numel();
  for (int64_t i = 0; i < n; ++i) hp[i] += dp[i];
  return rms_norm(hidden, weight, eps);
}

// e^x for 8 floats (Cephes' expf: x = n ln 2 + r, e^r by a polynomial; about 1e-7 relative error). Below -88 the
// result is 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

// 8 consecutive elements of the cache's keys or values as floats: it holds float32, or float16 (half the bytes that
// a decode step's attention reads; CHIPI_KV_CACHE_DTYPE).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// out[0 .. 8 kVectors) = inverse times the sum over keys j of weights[j] times value row j (row stride `stride`);
// keys whose weight is 0 (padding) are skipped. The count is fixed at compile time so that the sums stay in registers.
template <int kVectors, typename T>
inline void weighted_values(const float* weights, int64_t L, const T* value, int64_t stride, __m256 inverse,
                            float* out) {
  __m256 sums[kVectors];
  for (int t = 0; t < kVectors; ++t) sums[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    if (weights[j] == 0.0f) continue;
    const __m256 w = _mm256_set1_ps(weights[j]);
    const T* row = value + j * stride;
    for (int t = 0; t < kVectors; ++t) sums[t] = _mm256_fmadd_ps(w, load8(row + 8 * t), sums[t]);
  }
  for (int t = 0; t < kVectors; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_mul_ps(sums[t], inverse));
}

// decode_attention's work for keys and values of element type T (float, or at::Half), into out [R, 1, H * D].
template <typename T>
void attend_one_token(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const int64_t* mp,
                      double scale, at::Tensor& out) {
  const int64_t R = query.size(0), H = query.size(1), D = query.size(3);
  const int64_t KV = keys.size(1), L = keys.size(2);
  const int64_t group = H / KV;
  const float* qp = query.data_ptr<float>();
  const T* kp = keys.data_ptr<T>();
  const T* vp = values.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(L);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / H, h = i % H, g = h / group;
      const float* q = qp + r * query.stride(0) + h * query.stride(1);
      const T* k = kp + r * keys.stride(0) + g * keys.stride(1);
      const T* v = vp + r * values.stride(0) + g * values.stride(1);
      const int64_t key_stride = keys.stride(2);
      int64_t j = 0;
      for (; j + 8 <= L; j += 8) {  // 8 keys at a time: 8 independent sums, reduced together
        const T* key = k + j * key_stride;
        __m256 sums[8];
        for (int t = 0; t < 8; ++t) sums[t] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qd = _mm256_loadu_ps(q + d);
          for (int t = 0; t < 8; ++t) sums[t] = _mm256_fmadd_ps(qd, load8(key + t * key_stride + d), sums[t]);
        }
        _mm256_storeu_ps(weights.data() + j, _mm256_mul_ps(sum_each(sums), _mm256_set1_ps(softmax_scale)));
      }
      for (; j < L; ++j) {
        const T* key = k + j * key_stride;
        __m256 sum = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(key + d), sum);
        weights[j] = horizontal_sum(sum) * softmax_scale;
      }
      if (mp != nullptr)
        for (j = 0; j < L; ++j)
          if (mp[r * L + j] == 0) weights[j] = -std::numeric_limits<float>::infinity();
      __m256 largest8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (j = 0; j + 8 <= L; j += 8) largest8 = _mm256_max_ps(largest8, _mm256_loadu_ps(weights.data() + j));
      float largest = horizontal_max(largest8);
      for (; j < L; ++j) largest = std::max(largest, weights[j]);
      float total = 0;
      j = 0;
      __m256 sums = _mm256_setzero_ps();
      for (; j + 8 <= L; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(weights.data() + j), _mm256_set1_ps(largest)));
        _mm256_storeu_ps(weights.data() + j, e);
        sums = _mm256_add_ps(sums, e);
      }
      total = horizontal_sum(sums);
      for (; j < L; ++j) {
        weights[j] = std::exp(weights[j] - largest);
        total += weights[j];
      }
      const __m256 inverse = _mm256_set1_ps(1.0f / total);
      const int64_t value_stride = values.stride(2);
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        float* o_chunk = op + r * H * D + h * D + d0;
        const T* v_chunk = v + d0;
        switch (std::min<int64_t>(8, (D - d0) / 8)) {
          case 8: weighted_values<8>(weights.data(), L, v_chunk, value_stride, inverse, o_chunk); break;
          case 6: weighted_values<6>(weights.data(), L, v_chunk, value_stride, inverse, o_chunk); break;
          case 4: weighted_values<4>(weights.data(), L, v_chunk, value_stride, inverse, o_chunk); break;
          case 2: weighted_values<2>(weights.data(), L, v_chunk, value_stride, inverse, o_chunk); break;
          default: TORCH_CHECK(false, "chipi decode_attention: head size not a multiple of 16");
        }
      }
    }
  });
}

// The attention kernels' operands: a float32 query over float32 or float16 keys and values (returned: the cache's
// type), each with its last dimension contiguous. `op` names the kernel in the error.
at::ScalarType check_attention_operands(const char* op, const at::Tensor& query, const at::Tensor& keys,
                                        const at::Tensor& values) {
  const auto cached = keys.scalar_type();
  TORCH_CHECK(query.scalar_type() == at::kFloat && (cached == at::kFloat || cached == at::kHalf) &&
                  values.scalar_type() == cached,
              "chipi ", op, ": a float32 query over float32 or float16 keys and values expected");
  TORCH_CHECK(query.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, "chipi ", op,
              ": the last dimension must be contiguous");
  return cached;
}

// Attention of one new token per row (a decode step): query [R, H, 1, D], keys and values [R, KV, L, D] (views of
// the cache, float32 or float16; H a multiple of KV, grouped-query attention), mask [R, L] (1: a real token, 0:
// padding) or none. Returns [R, 1, H * D] float32, the heads side by side, ready for the output projection. Same as
// PyTorch's scaled_dot_product_attention there, without its fixed cost per call (most of the call at short lengths).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& mask, double scale) {
  const int64_t R = query.size(0), H = query.size(1), D = query.size(3);
  const int64_t KV = keys.size(1), L = keys.size(2);
  TORCH_CHECK(query.size(2) == 1 && H % KV == 0 && D % 16 == 0, "chipi decode_attention: unsupported shapes");
  const auto cached = check_attention_operands("decode_attention", query, keys, values);
  std::optional<at::Tensor> mask_rows;
  if (mask) {
    mask_rows = mask->to(at::kLong).contiguous();
    TORCH_CHECK(mask_rows->size(0) == R && mask_rows->size(1) == L, "chipi decode_attention: mask shape");
  }
  const int64_t* mp = mask_rows ? mask_rows->data_ptr<int64_t>() : nullptr;
  auto out = at::empty({R, 1, H * D}, query.options());
  if (cached == at::kHalf)
    attend_one_token<at::Half>(query, keys, values, mp, scale, out);
  else
    attend_one_token<float>(query, keys, values, mp, scale, out);
  return out;
}

// --- Attention of a prompt's new tokens over the cache (AVX-512) ----------------------------------------------------
//
// A prompt pass (a turn's message after a conversation's cached history, or a long message read 64 tokens a pass)
// attends each new token over every cached column and the new ones up to its own. PyTorch's scaled dot-product
// attention wants float32 keys and values (a float16 cache converted whole, every layer) and a boolean mask for that
// offset causal rule; at turn 10 of a conversation the two took half the pass. Here a key/value head's query rows
// (its query heads times the new tokens, token by token) are taken 16 at a time, one per lane: a key's score for 16
// rows is a broadcast multiply-add per dimension, the softmax runs down the lanes without horizontal sums, each row's
// causal end is a lane mask, and float16 keys and values are converted a few rows at a time as they are read.

constexpr int64_t kKeysPerStep = 8;      // keys scored together, each into an accumulator of its own
constexpr int64_t kValuesPerBlock = 32;  // value rows converted to float32 at a time

CHIPI_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
CHIPI_AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for 16 floats: exp8 on each half.
CHIPI_AVX512 inline __m512 exp16(__m512 x) {
  const __m256 low = exp8(_mm512_castps512_ps256(x));
  const __m256 high = exp8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low)), _mm256_castps_pd(high), 1));
}

// Rows [0, count) of a cache view (row stride `stride`, D elements each) as float32: where they are for a float32
// cache, else converted into `scratch` (count * D floats).
template <typename T>
CHIPI_AVX512 inline const float* float_rows(const T* rows, int64_t stride, int64_t count, int64_t D, float* scratch,
                                            int64_t& float_stride) {
  if constexpr (std::is_same_v<T, float>) {
    float_stride = stride;
    return rows;
  } else {
    for (int64_t j = 0; j < count; ++j)
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(scratch + j * D + d, load16(rows + j * stride + d));
    float_stride = D;
    return scratch;
  }
}

// scores[u] (V vectors of 16 lanes, a lane per query row) = the query rows (queries_t [D][16 V], transposed) dotted
// with key u, for the N keys at `keys` (row stride `stride`). Each key's broadcast serves V vectors of rows.
template <int N, int V>
CHIPI_AVX512 inline void score_keys(const float* queries_t, const float* keys, int64_t stride, int64_t D,
                                    float* scores) {
  __m512 sums[N][V];
  for (int u = 0; u < N; ++u)
    for (int v = 0; v < V; ++v) sums[u][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 q[V];
    for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_ps(queries_t + 16 * (V * d + v));
    for (int u = 0; u < N; ++u) {
      const __m512 key = _mm512_set1_ps(keys[u * stride + d]);
      for (int v = 0; v < V; ++v) sums[u][v] = _mm512_fmadd_ps(key, q[v], sums[u][v]);
    }
  }
  for (int u = 0; u < N; ++u)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(scores + 16 * (V * u + v), sums[u][v]);
}

// out_t [D][16 V] += the weights [count][16 V] (a lane per query row) times the count value rows at `values`.
template <int V>
CHIPI_AVX512 inline void add_weighted_values(const float* weights, const float* values, int64_t stride,
                                             int64_t count, int64_t D, float* out_t) {
  constexpr int kDims = 16 / V;  // dimensions per pass: 16 accumulators
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    __m512 sums[kDims][V];
    for (int u = 0; u < kDims; ++u)
      for (int v = 0; v < V; ++v) sums[u][v] = _mm512_loadu_ps(out_t + 16 * (V * (d0 + u) + v));
    for (int64_t j = 0; j < count; ++j) {
      __m512 w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_ps(weights + 16 * (V * j + v));
      const float* value = values + j * stride + d0;
      for (int u = 0; u < kDims; ++u) {
        const __m512 x = _mm512_set1_ps(value[u]);
        for (int v = 0; v < V; ++v) sums[u][v] = _mm512_fmadd_ps(x, w[v], sums[u][v]);
      }
    }
    for (int u = 0; u < kDims; ++u)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(out_t + 16 * (V * (d0 + u) + v), sums[u][v]);
  }
}

// One unit of prompt_attention's work: the 16 V query rows from `first` on of row r's key/value head g (keys and
// values of element type T: float, or at::Half), into out [R, T, H * D]. Buffers: queries_t and out_t 32 D floats,
// weights 32 (L + kKeysPerStep), scratch kValuesPerBlock * D.
template <typename T, int V>
CHIPI_AVX512 void attend_query_rows(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                    float softmax_scale, int64_t r, int64_t g, int64_t first, float* queries_t,
                                    float* out_t, float* weights, float* scratch, at::Tensor& out) {
  constexpr int64_t kLanes = 16 * V;
  const int64_t H = query.size(1), tokens = query.size(2), D = query.size(3);
  const int64_t L = keys.size(2), group = H / keys.size(1), cached = L - tokens;
  const int64_t count = std::min<int64_t>(kLanes, group * tokens - first);
  // Query row i of this head is token i / group of query head g * group + i % group; it sees the columns up to its
  // token's own. Lanes past the last row attend with zero queries over every column, and are dropped.
  const int64_t columns = cached + (first + count - 1) / group + 1;  // the last row's: the most any row sees
  alignas(64) int32_t visible[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const int64_t i = first + lane, t = i / group, h = g * group + i % group;
    visible[lane] = static_cast<int32_t>(lane < count ? cached + t + 1 : columns);
    const float* q = query.data_ptr<float>() + r * query.stride(0) + h * query.stride(1) + t * query.stride(2);
    for (int64_t d = 0; d < D; ++d) queries_t[kLanes * d + lane] = lane < count ? q[d] * softmax_scale : 0.0f;
  }
  const T* k = keys.data_ptr<T>() + r * keys.stride(0) + g * keys.stride(1);
  const T* v = values.data_ptr<T>() + r * values.stride(0) + g * values.stride(1);
  const int64_t key_stride = keys.stride(2), value_stride = values.stride(2);
  int64_t stride = 0;
  int64_t j = 0;
  for (; j + kKeysPerStep <= columns; j += kKeysPerStep) {
    const float* rows = float_rows(k + j * key_stride, key_stride, kKeysPerStep, D, scratch, stride);
    score_keys<kKeysPerStep, V>(queries_t, rows, stride, D, weights + kLanes * j);
  }
  if (j < columns) {  // the last few keys, converted and padded with zero keys (their scores land past the end)
    const int64_t left = columns - j;
    for (int64_t u = 0; u < kKeysPerStep; ++u)
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(scratch + u * D + d, u < left ? load16(k + (j + u) * key_stride + d) : _mm512_setzero_ps());
    score_keys<kKeysPerStep, V>(queries_t, scratch, D, D, weights + kLanes * j);
  }
  const __m512 hidden = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float inverse[kLanes];  // of each row's sum of weights
  for (int64_t part = 0; part < V; ++part) {  // the softmax of each vector of rows, down its lanes
    float* w = weights + 16 * part;
    const int64_t start = cached + (first + 16 * part) / group + 1;  // past its first row's last column
    const __m512i ends = _mm512_load_si512(visible + 16 * part);
    for (j = start; j < columns; ++j) {  // hidden from some of its rows
      const __mmask16 seen = _mm512_cmpgt_epi32_mask(ends, _mm512_set1_epi32(static_cast<int32_t>(j)));
      _mm512_storeu_ps(w + kLanes * j, _mm512_mask_blend_ps(seen, hidden, _mm512_loadu_ps(w + kLanes * j)));
    }
    __m512 largest = hidden;
    for (j = 0; j < columns; ++j) largest = _mm512_max_ps(largest, _mm512_loadu_ps(w + kLanes * j));
    __m512 total = _mm512_setzero_ps();
    for (j = 0; j < columns; ++j) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(w + kLanes * j), largest));
      _mm512_storeu_ps(w + kLanes * j, e);
      total = _mm512_add_ps(total, e);
    }
    _mm512_store_ps(inverse + 16 * part, _mm512_div_ps(_mm512_set1_ps(1.0f), total));
  }
  std::fill(out_t, out_t + D * kLanes, 0.0f);
  for (j = 0; j < columns; j += kValuesPerBlock) {
    const int64_t block = std::min(kValuesPerBlock, columns - j);
    const float* rows = float_rows(v + j * value_stride, value_stride, block, D, scratch, stride);
    add_weighted_values<V>(weights + kLanes * j, rows, stride, block, D, out_t);
  }
  for (int64_t lane = 0; lane < count; ++lane) {
    const int64_t i = first + lane, t = i / group, h = g * group + i % group;
    float* o = out.data_ptr<float>() + ((r * tokens + t) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = out_t[kLanes * d + lane] * inverse[lane];
  }
}

// Units of 32 query rows (a head's last one 16 where no more are left), shared between the threads.
template <typename T>
void attend_new_tokens(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, double scale,
                       at::Tensor& out) {
  const int64_t R = query.size(0), H = query.size(1), tokens = query.size(2), D = query.size(3);
  const int64_t KV = keys.size(1), L = keys.size(2), rows = H / KV * tokens, units = (rows + 31) / 32;
  at::parallel_for(0, R * KV * units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries_t(32 * D), out_t(32 * D), weights(32 * (L + kKeysPerStep)),
        scratch(kValuesPerBlock * D);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / (KV * units), g = unit / units % KV, first = unit % units * 32;
      if (rows - first > 16)
        attend_query_rows<T, 2>(query, keys, values, static_cast<float>(scale), r, g, first, queries_t.data(),
                                out_t.data(), weights.data(), scratch.data(), out);
      else
        attend_query_rows<T, 1>(query, keys, values, static_cast<float>(scale), r, g, first, queries_t.data(),
                                out_t.data(), weights.data(), scratch.data(), out);
    }
  });
}

// Attention of a prompt pass's new tokens (no padding): query [R, H, T, D], keys and values [R, KV, L, D] (views of
// the cache, float32 or float16, whose last T columns are the new tokens'; H a multiple of KV, D of 16). Token t
// sees columns [0, L - T + t]. Returns [R, T, H * D] float32, the heads side by side. Needs AVX-512
// (prompt_attention_supported); the same as scaled_dot_product_attention with that causal mask, to float32 rounding.
at::Tensor prompt_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, double scale) {
  const int64_t R = query.size(0), H = query.size(1), tokens = query.size(2), D = query.size(3);
  const int64_t KV = keys.size(1), L = keys.size(2);
  TORCH_CHECK(has_avx512_vnni(), "chipi prompt_attention: needs AVX-512");
  TORCH_CHECK(H % KV == 0 && D % 16 == 0 && tokens <= L && keys.sizes() == values.sizes() && keys.size(0) == R &&
                  keys.size(3) == D,
              "chipi prompt_attention: unsupported shapes");
  const auto cached = check_attention_operands("prompt_attention", query, keys, values);
  auto out = at::empty({R, tokens, H * D}, query.options());
  if (cached == at::kHalf)
    attend_new_tokens<at::Half>(query, keys, values, scale, out);
  else
    attend_new_tokens<float>(query, keys, values, scale, out);
  return out;
}

// silu(gate) * up, where the last dimension of x is [gate | up].
at::Tensor silu_mul(const at::Tensor& input) {
  const int64_t D = input.size(-1) / 2;
  auto x = input.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = D;
  auto out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = x.numel() / (2 * D);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * 2 * D;
      const float* up = gate + D;
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(op + r * D + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
      }
      for (; i < D; ++i) op[r * D + i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// Rotates each head's (even, odd) pairs of the first `heads` heads of every row of x [R, 1, width] in place by
// rotation [R, D / 2, 2]: each row's (cos, sin) per pair, times the rotary scaling, at the row's position. The
// complex product LlamaForward.forward computes, the weights' rows being stored pair by pair (_rotary_pairs).
void rotate_heads(at::Tensor& x, const at::Tensor& rotation, int64_t heads, int64_t D) {
  const int64_t R = x.size(0), width = x.size(-1), half = D / 2;
  float* xp = x.data_ptr<float>();
  const float* rp = rotation.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* cos_sin = rp + r * half * 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* head = xp + r * width + h * D;
      for (int64_t j = 0; j < half; ++j) {
        const float a = head[2 * j], b = head[2 * j + 1], c = cos_sin[2 * j], s = cos_sin[2 * j + 1];
        head[2 * j] = a * c - b * s;
        head[2 * j + 1] = a * s + b * c;
      }
    }
  }
}

// A decode step (one new token per row) through every layer in one call: what LlamaForward.forward does there,
// operation for operation, without going back to Python (and PyTorch's dispatcher) some 25 times per layer.
// hidden [R, 1, dim]: the embeddings, then the residual stream (updated in place). Layer i's tensors are
// weights[10 i ...]: the blocks (data, scales) of its qkv, output, gate_up and down products, then its attention and
// mlp norms; bits[4 i ...] are those products' bits (4 or 8). Its new key and value go into column `length` of
// key_rooms[i] and value_rooms[i] [R, KV, room, D], and its attention reads columns [0, length]. rotation
// [R, D / 2, 2]: see rotate_heads. mask [R, length + 1] (1: a real token) or none; scale: the attention's softmax
// scale; activation_bits: those of the 4-bit products in panels (see panel_linear). Returns the final norm's output.
at::Tensor decode_layers(at::Tensor hidden, at::TensorList weights, at::IntArrayRef bits, at::TensorList key_rooms,
                         at::TensorList value_rooms, int64_t length, const at::Tensor& rotation,
                         const std::optional<at::Tensor>& mask, const at::Tensor& final_norm, int64_t heads,
                         int64_t kv_heads, double eps, double scale, int64_t matrix_rows,
                         int64_t activation_bits) {
  const int64_t layers = static_cast<int64_t>(key_rooms.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * layers && static_cast<int64_t>(bits.size()) == 4 * layers &&
                  static_cast<int64_t>(value_rooms.size()) == layers,
              "chipi decode_layers: 10 tensors, 4 bit widths and 2 rooms per layer expected");
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(1) == 1 && hidden.is_contiguous() && rotation.is_contiguous(),
              "chipi decode_layers: hidden [rows, 1, dim] and rotation contiguous");
  const int64_t R = hidden.size(0), D = rotation.size(1) * 2, KV = kv_heads;
  auto linear = [&](const at::Tensor& x, int64_t index, int64_t part) {
    const at::Tensor& data = weights[index];
    const at::Tensor& scales = weights[index + 1];
    return bits[part] == 4 ? quantized_linear<true>(x, data, scales, matrix_rows, data.dim() == 3 ? activation_bits : 16)
                           : quantized_linear<false>(x, data, scales, matrix_rows);
  };
  at::Tensor normed = rms_norm(hidden, weights[8], eps);
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t w = 10 * i, b = 4 * i;
    at::Tensor qkv = linear(normed, w, b);  // [R, 1, (H + 2 KV) D], contiguous
    rotate_heads(qkv, rotation, heads + KV, D);
    const at::Tensor& key_room = key_rooms[i];
    const at::Tensor& value_room = value_rooms[i];
    TORCH_CHECK(key_room.size(2) > length && value_room.size(2) > length, "chipi decode_layers: no room left");
    key_room.select(2, length).copy_(qkv.narrow(-1, heads * D, KV * D).view({R, KV, D}));
    value_room.select(2, length).copy_(qkv.narrow(-1, (heads + KV) * D, KV * D).view({R, KV, D}));
    const at::Tensor query = qkv.narrow(-1, 0, heads * D).view({R, 1, heads, D}).transpose(1, 2);
    const at::Tensor attended = decode_attention(query, key_room.narrow(2, 0, length + 1),
                                                 value_room.narrow(2, 0, length + 1), mask, scale);
    normed = add_rms_norm(hidden, linear(attended, w + 2, b + 1), weights[w + 9], eps);
    const at::Tensor& next_norm = i + 1 < layers ? weights[w + 10 + 8] : final_norm;
    const at::Tensor gated = silu_mul(linear(normed, w + 4, b + 2));
    normed = add_rms_norm(hidden, linear(gated, w + 6, b + 3), next_norm, eps);
  }
  return normed;
}

}  // namespace

TORCH_LIBRARY(chipi, m) {
  // matrix_rows: from this many rows of x on (cpu_layers.FLOAT32_ROWS), 16-bit activations: by float32 matrix
  // products on dequantized tiles unless the weights are in panels and the CPU has AVX-512 VNNI (quantized_linear)
  // activation_bits: 16, or 8 for 4-bit weights in panels (see panel_linear)
  m.def("q4_linear(Tensor x, Tensor weights, Tensor scales, int matrix_rows, int activation_bits=16) -> Tensor",
        q4_linear);
  m.def("q8_linear(Tensor x, Tensor weights, Tensor scales, int matrix_rows) -> Tensor", q8_linear);
  m.def("q4_dequantize(Tensor weights, Tensor scales) -> Tensor", q4_dequantize);
  m.def("q4_to_panels(Tensor weights, Tensor scales) -> (Tensor, Tensor)", to_panels<true>);
  m.def("q4_from_panels(Tensor weights, Tensor scales) -> (Tensor, Tensor)", from_panels<true>);
  m.def("q8_to_panels(Tensor weights, Tensor scales) -> (Tensor, Tensor)", to_panels<false>);
  m.def("q8_from_panels(Tensor weights, Tensor scales) -> (Tensor, Tensor)", from_panels<false>);
  m.def("q8_panels_supported() -> bool", has_avx512_vnni);
  m.def("q8_dequantize(Tensor weights, Tensor scales) -> Tensor", q8_dequantize);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("silu_mul(Tensor x) -> Tensor", silu_mul);
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor? mask, float scale) -> Tensor",
        decode_attention);
  m.def("prompt_attention(Tensor query, Tensor keys, Tensor values, float scale) -> Tensor", prompt_attention);
  m.def("prompt_attention_supported() -> bool", has_avx512_vnni);
  m.def("add_rms_norm(Tensor(a!) hidden, Tensor delta, Tensor weight, float eps) -> Tensor", add_rms_norm);
  m.def("decode_layers(Tensor(a!) hidden, Tensor[] weights, int[] bits, Tensor(b!)[] key_rooms, "
        "Tensor(c!)[] value_rooms, int length, Tensor rotation, Tensor? mask, Tensor final_norm, int heads, "
        "int kv_heads, float eps, float scale, int matrix_rows, int activation_bits=16) -> Tensor",
        decode_layers);
}
