// GPTQ's column recursion inside one block of columns, for a run of columns whose groups are
// already fitted: each column is rounded onto its group's grid, and its error, divided by the
// inverse Hessian factor's diagonal, is pushed onto the block's later columns of the same row.
// Rows never mix in GPTQ, so each row runs the whole run of columns alone (rows are split
// across threads), in the same float32 operations as compensator/rounders/gptq.py's Python
// loop: codes clamp(round(w / s) + z) (or clamp(round(w / s + z)) for float zero points),
// value (c - z) s, error (w - value) / U[i, i], update w[j] -= error U[i, j]. Built without
// floating-point contraction, so no step is fused into an FMA the Python path does not use.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

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
  float* wp = w1.data_ptr<float>();
  float* ep = err1.data_ptr<float>();
  float* cp = codes.data_ptr<float>();
  const float* up = u1.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const int64_t* gp = group_of.data_ptr<int64_t>();
  const float top = static_cast<float>(maxq);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* w = wp + r * bw;
      for (int64_t i = a; i < b; ++i) {
        const int64_t g = gp[i1 + i];
        const float s = sp[r * ng + g], z = zp[r * ng + g], col = w[i];
        float c = float_zero ? std::nearbyint(col / s + z) : std::nearbyint(col / s) + z;
        c = std::min(std::max(c, 0.0f), top);
        cp[r * cols + i1 + i] = c;
        const float deq = (c - z) * s;
        const float e = (col - deq) / up[i * bw + i];
        ep[r * bw + i] = e;
        const float* u = up + i * bw;
        for (int64_t j = i + 1; j < bw; ++j) w[j] = w[j] - e * u[j];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_columns", &gptq_columns, "GPTQ's column recursion over a run of fitted columns");
}
