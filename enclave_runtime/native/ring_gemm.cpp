// The recombination step of the mask pool's int8 corrections (enclave_runtime/ring_gemm.py).
//
// Why: the pool computes W·[r_1 … r_B] mod 2**32 as one int8 GEMM of the pads' four bytes
// (stacked as rows) times the weights' digits (stacked as output columns); the GEMM writes each
// digit product as float32. Folding the 4·D products back into one int32 per output takes
// eight or more passes of torch ops over the products (about half the GEMM's time at
// Llama-2-7B's shapes, several times it where the output is wide and the fan-in small); this
// reads each product once.
//
// Guarantee: recombine(products, shifts, corr, out, col0), with rows = out.size(0),
// cols = corr.size(0) and digits = products.size(1) / cols, sets for m < rows, n < cols
// out[m, col0 + n] = (corr[n] + sum_{i<4, j<digits, shifts[i*digits+j] < 32}
//                     products[i*rows + m, j*cols + n] * 2**shifts[i*digits+j]) mod 2**32,
// with every product an integer float32 of magnitude at most 2**24 (what the GEMM's exactness
// bound gives; a product outside it, or a non-integer one, raises). All arithmetic is unsigned
// 32-bit, which wraps by definition. Raises on any shape, dtype or layout it was not built for.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

// acc[n] += int(row[n]) * 2**shift (mod 2**32) for n < cols; true if some row[n] is not an
// integer of magnitude at most 2**24. Written without branches so that the compiler vectorises
// it; a value out of range is zeroed by its bits before the conversion (which would be
// undefined for it), and flagged. A shift, not a product by 2**shift: baseline x86-64 (SSE2)
// has no 32-bit vector multiply. Compiled twice, for AVX2 and for the baseline, the loader
// picking the one the CPU runs (GCC's target_clones): the same source, so the same bits.
__attribute__((target_clones("avx2", "default")))
bool fold(const float* __restrict row, uint32_t* __restrict acc, int64_t cols, uint32_t shift) {
  uint32_t bad = 0;
  for (int64_t n = 0; n < cols; ++n) {
    const float v = row[n];
    const uint32_t in_range = (v >= -16777216.0f) & (v <= 16777216.0f);  // 0 for NaN
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits &= 0u - in_range;
    float kept;
    std::memcpy(&kept, &bits, sizeof kept);
    const int32_t q = static_cast<int32_t>(kept);
    bad |= (in_range ^ 1u) | static_cast<uint32_t>(static_cast<float>(q) != v);
    acc[n] += static_cast<uint32_t>(q) << shift;
  }
  return bad != 0;
}

void recombine(const at::Tensor& products, const std::vector<int64_t>& shifts,
               const at::Tensor& corr, at::Tensor& out, int64_t col0) {
  TORCH_CHECK(products.scalar_type() == at::kFloat && products.is_cpu() &&
                  products.is_contiguous() && products.dim() == 2,
              "recombine: products must be a contiguous 2-d float32 CPU tensor");
  TORCH_CHECK(corr.scalar_type() == at::kLong && corr.is_cpu() && corr.is_contiguous() &&
                  corr.dim() == 1,
              "recombine: corr must be a contiguous int64 CPU vector");
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_cpu() && out.is_contiguous() &&
                  out.dim() == 2,
              "recombine: out must be a contiguous 2-d int32 CPU tensor");
  const int64_t rows = out.size(0), cols = corr.size(0), width = out.size(1);
  TORCH_CHECK(cols > 0 && products.size(1) % cols == 0, "recombine: products are ",
              products.sizes(), " for ", cols, " columns");
  const int64_t digits = products.size(1) / cols;
  TORCH_CHECK(products.size(0) == 4 * rows, "recombine: products are ", products.sizes(),
              ", not ", 4 * rows, " rows");
  // col0 <= width - cols, not col0 + cols <= width: the sum of a huge col0 could wrap
  TORCH_CHECK(col0 >= 0 && cols <= width && col0 <= width - cols, "recombine: columns ", col0,
              "+", cols, " outside ", width);
  TORCH_CHECK(static_cast<int64_t>(shifts.size()) == 4 * digits, "recombine: ",
              shifts.size(), " shifts for ", 4 * digits, " products");
  for (int64_t s : shifts) TORCH_CHECK(s >= 0, "recombine: negative shift");
  const float* p = products.data_ptr<float>();
  const int64_t* c = corr.data_ptr<int64_t>();
  int32_t* o = out.data_ptr<int32_t>();
  const int64_t stride = digits * cols;
  std::vector<std::pair<int64_t, uint32_t>> terms;  // (offset of the product block, shift)
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t j = 0; j < digits; ++j) {
      const int64_t s = shifts[i * digits + j];
      if (s < 32) terms.emplace_back(i * rows * stride + j * cols, static_cast<uint32_t>(s));
    }
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> acc(cols);
    bool local_bad = false;
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t n = 0; n < cols; ++n) acc[n] = static_cast<uint32_t>(c[n]);
      for (const auto& [offset, shift] : terms)
        local_bad |= fold(p + offset + m * stride, acc.data(), cols, shift);
      int32_t* dst = o + m * width + col0;
      for (int64_t n = 0; n < cols; ++n) dst[n] = static_cast<int32_t>(acc[n]);
    }
    if (local_bad) bad.store(true);
  });
  TORCH_CHECK(!bad.load(), "recombine: a digit product is not an integer within 2**24");
}

