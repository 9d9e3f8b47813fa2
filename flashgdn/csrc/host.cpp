// The repeated-call path of flashgdn's public functions in C++ (flashgdn.host; FLASHGDN_HOST=1).
//
// A call site (one public function) passes all of its arguments. Their signature (per tensor its type,
// dtype, device, layout, sizes, strides and requires_grad; None; bool, int and float with their values;
// short strings) is looked up in the site's table, which the Python side fills after a call of that
// signature ran the Python way (flashgdn.fastpath): the compiled function of that call, the order of
// its launch arguments, where the output goes and what the call returns. The signature holds every
// fact of the Python fast key and more, so a hit runs the function the fast key would have found. A
// miss (or an argument of another kind) returns None and the call goes the Python way, as does a
// refusal by the compiled function's own checks (an exception of the kinds `set_refused` names:
// nothing was launched), so that the Python way names the argument or runs a new variant.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace {

enum Tag : int64_t { kNone = 1, kTensor, kBool, kInt, kFloat, kStr };
constexpr int kNoArg = -1;   // None in the launch
constexpr int kOutput = -2;  // the output, given or allocated
constexpr int kConst = -3;   // kConst - j: the entry's constant j (a tensor it keeps: a workspace)
constexpr size_t kMaxArgs = 64;
constexpr size_t kSpares = 2;  // outputs an entry keeps: one the caller holds (`o = f(...)`), one free

struct SigHash {
  size_t operator()(const std::vector<int64_t>& s) const {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t x : s) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ULL;
    return static_cast<size_t>(h);
  }
};

struct Entry {
  PyObject* fn;              // the compiled function (a strong reference)
  std::vector<int> launch;   // per launch argument: a call argument's index, kNoArg, kOutput or a constant's
  std::vector<int> ret;      // the returned tuple, the same way
  int output;                // index of the output argument (None there, or kNoArg: allocate like `like`)
  int like;                  // index of the tensor (an argument or a constant) the output is allocated like
  std::vector<PyObject*> consts;  // strong references
  int stream_of;             // an argument whose device's current stream must be `stream` (kNoArg: none)
  int64_t stream;
  // Outputs this entry allocated, kept (strong references) to be handed out again once nothing but this
  // entry holds them: an allocation and its free cost about 2 µs of a call's host time on an H100 host.
  PyObject* spare[kSpares] = {};
  size_t spare_bytes[kSpares] = {};  // as allocated (the caller may change a tensor's size in place)
  size_t next_spare = 0;           // the slot a new output takes where none is empty
};

// Strong references, released when it goes out of scope (also when a C++ exception unwinds it).
struct Refs {
  std::vector<PyObject*> objects;
  ~Refs() {
    for (PyObject* o : objects) Py_DECREF(o);
  }
};

size_t held_bytes = 0;                      // held in spares over all entries
size_t max_spare_bytes = size_t{64} << 20;  // set_max_spare_bytes; 0: no spares
int64_t reuses = 0;

// Empties `e`'s spare slot i; its reference goes to `later`, released by the caller.
void drop_spare(Entry& e, size_t i, std::vector<PyObject*>& later) {
  if (e.spare[i] == nullptr) return;
  held_bytes -= e.spare_bytes[i];
  later.push_back(e.spare[i]);
  e.spare[i] = nullptr;
}

void release(Entry& e) {
  Py_DECREF(e.fn);
  for (PyObject* c : e.consts) Py_DECREF(c);
  Refs spares;
  for (size_t i = 0; i < kSpares; ++i) drop_spare(e, i, spares.objects);
}

// Whether outputs of `like`'s device may be kept and handed out again now: on the CPU (the tests) or on the
// device's default stream, where no CUDA graph is being captured (capture needs another stream), so that
// a spare never belongs to a graph's memory pool or is written by a graph's replay; stream order then
// orders a reuse after every earlier use of the memory, as the caching allocator's reuse of a freed block.
bool spares_serve(const at::Tensor& like) {
  const c10::Device device = like.device();
  if (!device.is_cuda()) return device.is_cpu();
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(device.type());
  return impl->getStream(device) == impl->getDefaultStream(device);
}

