// The extension module lor2c_ops._C: the private kernel ops' schemas, defined once here.
// Each backend file registers its implementation (csrc/cpu/*.cpp for CPU, csrc/cuda/* for CUDA);
// lor2c_ops/ops/*.py wraps them in the public custom ops with fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing lor2c_ops._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lor2c_ops_ext, m) {
  // x (n, d_in), layer_out (n, d_out): rows of any stride, unit column stride.
  // A (r, d_in), B (d_out, r); seed int64[2] = (seed, offset) on x's device.
  // Returns out = layer_out + scale * dropout(x) @ A.T @ B.T and t = dropout(x) @ A.T (fp32).
  m.def("lor2c_fwd(Tensor x, Tensor layer_out, Tensor A, Tensor B, float scale, float p, "
        "Tensor seed) -> (Tensor, Tensor)");
  // Returns (dx, dA, dB); an output not asked for is an empty tensor.
  m.def("lor2c_bwd(Tensor grad, Tensor x, Tensor t, Tensor A, Tensor B, float scale, float p, "
        "Tensor seed, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)");
}
