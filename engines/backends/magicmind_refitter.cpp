// magicmind_refitter.cpp: a small pybind11 binding of MagicMind's C++ IRefitter, for the optional
// refit path of engines/backends/magicmind.py (MagicMind's Python API has no public refitter).
//
// UNTESTED: a sketch written against Cambricon's public C++ samples. It is NOT built by the
// project's install, CI or tests; without it the backend builds a shadow engine per weight set.
//
/* Build, only on a machine with the MagicMind SDK (headers and libraries under $NEUWARE_HOME),
   from the repository root:

     pip install pybind11
     c++ -O2 -std=c++17 -shared -fPIC $(python3 -m pybind11 --includes) \
         -I"${NEUWARE_HOME}/include" engines/backends/magicmind_refitter.cpp \
         -L"${NEUWARE_HOME}/lib64" -lmagicmind_runtime -lcnrt -Wl,-rpath,"${NEUWARE_HOME}/lib64" \
         -o engines/backends/_magicmind_refitter$(python3-config --extension-suffix)
*/
// (-lmagicmind_runtime -lcnrt and -I/-L under $NEUWARE_HOME are what Cambricon's sample build
// scripts use.) Set WEIGHT_REFIT_MM_REFITTER=0 to make the backend ignore a built extension.
//
// Python surface (what magicmind.py calls):
//   RefittableModel(path: str, device_id: int)      deserialize a model built with enable_refit
//     .all_names() -> list[str]                    IRefitter::GetAllNames on a scratch engine
//     .create_engine() -> RefitEngine              IModel::CreateIEngine (serialised by a mutex)
//   RefitEngine
//     .all_names() -> list[str]                    IRefitter::GetAllNames
//     .set_named_weights(name, data: uint8 buffer, dtype: str, shape: list[int])
//     .missing_names() -> list[str]                IRefitter::GetMissingNames
//     .refit()                                     IRefitter::RefitEngine, then frees the tensors
//     .infer(inputs: list[numpy array]) -> list[numpy array]   one context + queue, mutex-guarded
//
// API names confirmed by Cambricon's public samples (sample_refit, weight_refit seed, infer_cpp):
// CreateIModel, IModel::DeserializeFromFile, IModel::CreateIEngine, IEngine::CreateIContext,
// CreateIRefitter(engine), IRefitter::{GetAllNames, GetMissingNames, SetNamedWeights, RefitEngine,
// Destroy}, CreateIRTTensor(DataType, name, Layout, TensorLocation::kHost), IRTTensor::{SetDimensions,
// SetData, GetSize, GetMutableData, GetDimensions().GetElementCount(), Destroy},
// IContext::{CreateInputTensors, CreateOutputTensors, InferOutputShape, Enqueue, Destroy},
// DataType::FLOAT32, Layout::NONE/ARRAY, cnrtSetDevice, cnrtQueueCreate, cnrtQueueSync, cnrtMalloc,
// cnrtFree, cnrtMemcpy(..., CNRT_MEM_TRANS_DIR_HOST2DEV / DEV2HOST), Status::ok().
// NOT confirmed: DataType values other than FLOAT32 (FLOAT16, INT32, INT8 are assumed to exist with
// these names; BFLOAT16 is not assumed), Dims::GetDims, IRTTensor::GetDataType, cnrtQueueDestroy,
// and which names GetAllNames reports for an ONNX-parsed network (the Python side maps manifest
// names to them and falls back to shadow engines when they do not match).
// Thread-safety: the refit sample notes that IModel::CreateIEngine is not thread-safe and gives
// every worker its own context; this binding locks engine creation per model and calls per engine.

#include <cnrt.h>
#include <mm_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using namespace magicmind;

namespace {

void Check(const Status &status, const std::string &what) {
  if (!status.ok()) throw std::runtime_error("magicmind: " + what + " failed");
}

void CheckCnrt(cnrtRet_t ret, const std::string &what) {
  if (ret != cnrtSuccess) throw std::runtime_error("cnrt: " + what + " failed (" + std::to_string(ret) + ")");
}

DataType ToDataType(const std::string &dtype) {
  if (dtype == "float32") return DataType::FLOAT32;
  if (dtype == "float16") return DataType::FLOAT16;  // not confirmed by samples
  if (dtype == "int32") return DataType::INT32;      // not confirmed by samples
  if (dtype == "int8") return DataType::INT8;        // not confirmed by samples
  throw std::invalid_argument("magicmind refitter: unsupported weight dtype " + dtype);
}

Dims ToDims(const std::vector<int64_t> &shape) { return Dims(shape); }

class RefitEngine {
 public:
  RefitEngine(IEngine *engine, int device_id) : engine_(engine), device_id_(device_id) {
    CheckCnrt(cnrtSetDevice(device_id_), "cnrtSetDevice");
    context_ = engine_->CreateIContext();
    if (context_ == nullptr) throw std::runtime_error("magicmind: CreateIContext returned null");
    CheckCnrt(cnrtQueueCreate(&queue_), "cnrtQueueCreate");
  }

