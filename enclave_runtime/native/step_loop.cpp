// enclave_runtime/fastpath.py's slot loop, in C++: one call of a split program whose enclave
// stages are all compiled libraries, with Python entered only for each GPU stage's request.
//
// Why: a SmolLM2 decode step under `slalom` makes 121 library calls and 121 GPU round trips.
// Replayed, the Python loop around them (argument lists, the binding's conversions of every
// tensor in and out of each library, the outputs' flags) cost ~2.7 ms of a 7.6 ms step while
// the libraries took 4.9 ms (benchmarks/README.md, stop 48). Here the libraries are called
// from C++ (`AOTIModelContainerRunner::run` on the runner the Python `CompiledCall` loaded),
// and only what must be Python is: the runner that sends a request, the reply checks
// (`replies.check_reply`'s native accept, else the Python check, which names the fault) and,
// for a reply checked as it comes (the logits), the numpy check's two halves.
//
// Guarantees: the same as the Python loop's (enclave_runtime/fastpath.py), which decides when
// this runs (a call of the program scanned in full before, none of the call's own inputs
// empty, each a tensor passed contiguous, no limit on the rows a library checks):
//  * the GPU receives the slots the plan says, copies where the runner does not copy them;
//    the enclave keeps its own tensor (a copy where the runner is handed it) for the check;
//  * every reply passes `accepts` or `check_reply` (which raises) before anything reads it;
//  * a library's fused Freivalds verdict and its masks' flag are read in that order and end
//    the call with a code the caller raises as the Python loop raises (the check's secret is
//    redrawn there); an exception from the runner or the check propagates as it was raised;
//  * a library that throws ends the call with its message and its inputs, which the caller
//    names the fault from (no retry: GPU calls were made);
//  * a reply list is read once, into a tuple, before its check: code of the runner's that
//    runs later (a finaliser) cannot change what is checked or read;
//  * a loop runs only once sealed (`seal`, as soon as it is built), and takes no step after:
//    the loop reads its step lists by reference, and a step added between calls would run
//    unchecked.
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>
#include <torch/extension.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;
using Runner = torch::inductor::AOTIModelContainerRunnerCpu;

namespace {

enum Code : int { kDone = 0, kCheckFailed = 1, kMasksRefused = 2, kLibraryRaised = 3 };

struct Library {
  py::object owner;  // the Python runner object, kept alive while this holds its pointer
  Runner* runner = nullptr;
  std::vector<int> args, outs, check_slots, drop;
  py::object check;  // the RingCheck whose reply this library checks, or None
  std::vector<at::Tensor> constants;
  bool flags = false;     // the library's last output is its masks' flag
  bool verifies = false;  // the output before it is its Freivalds verdict
};

struct Gpu {
  py::object name;
  std::vector<int> sent, outs, drop;
  std::vector<std::pair<int, int>> keep;  // (position in `sent`, slot)
  bool checked_here = false;  // its reply is checked in Python as it comes (`expect`, `verify`)
};

bool truth(const at::Tensor& flag) {
  return flag.scalar_type() == at::kBool && flag.numel() == 1 ? *flag.const_data_ptr<bool>()
                                                               : flag.item().toBool();
}

std::vector<int> ints(const py::handle& seq) { return seq.cast<std::vector<int>>(); }

class Loop {
 public:
  explicit Loop(int size) : size_(size) {}

  void add_library(py::object runner, py::object args, py::object outs, py::object check_slots,
                   py::object check, std::vector<at::Tensor> constants, bool flags,
                   bool verifies, py::object drop) {
    refuse_new_steps();
    Library lib;
    lib.runner = runner.cast<Runner*>();
    lib.owner = std::move(runner);
    lib.args = ints(args);
    lib.outs = ints(outs);
    lib.check_slots = ints(check_slots);
    lib.drop = ints(drop);
    lib.check = std::move(check);
    lib.constants = std::move(constants);
    lib.flags = flags;
    lib.verifies = verifies;
    check_slots_of(lib.args);
    check_slots_of(lib.outs);
    check_slots_of(lib.check_slots);
    check_slots_of(lib.drop);
    order_.emplace_back(true, libraries_.size());
    libraries_.push_back(std::move(lib));
  }

