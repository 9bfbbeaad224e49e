// The fast entry of the public functions on CPU tensors: lor2c_ops._C._lor2c and _dcft.
//
// lor2c_residual and dcft_linear (lor2c_ops/ops/*.py) call these first, with their own
// arguments. Where every argument is of the common kind (plain tensors of one CPU device and a
// float dtype, shapes that fit, Python numbers, no generator, no autocast, no forward-mode AD or
// torch.func transform, a backend choice Python has already made and allowed, see allow()), the
// entry does what the Python function would (draws the seed, takes the rows, runs the op
// lor2c_ops_ext::lor2c or ::dcft through the dispatcher, so that its C++ autograd node is
// recorded) and returns the output. Anything else, it returns None and the Python function runs
// as before: its checks raise the errors that name the bad argument, before any kernel runs,
// and it handles every case the fast entry declines. So the entry only ever declines or
// computes exactly what the Python path computes; it never raises for bad input.
//
// Why: at tiny sizes the Python front (checks, backend choice, seed, torch.ops dispatch of the
// call) cost about as much host time as the kernels and the autograd node together.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace lor2c {
namespace {

enum Op { kLoR2C = 0, kMulti = 1, kDCFT = 2, kOps = 3 };
constexpr int kBackendArgs = 2;  // backend=None, backend="cpu"
constexpr int kDtypes = 3;       // float32, float16, bfloat16

// allowed[backend argument][activation dtype][op]: Python's backend choice for CPU tensors was
// "cpu" and the extension has the op's C++ autograd node (set by allow(), from
// lor2c_ops/ops/_common.py, the first time Python makes that choice).
bool allowed[kBackendArgs][kDtypes][kOps] = {};

// expression_rank[backend argument][activation dtype][op], set with `allowed`: calls without
// dropout, with the weights in the activations' dtype, at rank >= this, are declined, because
// Python may run them as the plain expression instead (lor2c_ops/backends.py cpu_loses_to_eager;
// the rank is its expression_min_rank, passed by ops/_common.py _allow_fast). 0: none.
int64_t expression_rank[kBackendArgs][kDtypes][kOps] = {};

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      return -1;
  }
}

// 0 for None, 1 for "cpu"; -1: another backend (the Python path decides).
int backend_code(PyObject* backend) {
  if (backend == Py_None) return 0;
  if (PyUnicode_Check(backend) && PyUnicode_CompareWithASCIIString(backend, "cpu") == 0) return 1;
  return -1;
}

// A Python float or int (not a bool), as a finite double.
std::optional<double> number(PyObject* o) {
  double v;
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return std::nullopt;
    }
  } else {
    return std::nullopt;
  }
  if (!std::isfinite(v)) return std::nullopt;
  return v;
}

// A plain tensor (torch.Tensor or nn.Parameter, no __torch_function__ of its own).
const at::Tensor* plain_tensor(PyObject* o) {
  return THPVariable_CheckExact(o) ? &THPVariable_Unpack(o) : nullptr;
}

bool has_forward_grad(const at::Tensor& t) {
  auto* meta =
      static_cast<torch::autograd::AutogradMeta*>(t.unsafeGetTensorImpl()->autograd_meta());
  return meta != nullptr && meta->fw_grad(/*level=*/0, t).defined();
}

// What the Python functions refuse or treat apart, and the entry leaves to them.
bool unusual_mode() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) ||
         at::autocast::is_autocast_enabled(at::kCPU);
}

// The dropout probability (0 unless training), or nullopt: not a Python number in [0, 1), or
// `training` not a bool.
std::optional<double> probability(PyObject* p_obj, PyObject* training) {
  if (training != Py_True && training != Py_False) return std::nullopt;
  const std::optional<double> p = number(p_obj);
  if (!p || *p < 0.0 || *p >= 1.0) return std::nullopt;
  return training == Py_True ? *p : 0.0;
}

// The seed of lor2c_ops/ops/_common.py seed_for: drawn from the default CPU generator as
// torch.randint(2**62, (2,), dtype=torch.int64) does, or one zero tensor without dropout.
at::Tensor seed_for(double p) {
  if (p > 0.0) return at::randint(int64_t{1} << 62, {2}, at::TensorOptions().dtype(at::kLong));
  static const at::Tensor* zero = new at::Tensor(at::zeros({2}, at::kLong));
  return *zero;
}

constexpr int64_t kRowLimit = int64_t{1} << 32;  // _common.ROW_LIMIT

// Calls with more elements than this release the GIL while they run (as torch's own ops do);
// smaller ones keep it, which costs less than releasing it.
constexpr int64_t kReleaseGilElements = int64_t{1} << 16;

template <typename F>
at::Tensor run(int64_t elements, F&& body) {
  if (elements < kReleaseGilElements) return body();
  pybind11::gil_scoped_release no_gil;
  return body();
}