// planes[i * rows + m, k] = byte i (least significant first) of pads[m, k], its top bit
// flipped (the signed digit b - 128), for m < rows = pads.size(0), k < fan_in = planes.size(1):
// the GEMM's four stacked row blocks, in one pass (a permute and copy of the bytes took a
// tenth of a prefill's fill). pads: int32 rows, the last dimension contiguous (a row may be
// wider than fan_in: its carried exponent column is left out).
__attribute__((target_clones("avx2", "default")))
void split_row(const uint32_t* __restrict row, int8_t* __restrict b0, int8_t* __restrict b1,
               int8_t* __restrict b2, int8_t* __restrict b3, int64_t fan_in) {
  for (int64_t k = 0; k < fan_in; ++k) {
    const uint32_t v = row[k] ^ 0x80808080u;
    b0[k] = static_cast<int8_t>(static_cast<uint8_t>(v));
    b1[k] = static_cast<int8_t>(static_cast<uint8_t>(v >> 8));
    b2[k] = static_cast<int8_t>(static_cast<uint8_t>(v >> 16));
    b3[k] = static_cast<int8_t>(static_cast<uint8_t>(v >> 24));
  }
}

void byte_planes(const at::Tensor& pads, at::Tensor& planes) {
  TORCH_CHECK(pads.scalar_type() == at::kInt && pads.is_cpu() && pads.dim() == 2 &&
                  pads.stride(1) == 1,
              "byte_planes: pads must be 2-d int32 CPU rows, the last dimension contiguous");
  TORCH_CHECK(planes.scalar_type() == at::kChar && planes.is_cpu() && planes.is_contiguous() &&
                  planes.dim() == 2,
              "byte_planes: planes must be a contiguous 2-d int8 CPU tensor");
  const int64_t rows = pads.size(0), fan_in = planes.size(1);
  TORCH_CHECK(planes.size(0) == 4 * rows && fan_in <= pads.size(1), "byte_planes: planes are ",
              planes.sizes(), " for pads ", pads.sizes());
  const uint32_t* u = reinterpret_cast<const uint32_t*>(pads.data_ptr<int32_t>());
  int8_t* o = planes.data_ptr<int8_t>();
  const int64_t stride = pads.stride(0), plane = rows * fan_in;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* dst = o + m * fan_in;
      split_row(u + m * stride, dst, dst + plane, dst + 2 * plane, dst + 3 * plane, fan_in);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recombine", &recombine, "fold int8 digit products into out[:, col0:] mod 2**32");
  m.def("byte_planes", &byte_planes, "the pads' four signed byte planes, stacked as rows");
}
