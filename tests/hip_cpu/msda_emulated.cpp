// Runs the CUDA kernels of csrc/cuda/ms_deform_attn_kernels.cuh on the CPU under HIP-CPU, launched like
// csrc/cuda/ms_deform_attn_cuda.cu launches them (num_blocks(d) blocks of kBlock threads, the same dispatch on the
// value and geometry dtypes). Built and driven by tests/test_ms_deform_attn_emulated.py:
//
//   msda_emulated DIR [forward|backward]      (both when omitted)
//
// DIR/meta holds "VALUE_DTYPE GEOMETRY_DTYPE N S H D R Q L P" (dtypes f64 f32 f16 bf16); DIR/<name>.bin the
// contiguous inputs (value, z, ss, lsi, loc, attn, grad_out, grad_zs). Writes out.bin and zs.bin (value dtype),
// grad_value.bin, grad_z.bin, grad_loc.bin and grad_attn.bin (the kernels' accumulation buffers: float32 for
// half values, as in the host code before its final cast).
#include "cuda_on_hip_cpu.h"  // first: the CUDA names the kernels use

#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/ms_deform_attn_kernels.cuh"

namespace {

using peft_d2::msda_cuda::Dims;

std::string dir;

template <typename T>
std::vector<T> load(const std::string& name, int64_t numel) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + name + ".bin");
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.size() != static_cast<size_t>(numel) * sizeof(T)) {
    throw std::runtime_error(name + ".bin: " + std::to_string(bytes.size()) + " bytes, expected " +
                             std::to_string(numel * sizeof(T)));
  }
  std::vector<T> v(numel);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

template <typename T>
void save(const std::string& name, const std::vector<T>& v) {
  std::ofstream(dir + "/" + name + ".bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
}

void check(hipError_t e, const char* what) {
  if (e != hipSuccess) throw std::runtime_error(std::string(what) + ": " + hipGetErrorString(e));
}

template <typename scalar_t, typename geom_t>
bool run(const Dims& d, bool forward, bool backward) {
  using namespace peft_d2::msda_cuda;
  using A = at::opmath_type<scalar_t>;
  const int64_t NQH = d.N * d.Q * d.H, LP = d.L * d.P;
  const auto value = load<scalar_t>("value", d.N * d.S * d.H * d.D), z = load<scalar_t>("z", d.N * d.S * d.R);
  const auto ss = load<int64_t>("ss", 2 * d.L), lsi = load<int64_t>("lsi", d.L);
  const auto loc = load<geom_t>("loc", NQH * LP * 2), attn = load<geom_t>("attn", NQH * LP);
  const scalar_t* zp = d.R ? z.data() : nullptr;  // as the host code: no z pointer without LoRA channels
  if (forward) {
    std::vector<scalar_t> out(NQH * d.D), zs(NQH * d.R);
    hipLaunchKernelGGL((forward_kernel<scalar_t, geom_t>), dim3(num_blocks(d)), dim3(kBlock), 0, nullptr, d,
                       value.data(), zp, ss.data(), lsi.data(), loc.data(), attn.data(), out.data(),
                       d.R ? zs.data() : nullptr);
    check(hipGetLastError(), "forward launch");
    check(hipDeviceSynchronize(), "forward");
    save("out", out);
    save("zs", zs);
  }
  if (backward) {
    const auto grad_out = load<scalar_t>("grad_out", NQH * d.D), grad_zs = load<scalar_t>("grad_zs", NQH * d.R);
    std::vector<A> grad_value(value.size()), grad_z(z.size()), grad_loc(loc.size()), grad_attn(attn.size());
    hipLaunchKernelGGL((backward_kernel<scalar_t, geom_t>), dim3(num_blocks(d)), dim3(kBlock), 0, nullptr, d,
                       grad_out.data(), d.R ? grad_zs.data() : nullptr, value.data(), zp, ss.data(), lsi.data(),
                       loc.data(), attn.data(), grad_value.data(), d.R ? grad_z.data() : nullptr, grad_loc.data(),
                       grad_attn.data());
    check(hipGetLastError(), "backward launch");
    check(hipDeviceSynchronize(), "backward");
    save("grad_value", grad_value);
    save("grad_z", grad_z);
    save("grad_loc", grad_loc);
    save("grad_attn", grad_attn);
  }
  return true;
}

// The host code's dispatch: the geometry in the value dtype, or in float32 under half values. The test's broken
// builds keep float64 alone (MSDA_EMULATED_F64_ONLY): it catches them, and halves their build time.
bool dispatch(const std::string& vt, const std::string& gt, const Dims& d, bool forward, bool backward) {
  const auto is = [&](const char* v, const char* g) { return vt == v && gt == g; };
  if (is("f64", "f64")) return run<double, double>(d, forward, backward);
#ifndef MSDA_EMULATED_F64_ONLY
  if (is("f32", "f32")) return run<float, float>(d, forward, backward);
  if (is("f16", "f16")) return run<c10::Half, c10::Half>(d, forward, backward);
  if (is("f16", "f32")) return run<c10::Half, float>(d, forward, backward);
  if (is("bf16", "bf16")) return run<c10::BFloat16, c10::BFloat16>(d, forward, backward);
  if (is("bf16", "f32")) return run<c10::BFloat16, float>(d, forward, backward);
#endif
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " DIR [forward|backward]\n";
    return 2;
  }
  dir = argv[1];
  const std::string what = argc == 3 ? argv[2] : "both";
  const bool forward = what != "backward", backward = what != "forward";
  std::ifstream meta(dir + "/meta");
  std::string vt, gt;
  Dims d{};
  if (!(meta >> vt >> gt >> d.N >> d.S >> d.H >> d.D >> d.R >> d.Q >> d.L >> d.P)) {
    std::cerr << "cannot parse " << dir << "/meta\n";
    return 2;
  }
  try {
    if (!dispatch(vt, gt, d, forward, backward)) {
      std::cerr << "unsupported dtypes " << vt << " " << gt << "\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "msda_emulated: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
