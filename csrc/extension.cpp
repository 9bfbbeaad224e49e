// The extension module lor2c_ops._C. lor2c_ops/ops/*.py wraps its private kernel ops in the
// public custom ops, with fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing lor2c_ops._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The namespace of the private kernel ops; each op declares its schemas once, in csrc/<op>.cpp,
// and registers its kernels per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
TORCH_LIBRARY(lor2c_ops_ext, m) {}