  ~RefitEngine() {
    FreePending();
    if (refitter_ != nullptr) refitter_->Destroy();
    if (context_ != nullptr) context_->Destroy();
    if (engine_ != nullptr) engine_->Destroy();
    // cnrtQueueDestroy(queue_): not confirmed by the samples, left to process exit.
  }

  void SetNamedWeights(const std::string &name, py::buffer data, const std::string &dtype,
                       const std::vector<int64_t> &shape) {
    std::lock_guard<std::mutex> lock(mutex_);
    py::buffer_info info = data.request();
    // The refitter reads the host buffer at RefitEngine time: keep a copy alive until then.
    pending_data_.emplace_back(static_cast<const uint8_t *>(info.ptr),
                               static_cast<const uint8_t *>(info.ptr) + info.size * info.itemsize);
    IRTTensor *tensor = CreateIRTTensor(ToDataType(dtype), name.c_str(), Layout::ARRAY, TensorLocation::kHost);
    if (tensor == nullptr) throw std::runtime_error("magicmind: CreateIRTTensor returned null");
    pending_tensors_.push_back(tensor);
    Check(tensor->SetDimensions(ToDims(shape)), "IRTTensor::SetDimensions(" + name + ")");
    Check(tensor->SetData(pending_data_.back().data()), "IRTTensor::SetData(" + name + ")");
    Check(Refitter()->SetNamedWeights(name, tensor), "IRefitter::SetNamedWeights(" + name + ")");
  }

  std::vector<std::string> AllNames() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> names;
    Check(Refitter()->GetAllNames(&names), "IRefitter::GetAllNames");
    return names;
  }