// Whether `t`'s strides are the packed row-major ones at::empty gives, size-1 dims included (is_contiguous
// accepts any stride there, which a compiled function may not).
bool packed_strides(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.stride(d) != expected) return false;
    expected *= std::max<int64_t>(t.size(d), 1);  // as torch strides a dim past a size-0 one
  }
  return true;
}

// Whether `o` has a Python weak reference (or that cannot be told). weakref.getweakrefcount: since Python
// 3.12 a tensor's weak references sit where no public C API reads them.
bool weakly_referenced(PyObject* o) {
  static PyObject* count = nullptr;
  if (count == nullptr) {
    PyObject* module = PyImport_ImportModule("_weakref");
    if (module != nullptr) {
      count = PyObject_GetAttrString(module, "getweakrefcount");
      Py_DECREF(module);
    }
    if (count == nullptr) {
      PyErr_Clear();
      return true;
    }
  }
  PyObject* n = PyObject_CallOneArg(count, o);
  if (n == nullptr) {
    PyErr_Clear();
    return true;
  }
  const long refs = PyLong_AsLong(n);
  Py_DECREF(n);
  return refs != 0;
}

// Whether the spare `s` can be the output of a call that allocates like `like`: nothing but the entry
// holds it (no other Python reference or weak reference, no C++ reference, no view or other tensor of its
// storage) and it is still what at::empty would give (the caller may have changed it in place before
// dropping it).
bool reusable(PyObject* s, const at::Tensor& like) {
  if (Py_REFCNT(s) != 1 || Py_TYPE(s) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
  const at::Tensor& t = THPVariable_Unpack(s);
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.use_count() == 1 && t.weak_use_count() == 1 && t.storage().use_count() == 1 &&
         impl->autograd_meta() == nullptr && t.layout() == at::kStrided &&
         t.dtype() == like.dtype() && t.device() == like.device() && t.sizes().equals(like.sizes()) &&
         packed_strides(t) && t.storage_offset() == 0 && t.storage().nbytes() == t.nbytes() && !t.is_conj() &&
         !t.is_neg() && t.is_inference() == c10::InferenceMode::is_enabled() && !weakly_referenced(s);
}

// A new output like `like` (a new reference): a spare of `e` that nothing else holds, or a new tensor that
// `e` keeps as a spare where spares serve and the bound allows (a spare it replaces goes to `later`, released
// once nothing of `e` is read any more).
PyObject* output_like(Entry& e, const at::Tensor& like, std::vector<PyObject*>& later) {
  const bool serve = max_spare_bytes > 0 && spares_serve(like);
  if (serve) {
    for (PyObject* s : e.spare) {
      if (s != nullptr && reusable(s, like)) {
        ++reuses;
        Py_INCREF(s);
        return s;
      }
    }
  }
  // Packed, of `like`'s shape, dtype and device: at::empty costs about 0.35 µs less than empty_like on an H100
  // host (one dispatch, no stride inference)
  PyObject* out = THPVariable_Wrap(at::empty(like.sizes(), like.options()));
  if (out == nullptr || !serve) return out;
  size_t slot = 0;
  while (slot < kSpares && e.spare[slot] != nullptr) ++slot;
  if (slot == kSpares) {
    slot = e.next_spare;
    e.next_spare = (e.next_spare + 1) % kSpares;
    drop_spare(e, slot, later);
  }
  const size_t bytes = THPVariable_Unpack(out).nbytes();
  if (held_bytes + bytes <= max_spare_bytes) {
    Py_INCREF(out);
    e.spare[slot] = out;
    e.spare_bytes[slot] = bytes;
    held_bytes += bytes;
  }
  return out;
}

// The id of the current stream of `t`'s device (under CUDA-graph capture, the capture stream's).
int64_t current_stream(const at::Tensor& t) {
  const c10::Device device = t.device();
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).id();
}

using Table = std::unordered_map<std::vector<int64_t>, Entry, SigHash>;
std::vector<Table> tables;
size_t max_entries = 0;  // entries per site's table: flashgdn.host sets validation.MEMO_MAX once built
int64_t hits = 0;
PyObject* refused = nullptr;  // the exception kinds of a refusal (flashgdn.fastpath.REFUSED), set once built

