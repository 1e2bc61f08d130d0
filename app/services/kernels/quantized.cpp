// Chipi's CPU kernels for quantized linear layers (AVX2), registered as torch.ops.chipi.*.
//
// Weights are stored in blocks of 32 along the input dimension, as llama.cpp's Q4_1 and Q8_0 do:
// - q4: 16 bytes per block, byte j holding the block's weight j in its low nibble and weight j + 16 in its high
//   one, and a float16 scale and min per block: weight = scale * q + min, q in 0..15;
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

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

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
// the weight scale and each row's activation scale; for q4, the min times the block's float sum of x to mins.
template <bool kQ4, int R>
__attribute__((always_inline)) inline void add_block(const Rounded& rows, int64_t K, int64_t blocks,
                                                     const uint8_t* block, const uint16_t* block_scales, int64_t b,
                                                     __m256 (&acc)[R], float (&mins)[R]) {
  __m256i first, second;
  unpack_block<kQ4>(block, first, second);
  const float weight_scale = half_to_float(block_scales[0]);
  if constexpr (kQ4) {
    const float min = half_to_float(block_scales[1]);
    for (int r = 0; r < R; ++r) mins[r] += min * rows.block_sums[r * blocks + b];
  }
  for (int r = 0; r < R; ++r) {
    const int16_t* xb = rows.x16 + r * K + b * kBlock;
    const __m256i products = _mm256_add_epi32(
        _mm256_madd_epi16(first, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
        _mm256_madd_epi16(second, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
    const __m256 scale = _mm256_set1_ps(weight_scale * rows.x_scales[r * blocks + b]);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc[r]);
  }
}

// out[r, n] for the R rows starting at `rows` (row stride K) and the output columns [n_begin, n_end). Even and odd
// blocks add into separate accumulators, so that consecutive multiply-adds do not wait for each other.
template <bool kQ4, int R>
void dot_rows(Rounded rows, int64_t K, const uint8_t* weights, const uint16_t* scales, float* out, int64_t N,
              int64_t n_begin, int64_t n_end) {
  constexpr int64_t kScales = kQ4 ? 2 : 1;
  const int64_t blocks = K / kBlock;
  const int64_t block_bytes = kQ4 ? kBlock / 2 : kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = weights + n * blocks * block_bytes;
    const uint16_t* row_scales = scales + n * blocks * kScales;
    __m256 even[R], odd[R];
    float even_mins[R] = {}, odd_mins[R] = {};
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      add_block<kQ4, R>(rows, K, blocks, row + b * block_bytes, row_scales + b * kScales, b, even, even_mins);
      add_block<kQ4, R>(rows, K, blocks, row + (b + 1) * block_bytes, row_scales + (b + 1) * kScales, b + 1, odd,
                        odd_mins);
    }
    if (b < blocks)
      add_block<kQ4, R>(rows, K, blocks, row + b * block_bytes, row_scales + b * kScales, b, even, even_mins);
    for (int r = 0; r < R; ++r)
      out[r * N + n] = horizontal_sum(_mm256_add_ps(even[r], odd[r])) + even_mins[r] + odd_mins[r];
  }
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Rounds one block of 32 activations to 16-bit integers with a scale of its own (its largest magnitude maps to
// 32767), and sums the block in float.
inline void round_block(const float* x, int16_t* x16, float& scale, float& sum) {
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 largest = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  scale = horizontal_max(largest) / 32767.0f;
  const __m256 inverse = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
  for (int i = 0; i < 2; ++i) {
    // packs interleaves the 128-bit lanes of its two inputs; the permute puts the 16 values back in order
    const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inverse)),
                                              _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inverse)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + 16 * i), _mm256_permute4x64_epi64(packed, 0xD8));
  }
}

