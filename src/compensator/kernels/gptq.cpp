// GPTQ's column recursion inside one block of columns, for a run of columns whose groups are
// already fitted: each column is rounded onto its group's grid, and its error, divided by the
// inverse Hessian factor's diagonal, is pushed onto the block's later columns of the same row.
// Rows never mix in GPTQ, so chunks of rows run the whole run of columns alone (chunks are
// split across threads), in the same float32 operations as compensator/rounders/gptq.py's Python
// loop: codes clamp(round(w / s) + z) (or clamp(round(w / s + z)) for float zero points),
// value (c - z) s, error (w - value) / U[i, i], update w[j] -= error U[i, j]. Built without
// floating-point contraction, so no step is fused into an FMA the Python path does not use.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// Rows are taken R at a time into a column-major tile, so that every step of a column is
// one vector operation across R rows: the rows' dependency chains (round, error, update)
// overlap instead of running one after the other, and the update sweeps contiguous memory.
constexpr int64_t R = 32;

void gptq_columns(torch::Tensor w1, torch::Tensor err1, torch::Tensor codes, torch::Tensor u1,
                  torch::Tensor scale, torch::Tensor zero, torch::Tensor group_of, int64_t i1,
                  int64_t a, int64_t b, double maxq, bool float_zero) {
  for (const auto& t : {w1, err1, codes, u1, scale, zero})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.dim() == 2,
                "gptq_columns: float32 contiguous matrices");
  TORCH_CHECK(group_of.dtype() == torch::kInt64 && group_of.is_contiguous(), "group_of: int64");
  const int64_t rows = w1.size(0), bw = w1.size(1), cols = codes.size(1), ng = scale.size(1);
  TORCH_CHECK(u1.size(0) == bw && u1.size(1) == bw && err1.size(1) == bw, "block shapes");
  TORCH_CHECK(0 <= a && a <= b && b <= bw && i1 + bw <= cols, "column range");
  if (a == b) return;
  float* wp = w1.data_ptr<float>();
  float* ep = err1.data_ptr<float>();
  float* cp = codes.data_ptr<float>();
  const float* up = u1.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const int64_t* gp = group_of.data_ptr<int64_t>();
  const float top = static_cast<float>(maxq);
  const int64_t chunks = (rows + R - 1) / R;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> tile(bw * R);  // tile[j * R + r]: column j of row r0 + r
    float s[R] = {}, z[R] = {}, e[R] = {};  // lanes past the last row stay 0
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t r0 = chunk * R, n = std::min(R, rows - r0);
      float* t = tile.data();
      // Columns before a are final for this call; only a .. bw - 1 are read or changed.
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = a; j < bw; ++j) t[j * R + r] = wp[(r0 + r) * bw + j];
      for (int64_t i = a; i < b; ++i) {
        const int64_t g = gp[i1 + i];
        const float d = up[i * bw + i];
        float* col = t + i * R;
        for (int64_t r = 0; r < n; ++r) {
          s[r] = sp[(r0 + r) * ng + g];
          z[r] = zp[(r0 + r) * ng + g];
        }
        for (int64_t r = 0; r < n; ++r) {
          float c = float_zero ? std::nearbyint(col[r] / s[r] + z[r])
                               : std::nearbyint(col[r] / s[r]) + z[r];
          c = std::min(std::max(c, 0.0f), top);
          cp[(r0 + r) * cols + i1 + i] = c;
          const float deq = (c - z[r]) * s[r];
          e[r] = (col[r] - deq) / d;
          ep[(r0 + r) * bw + i] = e[r];
        }
        const float* u = up + i * bw;
        for (int64_t j = i + 1; j < bw; ++j) {
          const float uj = u[j];
          float* tj = t + j * R;
          for (int64_t r = 0; r < R; ++r) tj[r] = tj[r] - e[r] * uj;
        }
      }
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = a; j < bw; ++j) wp[(r0 + r) * bw + j] = t[j * R + r];
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_columns", &gptq_columns, "GPTQ's column recursion over a run of fitted columns");
}