// Appends the signature of `o` to `sig`; false for an argument of another kind.
bool append_tensor(std::vector<int64_t>& sig, PyObject* o) {
  const at::Tensor& t = THPVariable_Unpack(o);
  if (t.layout() != at::kStrided) return false;
  const at::Device device = t.device();
  sig.push_back(kTensor);
  sig.push_back(reinterpret_cast<int64_t>(Py_TYPE(o)));
  // dtype, device type and index, requires_grad and ndim in one word (each well under 8 bits; the index
  // under 16)
  sig.push_back(static_cast<int64_t>(t.scalar_type()) | (static_cast<int64_t>(device.type()) << 8) |
                ((static_cast<int64_t>(device.index()) & 0xffff) << 16) |
                (static_cast<int64_t>(t.requires_grad()) << 32) | (static_cast<int64_t>(t.dim()) << 40));
  for (int64_t s : t.sizes()) sig.push_back(s);
  for (int64_t s : t.strides()) sig.push_back(s);
  return true;
}

// Appends the signature of `o` to `sig`; false for an argument of another kind. The exact types go
// first: THPVariable_Check goes through the tensor metaclass's instance check, slow for a scalar.
bool append(std::vector<int64_t>& sig, PyObject* o) {
  PyTypeObject* type = Py_TYPE(o);
  if (o == Py_None) {
    sig.push_back(kNone);
  } else if (type == reinterpret_cast<PyTypeObject*>(THPVariableClass)) {
    return append_tensor(sig, o);
  } else if (type == &PyBool_Type) {
    sig.push_back(kBool);
    sig.push_back(o == Py_True);
  } else if (type == &PyLong_Type) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return false;
    sig.push_back(kInt);
    sig.push_back(v);
  } else if (type == &PyFloat_Type) {
    double v = PyFloat_AS_DOUBLE(o);
    int64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    sig.push_back(kFloat);
    sig.push_back(bits);
  } else if (type == &PyUnicode_Type) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == nullptr || n > 64) {
      PyErr_Clear();
      return false;
    }
    sig.push_back(kStr);
    sig.push_back(n);
    for (Py_ssize_t i = 0; i < n; ++i) sig.push_back(s[i]);
  } else if (THPVariable_Check(o)) {  // a tensor subclass (nn.Parameter): its type is in the signature
    return append_tensor(sig, o);
  } else {
    return false;
  }
  return true;
}

bool signature(std::vector<int64_t>& sig, PyObject* const* args, Py_ssize_t n) {
  sig.clear();
  sig.push_back(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!append(sig, args[i])) return false;
  }
  return true;
}

// The call's site (argv[0], a table of its own) and, after `lead` leading arguments, its arguments.
bool site_args(PyObject* const* argv, Py_ssize_t argc, Py_ssize_t lead, const char* usage, size_t& site,
               PyObject* const*& args, Py_ssize_t& n) {
  if (argc < lead) {
    PyErr_SetString(PyExc_TypeError, usage);
    return false;
  }
  long s = PyLong_AsLong(argv[0]);
  if (s < 0 || PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "site must be a non-negative int");
    return false;
  }
  site = static_cast<size_t>(s);
  if (tables.size() <= site) tables.resize(site + 1);
  args = argv + lead;
  n = argc - lead;
  return true;
}

PyObject* pick(int i, PyObject* const* args, PyObject* out, const std::vector<PyObject*>& consts) {
  if (i >= 0) return args[i];
  return i == kOutput ? out : (i == kNoArg ? Py_None : consts[kConst - i]);
}

