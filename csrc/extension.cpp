// The extension module lor2c_ops._C. lor2c_ops/ops/*.py wraps its private kernel ops in the
// public custom ops, with fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

namespace lor2c {
PyMethodDef* fast_entry_methods();  // csrc/fast_entry.cpp: _lor2c, _dcft, _fast_allow, _fast_reset
}

extern "C" {
// Importing lor2c_ops._C loads this library, which runs the registrations below. The module's
// functions are the public ops' fast entries on CPU tensors (csrc/fast_entry.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          lor2c::fast_entry_methods()};
  return PyModule_Create(&module_def);
}
}

// The namespace of the private kernel ops; each op declares its schemas once, in csrc/<op>.cpp,
// and registers its kernels per device in csrc/cpu/<op>.cpp and csrc/cuda/<op>_binding.cpp.
TORCH_LIBRARY(lor2c_ops_ext, m) {}
