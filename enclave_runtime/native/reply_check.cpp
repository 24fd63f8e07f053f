// The fast accept path of enclave_runtime/replies.py's check_reply, as a Python extension.
//
// Why: a decode step checks 121 GPU replies, and the Python check reads ~15 tensor attributes
// per output through the binding (~10 us a reply, ~10 % of a replayed SmolLM2 `slalom` decode
// step). This reads them in C++ in one call.
//
// Guarantee: accepts(outs, expected) returns true only for a reply the Python check accepts:
// exactly a list or tuple of exactly torch.Tensor (or Parameter) objects, as many as expected;
// each a plain TensorImpl (no functionalisation, functorch or other wrapper), strided, on the
// CPU, not a zero tensor, with neither the negative nor the conjugate bit, with no Python
// dispatch key, of the expected dtype and (where given) shape, contiguous with a non-null data
// pointer and a storage as large as its offset and elements reach, and finite where it is
// floating point. It may refuse more than the Python check does (a non-contiguous reply, a
// shape given as a tuple): check_reply then runs the Python check, which accepts it or names
// what is wrong. It never raises: anything unexpected is a refusal.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <exception>
#include <typeinfo>

namespace {

bool same_shape(const at::Tensor& t, PyObject* shape) {
  if (shape == Py_None) return true;
  if (!PyList_CheckExact(shape) || PyList_GET_SIZE(shape) != t.dim()) return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(shape); ++i) {
    PyObject* size = PyList_GET_ITEM(shape, i);
    if (!PyLong_CheckExact(size)) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(size, &overflow);
    if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    if (value != t.size(i)) return false;
  }
  return true;
}

bool plain(const at::Tensor& t, PyObject* dtype, PyObject* shape) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // a wrapper (functionalisation, functorch's batched or grad tensors, nested, quantised,
  // sparse) is a subclass of TensorImpl
  if (typeid(*impl) != typeid(c10::TensorImpl)) return false;
  if (t.layout() != c10::kStrided || !t.is_cpu() || t.is_neg() || t.is_conj()) return false;
  if (t._is_zerotensor() || impl->key_set().has(c10::DispatchKey::Python)) return false;
  if (!THPDtype_Check(dtype)) return false;
  if (reinterpret_cast<THPDtype*>(dtype)->scalar_type != t.scalar_type()) return false;
  if (!same_shape(t, shape) || !t.is_contiguous()) return false;
  const int64_t count = t.numel();
  if (count == 0) return true;
  if (!impl->has_storage() || t.const_data_ptr() == nullptr) return false;
  const int64_t offset = t.storage_offset();
  if (offset < 0) return false;
  const uint64_t reach = (static_cast<uint64_t>(offset) + static_cast<uint64_t>(count)) *
                         static_cast<uint64_t>(t.itemsize());
  if (t.storage().nbytes() < reach) return false;
  if (at::isFloatingType(t.scalar_type()) && !at::isfinite(t).all().item<bool>()) return false;
  return true;
}

bool accepts(pybind11::handle outs, pybind11::handle expected) {
  PyObject* replies = outs.ptr();
  PyObject* wanted = expected.ptr();
  if (!(PyList_CheckExact(replies) || PyTuple_CheckExact(replies))) return false;
  if (!PyList_CheckExact(wanted)) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(replies);
  if (count != PyList_GET_SIZE(wanted)) return false;
  try {
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* out = PySequence_Fast_GET_ITEM(replies, i);
      PyObject* want = PyList_GET_ITEM(wanted, i);
      if (!THPVariable_CheckExact(out)) return false;
      if (!PyTuple_CheckExact(want) || PyTuple_GET_SIZE(want) != 2) return false;
      if (!plain(THPVariable_Unpack(out), PyTuple_GET_ITEM(want, 0), PyTuple_GET_ITEM(want, 1)))
        return false;
    }
  } catch (const std::exception&) {  // a tensor whose storage or data cannot be read
    return false;
  }
  return true;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("accepts", &accepts, "Whether check_reply's Python check would accept this reply.");
}
