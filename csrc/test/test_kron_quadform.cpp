// C++ test of the registered op through the dispatcher, against a dense float64 computation.
// Run by ctest (see CMakeLists.txt); exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

at::Tensor kron_quadform(const at::Tensor& phi, const at::Tensor& C) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bayesvlm_ext::kron_quadform", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(phi, C);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t n : {0, 1, 7, 300, 2100}) {  // 2100 spans several CPU chunks
    for (int64_t p : {1, 5, 64, 129}) {
      const at::Tensor phi = at::randn({n, p}, at::kDouble);
      const at::Tensor g = at::randn({p, p}, at::kDouble);
      const at::Tensor C = at::mm(g, g.t());
      const at::Tensor expected = (at::mm(phi, C) * phi).sum(1);
      const at::Tensor got = kron_quadform(phi, C);
      const std::string shape = "n=" + std::to_string(n) + " p=" + std::to_string(p);
      expect(got.sizes() == expected.sizes() && got.scalar_type() == at::kDouble, "float64 shape " + shape);
      expect(n == 0 || at::allclose(got, expected, 1e-12, 1e-12), "float64 values " + shape);
      // float32 input accumulates in float32 and returns float32; strided input is read in place.
      const at::Tensor phi_t = phi.to(at::kFloat).t().contiguous().t();
      const at::Tensor got32 = kron_quadform(phi_t, C.to(at::kFloat));
      expect(got32.scalar_type() == at::kFloat, "float32 dtype " + shape);
      expect(n == 0 || at::allclose(got32.to(at::kDouble), expected, 1e-4, 1e-4), "float32 values " + shape);
    }
  }
  bool threw = false;
  try {
    kron_quadform(at::randn({3, 4}), at::randn({5, 5}));
  } catch (const c10::ValueError&) {
    threw = true;
  }
  expect(threw, "mismatched C raises ValueError");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