  void add_gpu(py::object name, py::object sent, py::object outs,
               std::vector<std::pair<int, int>> keep, bool checked_here, py::object drop) {
    refuse_new_steps();
    Gpu gpu;
    gpu.checked_here = checked_here;
    gpu.name = std::move(name);
    gpu.sent = ints(sent);
    gpu.outs = ints(outs);
    gpu.drop = ints(drop);
    for (const auto& [position, slot] : keep) {
      if (position < 0 || position >= static_cast<int>(gpu.sent.size()))
        throw std::out_of_range("a kept request position outside the request");
      check_slot(slot);
    }
    gpu.keep = std::move(keep);
    check_slots_of(gpu.sent);
    check_slots_of(gpu.outs);
    check_slots_of(gpu.drop);
    order_.emplace_back(false, gpus_.size());
    gpus_.push_back(std::move(gpu));
  }

  // One call. `inputs`: (slot, tensor) pairs (the call's inputs, the set's pads and
  // corrections); `send(name, request, expected)` returns the reply, `accepts(reply,
  // expected)` is the native reply check and `check_reply(name, reply, expected)` the Python
  // one (raises); `replies` maps a GPU stage's name to what its reply must be. A reply checked
  // as it comes: `expect(index, request)` on the enclave's own tensors before it is sent,
  // `verify(index, sums, reply)` once it is accepted (raises), `index` the GPU stage's among
  // the GPU stages. Returns (code, step, detail, values of `wanted`'s slots): `step` the
  // library (its index among the libraries) that ended a call with a code.
  py::tuple run(const std::vector<std::pair<int, at::Tensor>>& inputs, const py::object& send,
                const py::object& accepts, const py::object& check_reply,
                const py::object& expect, const py::object& verify, const py::dict& replies,
                bool copies, const std::vector<int>& wanted) {
    if (!sealed_) throw std::runtime_error("the loop is not sealed: seal it once it is built");
    std::vector<at::Tensor> v(size_);
    for (const auto& [slot, value] : inputs) {
      check_slot(slot);
      v[slot] = value;
    }
    bool verified = false;  // whether the library after a GPU stage checks its reply
    std::vector<at::Tensor> call;
    for (const auto& [is_library, index] : order_) {
      if (is_library) {
        const Library& lib = libraries_[index];
        call.clear();
        for (int slot : lib.args) call.push_back(v[slot]);
        if (!lib.check.is_none()) {
          for (int slot : lib.check_slots) call.push_back(v[slot]);
          // read per call: a failed check redraws the vectors (RingCheck.draw)
          call.push_back(lib.check.attr("fused_vector")(verified).cast<at::Tensor>());
        }
        call.insert(call.end(), lib.constants.begin(), lib.constants.end());
        std::vector<at::Tensor> outs;
        try {
          py::gil_scoped_release unlocked;
          outs = lib.runner->run(call);
        } catch (const std::exception& exc) {
          std::string what = exc.what();
          return raised(index, what.substr(0, what.find('\n')), call, lib);
        }
        bool masks_ok = true;
        if (lib.flags) {
          masks_ok = truth(outs.back());
          outs.pop_back();
        }
        if (lib.verifies) {
          const bool passed = truth(outs.back());
          outs.pop_back();
          if (!passed) return py::make_tuple(static_cast<int>(kCheckFailed), index, "", py::none());
        }
        if (!masks_ok) return py::make_tuple(static_cast<int>(kMasksRefused), index, "", py::none());
        if (outs.size() != lib.outs.size())
          return raised(index,
                        "returned " + std::to_string(outs.size()) + " outputs, not " +
                            std::to_string(lib.outs.size()),
                        call, lib);
        // contiguous, as the Python loop's retry makes a library's inputs
        for (size_t i = 0; i < outs.size(); ++i) v[lib.outs[i]] = outs[i].contiguous();
        for (int slot : lib.drop) v[slot] = at::Tensor();
        continue;
      }
      const Gpu& gpu = gpus_[index];
      py::object sums = py::none();
      if (gpu.checked_here) {
        py::list own(gpu.sent.size());
        for (size_t i = 0; i < gpu.sent.size(); ++i) own[i] = py::cast(v[gpu.sent[i]]);
        sums = expect(index, own);
      }
      py::list request(gpu.sent.size());
      for (size_t i = 0; i < gpu.sent.size(); ++i) {
        const at::Tensor& t = v[gpu.sent[i]];
        request[i] = py::cast(copies ? t : t.clone());
      }
      for (const auto& [position, slot] : gpu.keep) {
        // the check reads the enclave's own tensor, never one a runner was handed
        const at::Tensor& t = v[gpu.sent[position]];
        v[slot] = copies ? t.clone() : t;
      }
      py::object expected = replies[gpu.name];
      py::object reply = frozen(send(gpu.name, request, expected));
      if (!accepts(reply, expected).cast<bool>()) check_reply(gpu.name, reply, expected);
      // check_reply accepted exactly a list or tuple of plain tensors, as many as the plan's
      py::sequence got = reply.cast<py::sequence>();
      if (static_cast<size_t>(got.size()) != gpu.outs.size())
        throw std::runtime_error("a reply's count changed after its check");
      for (size_t i = 0; i < gpu.outs.size(); ++i)
        v[gpu.outs[i]] = got[i].cast<at::Tensor>().contiguous();
      if (gpu.checked_here) verify(index, sums, reply);
      for (int slot : gpu.drop) v[slot] = at::Tensor();
      verified = !gpu.keep.empty();
    }
    py::list values(wanted.size());
    for (size_t i = 0; i < wanted.size(); ++i) {
      check_slot(wanted[i]);
      values[i] = py::cast(v[wanted[i]]);
    }
    return py::make_tuple(static_cast<int>(kDone), -1, "", values);
  }

