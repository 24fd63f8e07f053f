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
// dispatch key, of the expected dtype and (where given, as a tuple or list) shape, contiguous
// with a non-null data pointer and a storage as large as its offset and elements reach, and
// finite where it is a 16-, 32- or 64-bit float (complex and 8-bit floats are left to the
// Python check). It may refuse more than the Python check does (a non-contiguous reply, say):
// check_reply then runs the Python check, which accepts it or names what is wrong. It never
// raises: anything unexpected is a refusal.
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cstdint>
#include <exception>
#include <typeinfo>
#include <vector>

namespace {

bool same_shape(const at::Tensor& t, PyObject* shape) {
  if (shape == Py_None) return true;
  if (!(PyTuple_CheckExact(shape) || PyList_CheckExact(shape))) return false;
  if (PySequence_Fast_GET_SIZE(shape) != t.dim()) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(shape); ++i) {
    PyObject* size = PySequence_Fast_GET_ITEM(shape, i);
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
  // the writable pointer, as the Python check's data_ptr() asks for: it refuses (throws on) a
  // tensor marked to, where const_data_ptr() would not (a reviewer's finding)
  if (!impl->has_storage() || t.mutable_data_ptr() == nullptr) return false;
  // offset + count elements within the storage, in divisions: a product can wrap (a reviewer's
  // attack: aten._reshape_alias makes an offset of 2**61 - 4 int64 elements, whose byte
  // count wraps to a small number, and the tensor reads 32 bytes before its storage)
  const int64_t offset = t.storage_offset();
  const size_t item = t.itemsize();
  if (offset < 0 || item == 0) return false;
  const size_t room = t.storage().nbytes() / item;
  if (static_cast<uint64_t>(offset) > room) return false;
  if (static_cast<uint64_t>(count) > room - static_cast<uint64_t>(offset)) return false;
  const auto type = t.scalar_type();
  if (type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16) {
    if (!at::isfinite(t).all().item<bool>()) return false;
  } else if (at::isFloatingType(type) || at::isComplexType(type)) {
    // complex and 8-bit floats: left to the Python check (this check once passed them
    // unread: complex is no floating type, and torch's isfinite passes float8_e8m0fnu's NaN)
    return false;
  }
  return true;
}

bool accepts(pybind11::handle outs, pybind11::handle expected) {
  // a Python dispatch mode would run Python inside isfinite below (which could change the
  // lists or lie about the values): left to the Python check
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  PyObject* replies = outs.ptr();
  PyObject* wanted = expected.ptr();
  if (!(PyList_CheckExact(replies) || PyTuple_CheckExact(replies))) return false;
  if (!(PyTuple_CheckExact(wanted) || PyList_CheckExact(wanted))) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(replies);
  if (count != PySequence_Fast_GET_SIZE(wanted)) return false;
  // strong references, taken before anything runs: the items stay alive whatever the lists
  // become while they are read
  std::vector<pybind11::object> items;
  std::vector<pybind11::object> wants;
  items.reserve(count);
  wants.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    items.push_back(pybind11::reinterpret_borrow<pybind11::object>(
        PySequence_Fast_GET_ITEM(replies, i)));
    wants.push_back(
        pybind11::reinterpret_borrow<pybind11::object>(PySequence_Fast_GET_ITEM(wanted, i)));
  }
  try {
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* out = items[i].ptr();
      PyObject* want = wants[i].ptr();
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