template <bool kQ4>
at::Tensor quantized_linear(const at::Tensor& input, const at::Tensor& weights, const at::Tensor& scales) {
  const int64_t K = input.size(-1);
  const int64_t N = scales.size(0);
  TORCH_CHECK(input.scalar_type() == at::kFloat, "chipi quantized_linear: float32 input expected");
  TORCH_CHECK(K % kBlock == 0 && scales.size(1) * kBlock == K, "chipi quantized_linear: shapes do not match");
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous() &&
                  weights.numel() == N * (kQ4 ? K / 2 : K),
              "chipi quantized_linear: contiguous uint8 weights of the scales' shape expected");
  auto x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const int64_t blocks = K / kBlock;
  const float* xp = x.data_ptr<float>();
  std::vector<int16_t> x16(M * K);
  std::vector<float> x_scales(M * blocks), block_sums(M * blocks);
  for (int64_t i = 0; i < M * blocks; ++i) round_block(xp + i * kBlock, x16.data() + i * kBlock, x_scales[i], block_sums[i]);
  auto out = at::empty({M, N}, x.options());
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "chipi: float16 scales expected");
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += 4) {  // up to 4 rows share each unpacked block
      const Rounded rows{x16.data() + m * K, x_scales.data() + m * blocks, block_sums.data() + m * blocks};
      float* om = op + m * N;
      switch (std::min<int64_t>(4, M - m)) {
        case 4: dot_rows<kQ4, 4>(rows, K, wp, sp, om, N, begin, end); break;
        case 3: dot_rows<kQ4, 3>(rows, K, wp, sp, om, N, begin, end); break;
        case 2: dot_rows<kQ4, 2>(rows, K, wp, sp, om, N, begin, end); break;
        default: dot_rows<kQ4, 1>(rows, K, wp, sp, om, N, begin, end);
      }
    }
  });
  auto shape = input.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// The float32 weights the blocks stand for, [N, K] (for products of many rows, which run faster as a matrix
// product on float32 weights than block by block).
template <bool kQ4>
at::Tensor dequantize(const at::Tensor& weights, const at::Tensor& scales) {
  const int64_t N = scales.size(0);
  const int64_t blocks = scales.size(1);
  const int64_t block_bytes = kQ4 ? kBlock / 2 : kBlock;
  auto out = at::empty({N, blocks * kBlock}, scales.options().dtype(at::kFloat));
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      __m256i halves[2];
      unpack_block<kQ4>(wp + i * block_bytes, halves[0], halves[1]);
      const __m256 scale = _mm256_set1_ps(half_to_float(sp[kQ4 ? 2 * i : i]));
      const __m256 min = _mm256_set1_ps(kQ4 ? half_to_float(sp[2 * i + 1]) : 0.0f);
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 2; ++j) {
          const __m128i eight = j ? _mm256_extracti128_si256(halves[h], 1) : _mm256_castsi256_si128(halves[h]);
          const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
          _mm256_storeu_ps(op + i * kBlock + 16 * h + 8 * j, _mm256_fmadd_ps(q, scale, min));
        }
    }
  });
  return out;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  return quantized_linear<true>(x, w, s);
}
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  return quantized_linear<false>(x, w, s);
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
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < D; ++i) {
        const float gate = xp[r * 2 * D + i];
        op[r * D + i] = gate / (1.0f + std::exp(-gate)) * xp[r * 2 * D + D + i];
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(chipi, m) {
  m.def("q4_linear(Tensor x, Tensor weights, Tensor scales) -> Tensor", q4_linear);
  m.def("q8_linear(Tensor x, Tensor weights, Tensor scales) -> Tensor", q8_linear);
  m.def("q4_dequantize(Tensor weights, Tensor scales) -> Tensor", q4_dequantize);
  m.def("q8_dequantize(Tensor weights, Tensor scales) -> Tensor", q8_dequantize);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("silu_mul(Tensor x) -> Tensor", silu_mul);
  m.def("add_rms_norm(Tensor(a!) hidden, Tensor delta, Tensor weight, float eps) -> Tensor", add_rms_norm);
}