  void seal() { sealed_ = true; }

 private:
  // a library's refusal: its message and the inputs it was given (the caller names the
  // input at fault from them, as the Python loop does)
  static py::tuple raised(size_t index, const std::string& detail,
                          const std::vector<at::Tensor>& call, const Library& lib) {
    std::vector<at::Tensor> args(call.begin(), call.begin() + lib.args.size());
    return py::make_tuple(static_cast<int>(kLibraryRaised), index, detail, py::cast(args));
  }

  void refuse_new_steps() const {
    if (sealed_) throw std::runtime_error("the loop is sealed: no step is added once it is built");
  }

  // a list as a tuple of the items it holds now: strong references taken with no Python
  // allocation between the reads (an allocation can run the cyclic GC, and a finaliser could
  // edit the list), then the tuple made; anything else as it is (the check refuses it)
  static py::object frozen(py::object reply) {
    PyObject* list = reply.ptr();
    if (!PyList_CheckExact(list)) return reply;
    const Py_ssize_t count = PyList_GET_SIZE(list);
    std::vector<py::object> items;
    items.reserve(static_cast<size_t>(count));
    for (Py_ssize_t i = 0; i < count; ++i)
      items.push_back(py::reinterpret_borrow<py::object>(PyList_GET_ITEM(list, i)));
    py::tuple out(count);
    for (Py_ssize_t i = 0; i < count; ++i) out[i] = std::move(items[static_cast<size_t>(i)]);
    return std::move(out);
  }

  void check_slot(int slot) const {
    if (slot < 0 || slot >= size_) throw std::out_of_range("slot outside the loop's values");
  }
  void check_slots_of(const std::vector<int>& slots) const {
    for (int slot : slots) check_slot(slot);
  }

  int size_;
  bool sealed_ = false;
  std::vector<Library> libraries_;
  std::vector<Gpu> gpus_;
  std::vector<std::pair<bool, size_t>> order_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Loop>(m, "Loop")
      .def(py::init<int>())
      .def("add_library", &Loop::add_library)
      .def("add_gpu", &Loop::add_gpu)
      .def("seal", &Loop::seal)
      .def("run", &Loop::run);
  m.attr("DONE") = static_cast<int>(kDone);
  m.attr("CHECK_FAILED") = static_cast<int>(kCheckFailed);
  m.attr("MASKS_REFUSED") = static_cast<int>(kMasksRefused);
  m.attr("LIBRARY_RAISED") = static_cast<int>(kLibraryRaised);
}