// _C._lor2c(x, layer_out, A, B, scale, dropout_p, training, generator, backend, adapter_ids)
PyObject* lor2c_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) Py_RETURN_NONE;
  const at::Tensor* xp = plain_tensor(args[0]);
  const at::Tensor* lp = plain_tensor(args[1]);
  const at::Tensor* ap = plain_tensor(args[2]);
  const at::Tensor* bp = plain_tensor(args[3]);
  if (!xp || !lp || !ap || !bp || args[7] != Py_None) Py_RETURN_NONE;
  const int backend = backend_code(args[8]);
  const bool banked = args[9] != Py_None;
  const at::Tensor* idp = banked ? plain_tensor(args[9]) : nullptr;
  if (backend < 0 || (banked && !idp)) Py_RETURN_NONE;
  const std::optional<double> scale = number(args[4]);
  const std::optional<double> p = probability(args[5], args[6]);
  if (!scale || !p) Py_RETURN_NONE;
  const at::Tensor &x = *xp, &layer_out = *lp, &A = *ap, &B = *bp;
  const int64_t wd = banked ? 3 : 2;
  if (x.dim() < 1 || layer_out.dim() < 1 || A.dim() != wd || B.dim() != wd) Py_RETURN_NONE;
  const int dtype = dtype_code(x.scalar_type());
  const int op = banked ? kMulti : kLoR2C;
  if (dtype < 0 || !allowed[backend][dtype][op] || layer_out.scalar_type() != x.scalar_type() ||
      A.scalar_type() != B.scalar_type() ||
      (A.scalar_type() != x.scalar_type() && A.scalar_type() != at::kFloat))
    Py_RETURN_NONE;
  const at::Device device = x.device();
  if (!device.is_cpu() || layer_out.device() != device || A.device() != device ||
      B.device() != device)
    Py_RETURN_NONE;
  const int64_t d_in = A.size(-1), r = A.size(-2), d_out = B.size(-2);
  if (x.size(-1) != d_in || B.size(-1) != r || r < 1 || layer_out.size(-1) != d_out ||
      layer_out.sizes().slice(0, layer_out.dim() - 1) != x.sizes().slice(0, x.dim() - 1) ||
      (banked && A.size(0) != B.size(0)))
    Py_RETURN_NONE;
  const int64_t n = x.numel() / std::max<int64_t>(d_in, 1);
  if (n >= kRowLimit || unusual_mode()) Py_RETURN_NONE;
  const int64_t expression_from = expression_rank[backend][dtype][op];
  if (expression_from > 0 && *p == 0.0 && A.scalar_type() == x.scalar_type() &&
      r >= expression_from)
    Py_RETURN_NONE;  // Python's rule decides (see expression_rank)
  if (has_forward_grad(x) || has_forward_grad(layer_out) || has_forward_grad(A) ||
      has_forward_grad(B))
    Py_RETURN_NONE;
  std::optional<at::Tensor> ids;
  if (banked) {  // one id per row, values in [-1, G) (checked here: the Python path says which)
    const at::Tensor& given = *idp;
    const at::ScalarType it = given.scalar_type();
    if (given.device() != device ||
        !(it == at::kLong || it == at::kInt || it == at::kShort || it == at::kChar ||
          it == at::kByte) ||
        given.sizes() != x.sizes().slice(0, x.dim() - 1))
      Py_RETURN_NONE;
    at::Tensor flat = given.dim() == 1 ? given : given.reshape({-1});
    flat = flat.to(at::kLong).contiguous();
    const int64_t* id = flat.data_ptr<int64_t>();
    const int64_t adapters = A.size(0);
    for (int64_t i = 0; i < flat.numel(); ++i)
      if (id[i] < -1 || id[i] >= adapters) Py_RETURN_NONE;
    ids = std::move(flat);
  }
  static auto lor2c_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lor2c_ops_ext::lor2c", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                            const at::Tensor&)>();
  const at::Tensor seed = seed_for(*p);
  return THPVariable_Wrap(run(n * (d_in + d_out), [&] {
    return lor2c_op.call(x, layer_out, A, B, ids, *scale, *p, seed);
  }));
  END_HANDLE_TH_ERRORS
}

