// y = x W^T for a 4-bit packed weight, never forming W: W[n, k] = s[n, g] c[n, k] - zs[n, g]
// with g = k / group, so row n of y is sum_g s[n,g] (c[n, g] . x[g]) - zs[n,g] sum(x[g]).
// Codes are our little-endian bit stream: int32 word j of a row holds codes 8j .. 8j+7, code
// 8j+i in bits 4i .. 4i+3. Rows are split across threads; each row's words are read once
// for all M inputs, so this is for small M (decode); larger M dequantizes and uses BLAS.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QGEMV_AVX2 1
#endif
#if defined(QGEMV_AVX2) && defined(__AVX512F__)
#define QGEMV_AVX512 1
#endif

#ifdef QGEMV_AVX2
static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}
#endif

torch::Tensor qgemv_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                         torch::Tensor zs, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: [M, K] float32");
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "qweight: int32");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && zs.dtype() == torch::kFloat32, "scale, zs: float32");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), W = qweight.size(1);
  TORCH_CHECK(K % 8 == 0 && W == K / 8 && group % 8 == 0, "K and the group size must be multiples of 8");
  const int64_t G = scale.size(1);
  auto y = torch::empty({M, N}, x.options());
  // Per input row and group: sum of x over the group (the zero point's share).
  auto xsum = torch::empty({M, G}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t k = g * group; k < std::min(K, (g + 1) * group); ++k) acc += xp[m * K + k];
      xs[m * G + g] = acc;
    }
  const int32_t* qp = qweight.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t wpg = group / 8;  // words per group
#ifdef QGEMV_AVX512
  // 16 codes a step: two adjacent words broadcast as one 64-bit pair, 32-bit lane 2i taking
  // nibble i of the first word (column 8w + i) and lane 2i + 1 nibble i of the second (column
  // 8w + 8 + i). x is laid out once in that order, pair by pair. Pairs must not straddle a
  // group: only for an even number of words per group (a ragged last group's odd word is
  // done 8 wide).
  const bool pairs = wpg % 2 == 0;
  auto xpair = torch::empty({pairs ? M : 0, K}, x.options());
  float* xq = xpair.data_ptr<float>();
  if (pairs)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p + 16 <= K; p += 16)
        for (int i = 0; i < 8; ++i) {
          xq[m * K + p + 2 * i] = xp[m * K + p + i];
          xq[m * K + p + 2 * i + 1] = xp[m * K + p + 8 + i];
        }
#endif
  // Threads only for layers of about a million weights or more per input row: below that,
  // waking a second thread at every call costs more than it saves (SmolLM2 at 2 threads
  // decoded slower than at 1).
  const int64_t grain = std::max<int64_t>(16, ((int64_t(1) << 20) / std::max<int64_t>(K * M, 1) + 15) / 16 * 16);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * K;
      const float* xsr = xs + m * G;
      int64_t n = n0;
#ifdef QGEMV_AVX2
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      const __m256i mask = _mm256_set1_epi32(0xF);
#ifdef QGEMV_AVX512
      const __m512i shifts2 =
          _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
      const __m512 codes =
          _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const float* xqr = pairs ? xq + m * K : nullptr;
      for (; pairs && n + 4 <= n1; n += 4) {
        const int32_t* rows[4] = {qp + n * W, qp + (n + 1) * W, qp + (n + 2) * W, qp + (n + 3) * W};
        float out[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t g = 0; g < G; ++g) {
          const int64_t w0 = g * wpg, w1 = std::min(W, (g + 1) * wpg);
          __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
          int64_t w = w0;
          for (; w + 2 <= w1; w += 2) {
            const __m512 xv = _mm512_loadu_ps(xqr + 8 * w);
            for (int r = 0; r < 4; ++r) {
              int64_t pair;
              std::memcpy(&pair, rows[r] + w, sizeof(pair));
              // a permute reads only an index's low 4 bits: code -> float without a mask
              // or a conversion, on another port than the shift and the FMA
              const __m512 c = _mm512_permutexvar_ps(
                  _mm512_srlv_epi32(_mm512_set1_epi64(pair), shifts2), codes);
              a[r] = _mm512_fmadd_ps(c, xv, a[r]);
            }
          }
          float tail[4] = {0.f, 0.f, 0.f, 0.f};
          if (w < w1) {  // the odd last word of a ragged last group
            const __m256 xv = _mm256_loadu_ps(xr + 8 * w);
            for (int r = 0; r < 4; ++r)
              tail[r] = hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(
                  _mm256_srlv_epi32(_mm256_set1_epi32(rows[r][w]), shifts), mask)), xv));
          }
          for (int r = 0; r < 4; ++r)
            out[r] += sp[(n + r) * G + g] * (_mm512_reduce_add_ps(a[r]) + tail[r]) -
                      zp[(n + r) * G + g] * xsr[g];
        }
        for (int r = 0; r < 4; ++r) yp[m * N + n + r] = out[r];
      }