// call(site, *args): the call's result (a tuple, or its one element where the entry returns one), or None
// where the site's table has no entry for the signature or the compiled function refuses the arguments.
PyObject* call(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS  // a C++ exception (an allocation that fails) becomes torch's Python exception
  size_t site;
  PyObject* const* args;
  Py_ssize_t n;
  if (!site_args(argv, argc, 1, "call(site, *args)", site, args, n)) return nullptr;
  thread_local std::vector<int64_t> sig;
  if (!signature(sig, args, n)) Py_RETURN_NONE;
  auto it = tables[site].find(sig);
  if (it == tables[site].end()) Py_RETURN_NONE;
  Entry& e = it->second;
  if (e.stream_of != kNoArg && current_stream(THPVariable_Unpack(args[e.stream_of])) != e.stream) Py_RETURN_NONE;
  // Python code may run during the call (a finalizer) and change the table: nothing of `e` is read after it,
  // and what the call uses of it is held here (as is a spare it replaced, released on return).
  Refs held{e.consts}, replaced;
  for (PyObject* c : held.objects) Py_INCREF(c);
  const std::vector<PyObject*>& consts = held.objects;
  PyObject* out = e.output == kNoArg ? Py_None : args[e.output];
  if (out == Py_None) {
    out = output_like(e, THPVariable_Unpack(pick(e.like, args, nullptr, consts)), replaced.objects);
    if (out == nullptr) return nullptr;
  } else {
    Py_INCREF(out);
  }
  PyObject* launch[kMaxArgs];
  const size_t n_launch = e.launch.size();
  for (size_t i = 0; i < n_launch; ++i) launch[i] = pick(e.launch[i], args, out, consts);
  PyObject* fn = e.fn;
  Py_INCREF(fn);
  const std::vector<int> ret = e.ret;
  PyObject* r = PyObject_Vectorcall(fn, launch, n_launch, nullptr);
  Py_DECREF(fn);
  if (r == nullptr) {
    Py_DECREF(out);
    if (refused == nullptr || !PyErr_ExceptionMatches(refused)) return nullptr;
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  Py_DECREF(r);
  ++hits;
  if (ret.size() == 1) {
    PyObject* o = pick(ret[0], args, out, consts);
    Py_INCREF(o);
    Py_DECREF(out);
    return o;
  }
  PyObject* result = PyTuple_New(static_cast<Py_ssize_t>(ret.size()));
  if (result == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  for (size_t i = 0; i < ret.size(); ++i) {
    PyObject* o = pick(ret[i], args, out, consts);
    Py_INCREF(o);
    PyTuple_SET_ITEM(result, static_cast<Py_ssize_t>(i), o);
  }
  Py_DECREF(out);
  return result;
  END_HANDLE_TH_ERRORS
}

// The indices of `seq` into `into`: each an argument's (below n), kNoArg, kOutput or one of `consts` constants'.
bool indices(PyObject* seq, std::vector<int>& into, Py_ssize_t n, Py_ssize_t consts) {
  PyObject* fast = PySequence_Fast(seq, "expected a sequence of ints");
  if (fast == nullptr) return false;
  Py_ssize_t m = PySequence_Fast_GET_SIZE(fast);
  for (Py_ssize_t i = 0; i < m; ++i) {
    long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
    if ((v == -1 && PyErr_Occurred()) || v <= kConst - consts || v >= n) {
      Py_DECREF(fast);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "an index outside the call's arguments");
      return false;
    }
    into.push_back(static_cast<int>(v));
  }
  Py_DECREF(fast);
  return true;
}

// remember(site, fn, launch, ret, output, like, consts, stream_of, *args): later calls with this signature run
// `fn` (on the stream current now on the device of args[stream_of], where that is not kNoArg).
PyObject* remember(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  HANDLE_TH_ERRORS
  size_t site;
  PyObject* const* args;
  Py_ssize_t n;
  if (!site_args(argv, argc, 8, "remember(site, fn, launch, ret, output, like, consts, stream_of, *args)", site, args,
                 n))
    return nullptr;
  PyObject* consts = PySequence_Fast(argv[6], "consts must be a sequence");
  if (consts == nullptr) return nullptr;
  const Refs owned{{consts}};
  const Py_ssize_t n_consts = PySequence_Fast_GET_SIZE(consts);
  Entry e{argv[1], {}, {}, static_cast<int>(PyLong_AsLong(argv[4])), static_cast<int>(PyLong_AsLong(argv[5])), {},
          static_cast<int>(PyLong_AsLong(argv[7])), 0};
  for (Py_ssize_t i = 0; i < n_consts; ++i) e.consts.push_back(PySequence_Fast_GET_ITEM(consts, i));
  auto allocates_like = [&](int i) {
    return THPVariable_Check(i >= 0 ? args[i] : e.consts[kConst - i]);
  };
  if (PyErr_Occurred() || !indices(argv[2], e.launch, n, n_consts) || !indices(argv[3], e.ret, n, n_consts))
    return nullptr;
  if (e.launch.size() > kMaxArgs || e.ret.empty() || e.output < kNoArg || e.output >= n ||
      e.like <= kConst - n_consts || e.like >= n || (e.like < 0 && e.like > kConst) ||
      ((e.output == kNoArg || args[e.output] == Py_None) && !allocates_like(e.like)) || e.stream_of < kNoArg ||
      e.stream_of >= n || (e.stream_of >= 0 && !THPVariable_Check(args[e.stream_of])))
    return PyErr_Format(PyExc_ValueError,
                        "a launch of at most %d arguments, a result, an output, a tensor to allocate it like and a "
                        "tensor argument (or -1) whose stream is kept",
                        static_cast<int>(kMaxArgs));
  std::vector<int64_t> sig;
  if (!signature(sig, args, n)) Py_RETURN_FALSE;
  if (e.stream_of != kNoArg) e.stream = current_stream(THPVariable_Unpack(args[e.stream_of]));
  Py_INCREF(e.fn);
  for (PyObject* c : e.consts) Py_INCREF(c);
  // Entries are released only after the table is consistent: a release may run Python code that calls back
  // into this module.
  Table dropped;
  if (max_entries && tables[site].size() >= max_entries) dropped.swap(tables[site]);
  std::vector<Entry> replaced;
  auto found = tables[site].find(sig);
  if (found != tables[site].end()) {
    replaced.push_back(std::move(found->second));
    found->second = std::move(e);
  } else {
    tables[site].emplace(std::move(sig), std::move(e));
  }
  for (auto& old : replaced) release(old);
  for (auto& kv : dropped) release(kv.second);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// forget(): every site's entries dropped.
PyObject* forget(PyObject*, PyObject* const*, Py_ssize_t) {
  std::vector<Table> old;
  old.swap(tables);  // a release may run Python code that calls back in
  for (auto& table : old)
    for (auto& kv : table) release(kv.second);
  Py_RETURN_NONE;
}

// stats(): (hits, entries, the bound of each site's table, outputs reused, bytes held in spares).
PyObject* stats(PyObject*, PyObject* const*, Py_ssize_t) {
  size_t entries = 0;
  for (auto& table : tables) entries += table.size();
  return Py_BuildValue("(LnnLn)", static_cast<long long>(hits), static_cast<Py_ssize_t>(entries),
                       static_cast<Py_ssize_t>(max_entries), static_cast<long long>(reuses),
                       static_cast<Py_ssize_t>(held_bytes));
}

// set_max_spare_bytes(n): the bound of the bytes held in spare outputs over all entries (0: none kept).
PyObject* set_max_spare_bytes(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 1) return PyErr_Format(PyExc_TypeError, "set_max_spare_bytes(n)");
  long long v = PyLong_AsLongLong(argv[0]);
  if (v < 0 || PyErr_Occurred()) return PyErr_Format(PyExc_ValueError, "a byte count of 0 or more");
  max_spare_bytes = static_cast<size_t>(v);
  Py_RETURN_NONE;
}

PyObject* set_max_entries(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 1) return PyErr_Format(PyExc_TypeError, "set_max_entries(n)");
  long v = PyLong_AsLong(argv[0]);
  if (v < 1 || PyErr_Occurred()) return PyErr_Format(PyExc_ValueError, "a positive entry count");
  max_entries = static_cast<size_t>(v);
  Py_RETURN_NONE;
}

// set_refused(kinds): the exception class or tuple of classes that a refusal raises.
PyObject* set_refused(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 1) return PyErr_Format(PyExc_TypeError, "set_refused(kinds)");
  Py_INCREF(argv[0]);
  Py_XSETREF(refused, argv[0]);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)), METH_FASTCALL, nullptr},
    {"remember", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(remember)), METH_FASTCALL, nullptr},
    {"forget", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forget)), METH_FASTCALL, nullptr},
    {"stats", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(stats)), METH_FASTCALL, nullptr},
    {"set_max_entries", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_max_entries)), METH_FASTCALL,
     nullptr},
    {"set_max_spare_bytes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_max_spare_bytes)),
     METH_FASTCALL, nullptr},
    {"set_refused", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_refused)), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { PyModule_AddFunctions(m.ptr(), methods); }
