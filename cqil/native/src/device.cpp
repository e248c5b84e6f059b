// device.cpp: rank devices; the CUDA parts compile only with CQIL_WITH_CUDA (see device.hpp).
#include "device.hpp"

#include <sstream>

#include "error.hpp"

#if CQIL_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace cqil::rt {

#if CQIL_WITH_CUDA
struct RankDevice::Cuda {
  c10::cuda::CUDAStream stream;
  at::cuda::CUDAEvent events[2];  // used in turn: one is re-recorded only after the next barrier
  int turn = 0;
  explicit Cuda(const at::Device& d) : stream(c10::cuda::getStreamFromPool(false, d.index())) {}
};
#else
struct RankDevice::Cuda {};
#endif

RankDevice::RankDevice(at::Device device) : device_(device) {
#if CQIL_WITH_CUDA
  if (device_.is_cuda()) cuda_ = std::make_unique<Cuda>(device_);
#endif
}

RankDevice::~RankDevice() = default;

void RankDevice::enter() {
#if CQIL_WITH_CUDA
  if (cuda_) {
    c10::cuda::set_device(device_.index());
    c10::cuda::setCurrentCUDAStream(cuda_->stream);
  }
#endif
}

void* RankDevice::stream_handle() const {
#if CQIL_WITH_CUDA
  if (cuda_) return reinterpret_cast<void*>(cuda_->stream.stream());
#endif
  return nullptr;
}

void RankDevice::synchronize() {
#if CQIL_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_.index());
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();  // where the caller allocated
    cuda_->stream.synchronize();
  }
#endif
}

void RankDevice::finish() {
#if CQIL_WITH_CUDA
  if (cuda_) cuda_->stream.synchronize();
#endif
}

int RankDevice::mark_sent() {
#if CQIL_WITH_CUDA
  if (cuda_) {
    int slot = cuda_->turn;
    cuda_->turn ^= 1;
    cuda_->events[slot].record(cuda_->stream);
    return slot;
  }
#endif
  return -1;
}

at::Tensor RankDevice::receive(const Sent& value, const RankDevice& sender) {
#if CQIL_WITH_CUDA
  if (cuda_ && &sender != this) {
    sender.cuda_->events[value.event].block(cuda_->stream);  // our stream waits for the producer
    const at::Tensor& t = value.tensor;
    if (t.device() == device_) {
      // the producer's allocator must not reuse the memory before our stream has read it
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), cuda_->stream);
      return t;
    }
    // copies between devices run on the source device's current stream after a two-way barrier
    // with ours; the source stream must hold the memory until the copy is done
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream(t.device().index()));
    return t.to(device_, /*non_blocking=*/true);
  }
#else
  (void)sender;
#endif
  return value.tensor;
}

std::vector<at::Device> parse_devices(const std::string& devices, const std::string& compiled_for, int world_size) {
  std::vector<std::string> items;
  std::stringstream ss(devices.empty() ? compiled_for : devices);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    items.push_back(item);
  }
  if (items.size() != 1 && static_cast<int>(items.size()) != world_size)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: " + std::to_string(items.size()) + " given for " +
                                          std::to_string(world_size) + " ranks: give one device per rank, or one for all");
  std::vector<at::Device> out;
  for (int r = 0; r < world_size; ++r) {
    const std::string& d = items.size() == 1 ? items[0] : items[r];
    bool cuda = d == "cuda" || d.rfind("cuda:", 0) == 0;
    if (d != "cpu" && !cuda) fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: '" + d + "' is not a device: use cpu, cuda or cuda:N");
    if ((d == "cpu") != (compiled_for == "cpu"))
      fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: rank " + std::to_string(r) + " asks for " + d + ", but the engine's packages "
                                            "were compiled for " + compiled_for + " (cqil-compile --devices " +
                                            (cuda ? "cuda" : "cpu") + " builds the other kind)");
    if (!cuda) {
      out.emplace_back(at::kCPU);
      continue;
    }
#if CQIL_WITH_CUDA
    int count = c10::cuda::device_count();
    if (count == 0) fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: rank " + std::to_string(r) + " asks for " + d + ", but no GPU is visible");
    int index = r % count;
    if (d.size() > 5) {
      try {
        index = std::stoi(d.substr(5));
      } catch (const std::exception&) {
        fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: '" + d + "' is not a device: use cpu, cuda or cuda:N");
      }
      if (index < 0 || index >= count)
        fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: rank " + std::to_string(r) + " asks for " + d + ", but only " +
                                              std::to_string(count) + " CUDA device(s) are visible");
    }
    out.emplace_back(at::kCUDA, static_cast<c10::DeviceIndex>(index));
#else
    fail(CQIL_ERROR_INVALID_ARGUMENT, "devices: " + d + " asked for, but this libcqil was built against a torch without "
                                          "CUDA; rebuild it (cqil-build-native) in a CUDA torch environment");
#endif
  }
  return out;
}

std::vector<at::Tensor> receive_all(const std::vector<Sent>& values, StepKind kind, int rank,
                                    const std::vector<std::unique_ptr<RankDevice>>& devices) {
  RankDevice& me = *devices[rank];
  if (kind == StepKind::Broadcast) return {me.receive(values[0], *devices[0])};
  std::vector<at::Tensor> local;
  for (size_t j = 0; j < values.size(); ++j) local.push_back(me.receive(values[j], *devices[j]));
  if (kind == StepKind::AllGather) return local;
  at::Tensor total = local[0];
  for (size_t j = 1; j < local.size(); ++j) total = total + local[j];  // rank order, on every rank alike
  return {total};
}

}  // namespace cqil::rt