// _C._dcft(x, weight, bias, A, B, C, scale, stride, dropout_p, training, generator, backend)
PyObject* dcft_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 12) Py_RETURN_NONE;
  const at::Tensor* xp = plain_tensor(args[0]);
  const at::Tensor* wp = plain_tensor(args[1]);
  const at::Tensor* biasp = args[2] == Py_None ? nullptr : plain_tensor(args[2]);
  const at::Tensor* ap = plain_tensor(args[3]);
  const at::Tensor* bp = plain_tensor(args[4]);
  const at::Tensor* cp = plain_tensor(args[5]);
  if (!xp || !wp || !ap || !bp || !cp || (args[2] != Py_None && !biasp) || args[10] != Py_None)
    Py_RETURN_NONE;
  const int backend = backend_code(args[11]);
  const std::optional<double> scale = number(args[6]);
  const std::optional<double> p = probability(args[8], args[9]);
  if (backend < 0 || !scale || !p) Py_RETURN_NONE;
  const at::Tensor &x = *xp, &W = *wp, &A = *ap, &B = *bp, &C = *cp;
  if (x.dim() < 1 || W.dim() != 2 || A.dim() != 2 || B.dim() != 2 || C.dim() != 2) Py_RETURN_NONE;
  const int64_t k = C.size(0);
  int64_t stride = k;
  if (args[7] != Py_None) {
    if (!PyLong_CheckExact(args[7])) Py_RETURN_NONE;
    stride = PyLong_AsLongLong(args[7]);
    if (stride == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      Py_RETURN_NONE;
    }
  }
  const int dtype = dtype_code(x.scalar_type());
  if (dtype < 0 || !allowed[backend][dtype][kDCFT] || W.scalar_type() != x.scalar_type() ||
      (biasp && biasp->scalar_type() != x.scalar_type()) || A.scalar_type() != B.scalar_type() ||
      A.scalar_type() != C.scalar_type() ||
      (A.scalar_type() != x.scalar_type() && A.scalar_type() != at::kFloat))
    Py_RETURN_NONE;
  const at::Device device = x.device();
  if (!device.is_cpu() || W.device() != device || A.device() != device || B.device() != device ||
      C.device() != device || (biasp && biasp->device() != device))
    Py_RETURN_NONE;
  const int64_t d_out = W.size(0), d_in = W.size(1), r = A.size(0);
  if (stride < 1 || stride > k || x.size(-1) != d_in || r < 1 || B.size(1) != r || C.size(1) != k ||
      A.size(1) < 1 || B.size(0) < 1 || (A.size(1) - 1) * stride + k != d_in ||
      (B.size(0) - 1) * stride + k != d_out ||
      (biasp && (biasp->dim() != 1 || biasp->size(0) != d_out)))
    Py_RETURN_NONE;
  const int64_t n = x.numel() / std::max<int64_t>(d_in, 1);
  if (n >= kRowLimit || unusual_mode() || has_forward_grad(x) || has_forward_grad(A) ||
      has_forward_grad(B) || has_forward_grad(C))
    Py_RETURN_NONE;
  static auto dcft_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lor2c_ops_ext::dcft", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            int64_t, double, const at::Tensor&)>();
  const at::Tensor seed = seed_for(*p);
  const std::optional<at::Tensor> bias = biasp ? std::optional<at::Tensor>(*biasp) : std::nullopt;
  return THPVariable_Wrap(run(n * (d_in + d_out), [&] {
    return dcft_op.call(x, W, bias, A, B, C, *scale, stride, *p, seed);
  }));
  END_HANDLE_TH_ERRORS
}

// _C._fast_allow(backend, dtype_code, op, expression_rank): see `allowed` and `expression_rank`
// (None: no call is left to the expression; a rank below 1 counts as 1, every rank).
PyObject* allow_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
      (args[3] != Py_None && !PyLong_CheckExact(args[3]))) {
    PyErr_SetString(PyExc_TypeError, "_fast_allow(backend, dtype_code, op, expression_rank)");
    return nullptr;
  }
  const int backend = backend_code(args[0]);
  const long dtype = PyLong_AsLong(args[1]), op = PyLong_AsLong(args[2]);
  int64_t from = 0;
  if (args[3] != Py_None) {
    from = PyLong_AsLongLong(args[3]);
    if (from == -1 && PyErr_Occurred()) return nullptr;  // too large for int64
    from = std::max<int64_t>(from, 1);
  }
  if (backend >= 0 && dtype >= 0 && dtype < kDtypes && op >= 0 && op < kOps) {
    expression_rank[backend][dtype][op] = from;  // before `allowed`: no call sees one without it
    allowed[backend][dtype][op] = true;
  }
  Py_RETURN_NONE;
}

// _C._fast_reset(): forget every allowed choice (tests).
PyObject* reset_entry(PyObject*, PyObject*) {
  for (int b = 0; b < kBackendArgs; ++b)
    for (int d = 0; d < kDtypes; ++d)
      for (int o = 0; o < kOps; ++o) {
        allowed[b][d][o] = false;
        expression_rank[b][d][o] = 0;
      }
  Py_RETURN_NONE;
}

}  // namespace

PyMethodDef* fast_entry_methods() {
  static PyMethodDef methods[] = {
      {"_lor2c", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lor2c_entry)),
       METH_FASTCALL, "lor2c_residual's fast entry on CPU tensors (None: take the Python path)"},
      {"_dcft", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dcft_entry)),
       METH_FASTCALL, "dcft_linear's fast entry on CPU tensors (None: take the Python path)"},
      {"_fast_allow", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&allow_entry)),
       METH_FASTCALL, "allow the fast entry for (backend, dtype code, op code, expression rank)"},
      {"_fast_reset", &reset_entry, METH_NOARGS, "forget every allowed fast-entry choice"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace lor2c