#endif
      // Four rows at a time: four independent FMA chains, and each x load serves all four.
      for (; n + 4 <= n1; n += 4) {
        const int32_t* r0 = qp + n * W;
        const int32_t* r1 = r0 + W;
        const int32_t* r2 = r1 + W;
        const int32_t* r3 = r2 + W;
        float out[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t g = 0; g < G; ++g) {
          const int64_t w0 = g * wpg, w1 = std::min(W, (g + 1) * wpg);
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t w = w0; w < w1; ++w) {
            const __m256 xv = _mm256_loadu_ps(xr + 8 * w);
#define QGEMV_STEP(acc, r) \
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256( \
      _mm256_srlv_epi32(_mm256_set1_epi32(r[w]), shifts), mask)), xv, acc)
            QGEMV_STEP(a0, r0);
            QGEMV_STEP(a1, r1);
            QGEMV_STEP(a2, r2);
            QGEMV_STEP(a3, r3);
#undef QGEMV_STEP
          }
          const __m256 accs[4] = {a0, a1, a2, a3};
          for (int r = 0; r < 4; ++r)
            out[r] += sp[(n + r) * G + g] * hsum(accs[r]) - zp[(n + r) * G + g] * xsr[g];
        }
        for (int r = 0; r < 4; ++r) yp[m * N + n + r] = out[r];
      }
#endif
      for (; n < n1; ++n) {
        const int32_t* row = qp + n * W;
        float out = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t w0 = g * wpg, w1 = std::min(W, (g + 1) * wpg);
          float dot = 0.f;
          for (int64_t w = w0; w < w1; ++w) {
            for (int i = 0; i < 8; ++i)
              dot += float((uint32_t(row[w]) >> (4 * i)) & 0xF) * xr[8 * w + i];
          }
          out += sp[n * G + g] * dot - zp[n * G + g] * xsr[g];
        }
        yp[m * N + n] = out;
      }
    }
  });
  return y;
}

// The dense weight [N, K] = s c - zs from the same packed layout (for many-token inputs,
// which are matrix products better left to BLAS).
torch::Tensor dequant_int4(torch::Tensor qweight, torch::Tensor scale, torch::Tensor zs,
                           int64_t group, int64_t K) {
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "qweight: int32");
  const int64_t N = qweight.size(0), W = qweight.size(1), G = scale.size(1);
  TORCH_CHECK(K % 8 == 0 && W == K / 8 && group % 8 == 0, "K and the group size must be multiples of 8");
  auto out = torch::empty({N, K}, scale.options());
  const int32_t* qp = qweight.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t wpg = group / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#ifdef QGEMV_AVX2
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0xF);
#endif
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t g = w / wpg;
        const float s = sp[n * G + g], z = zp[n * G + g];
#ifdef QGEMV_AVX2
        __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(qp[n * W + w]), shifts), mask));
        _mm256_storeu_ps(op + n * K + 8 * w,
                         _mm256_fmsub_ps(c, _mm256_set1_ps(s), _mm256_set1_ps(z)));
#else
        for (int i = 0; i < 8; ++i)
          op[n * K + 8 * w + i] = float((uint32_t(qp[n * W + w]) >> (4 * i)) & 0xF) * s - z;
#endif
      }
    }
  });
  return out;
}

bool has_avx512() {
#ifdef QGEMV_AVX512
  return true;
#else
  return false;
#endif
}

bool has_avx2() {
#ifdef QGEMV_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv_int4", &qgemv_int4, "4-bit packed GEMV (y = x W^T), W never formed");
  m.def("dequant_int4", &dequant_int4, "the dense weight of a 4-bit packed layer");
  m.def("has_avx2", &has_avx2, "whether the AVX2/FMA path was compiled");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 GEMV path was compiled");
}