  std::vector<std::string> MissingNames() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> names;
    Check(Refitter()->GetMissingNames(&names), "IRefitter::GetMissingNames");
    return names;
  }

  void Refit() {
    std::lock_guard<std::mutex> lock(mutex_);
    {
      py::gil_scoped_release release;
      Check(Refitter()->RefitEngine(), "IRefitter::RefitEngine");
    }
    FreePending();
  }

  std::vector<py::array> Infer(const std::vector<py::array> &inputs) {
    std::lock_guard<std::mutex> lock(mutex_);
    CheckCnrt(cnrtSetDevice(device_id_), "cnrtSetDevice");
    std::vector<IRTTensor *> in, out;
    Check(context_->CreateInputTensors(&in), "IContext::CreateInputTensors");
    Check(context_->CreateOutputTensors(&out), "IContext::CreateOutputTensors");
    if (in.size() != inputs.size()) throw std::invalid_argument("magicmind: wrong number of inputs");
    std::vector<void *> device_ptrs;
    std::vector<py::array> results;
    try {
      for (size_t i = 0; i < in.size(); ++i) {
        py::array a = py::array::ensure(inputs[i], py::array::c_style);
        std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
        Check(in[i]->SetDimensions(ToDims(shape)), "input SetDimensions");
      }
      Check(context_->InferOutputShape(in, out), "IContext::InferOutputShape");
      for (size_t i = 0; i < in.size(); ++i) {
        void *ptr = nullptr;
        CheckCnrt(cnrtMalloc(&ptr, in[i]->GetSize()), "cnrtMalloc(input)");
        device_ptrs.push_back(ptr);
        Check(in[i]->SetData(ptr), "input SetData");
        py::array a = py::array::ensure(inputs[i], py::array::c_style);
        CheckCnrt(cnrtMemcpy(ptr, const_cast<void *>(a.data()), in[i]->GetSize(), CNRT_MEM_TRANS_DIR_HOST2DEV),
                  "cnrtMemcpy(host->device)");
      }
      for (auto *t : out) {
        void *ptr = nullptr;
        CheckCnrt(cnrtMalloc(&ptr, t->GetSize()), "cnrtMalloc(output)");
        device_ptrs.push_back(ptr);
        Check(t->SetData(ptr), "output SetData");
      }
      {
        py::gil_scoped_release release;
        Check(context_->Enqueue(in, out, queue_), "IContext::Enqueue");
        CheckCnrt(cnrtQueueSync(queue_), "cnrtQueueSync");
      }
      for (auto *t : out) {
        // Outputs are returned as float32: IRTTensor::GetDataType is not confirmed by the samples,
        // and the backend builds with precision_mode force_float32.
        // Dims::GetDims() appears only in a commented-out Cambricon Python sample: not confirmed.
        std::vector<int64_t> shape = t->GetDimensions().GetDims();
        py::array_t<float> host(shape);
        CheckCnrt(cnrtMemcpy(host.mutable_data(), t->GetMutableData(), t->GetSize(), CNRT_MEM_TRANS_DIR_DEV2HOST),
                  "cnrtMemcpy(device->host)");
        results.push_back(host);
      }
    } catch (...) {
      Release(in, out, device_ptrs);
      throw;
    }
    Release(in, out, device_ptrs);
    return results;
  }

 private:
  IRefitter *Refitter() {
    if (refitter_ == nullptr) {
      refitter_ = CreateIRefitter(engine_);
      if (refitter_ == nullptr) throw std::runtime_error("magicmind: CreateIRefitter returned null "
                                                         "(was the model built with enable_refit?)");
    }
    return refitter_;
  }

  void FreePending() {
    for (auto *t : pending_tensors_) t->Destroy();
    pending_tensors_.clear();
    pending_data_.clear();
  }

  static void Release(std::vector<IRTTensor *> &in, std::vector<IRTTensor *> &out, std::vector<void *> &ptrs) {
    for (void *p : ptrs) cnrtFree(p);
    for (auto *t : in) t->Destroy();
    for (auto *t : out) t->Destroy();
  }

  IEngine *engine_ = nullptr;
  IContext *context_ = nullptr;
  IRefitter *refitter_ = nullptr;
  cnrtQueue_t queue_ = nullptr;
  int device_id_ = 0;
  std::mutex mutex_;
  std::vector<IRTTensor *> pending_tensors_;
  std::vector<std::vector<uint8_t>> pending_data_;
};

class RefittableModel {
 public:
  RefittableModel(const std::string &path, int device_id) : device_id_(device_id) {
    CheckCnrt(cnrtSetDevice(device_id_), "cnrtSetDevice");
    model_ = CreateIModel();
    if (model_ == nullptr) throw std::runtime_error("magicmind: CreateIModel returned null");
    Check(model_->DeserializeFromFile(path.c_str()), "IModel::DeserializeFromFile(" + path + ")");
  }

  ~RefittableModel() {
    if (model_ != nullptr) model_->Destroy();
  }

  std::vector<std::string> AllNames() {
    std::unique_ptr<RefitEngine> scratch(CreateEngine());
    return scratch->AllNames();
  }

  RefitEngine *CreateEngine() {
    std::lock_guard<std::mutex> lock(mutex_);  // IModel::CreateIEngine is not thread-safe
    CheckCnrt(cnrtSetDevice(device_id_), "cnrtSetDevice");
    IEngine *engine = model_->CreateIEngine();
    if (engine == nullptr) throw std::runtime_error("magicmind: IModel::CreateIEngine returned null");
    return new RefitEngine(engine, device_id_);
  }

 private:
  IModel *model_ = nullptr;
  int device_id_ = 0;
  std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(_magicmind_refitter, m) {
  m.doc() = "MagicMind IRefitter binding for weight-refit (optional; see the file header)";
  py::class_<RefitEngine>(m, "RefitEngine")
      .def("set_named_weights", &RefitEngine::SetNamedWeights, py::arg("name"), py::arg("data"),
           py::arg("dtype"), py::arg("shape"))
      .def("all_names", &RefitEngine::AllNames)
      .def("missing_names", &RefitEngine::MissingNames)
      .def("refit", &RefitEngine::Refit)
      .def("infer", &RefitEngine::Infer, py::arg("inputs"));
  py::class_<RefittableModel>(m, "RefittableModel")
      .def(py::init<const std::string &, int>(), py::arg("path"), py::arg("device_id"))
      .def("all_names", &RefittableModel::AllNames)
      .def("create_engine", &RefittableModel::CreateEngine, py::return_value_policy::take_ownership);
}
