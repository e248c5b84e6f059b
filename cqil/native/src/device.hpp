// device.hpp: which device each rank runs on, and what CUDA needs per rank (a stream, events).
//
// Devices: "" (the device the packages were compiled for), "cpu", "cuda" (rank r on GPU r mod
// count: fewer GPUs than ranks share one, a stream each), or one per rank "cuda:0,cuda:1".
// Packages run only on the device type they were compiled for.
//
// CUDA (built when the torch libcqil compiles against has CUDA, CQIL_WITH_CUDA): each rank thread
// makes its device and its own stream current; packages run on that stream; KV buffers and
// activations stay on the device; collectives order producer and consumer with events and move
// values device to device (as cqil's Python DeviceCollectives). Written against the documented
// c10/ATen CUDA API and not yet run: no GPU was available where it was written (docs/cpp.md).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "collectives.hpp"

namespace cqil::rt {

class RankDevice {
 public:
  explicit RankDevice(at::Device device);
  ~RankDevice();

  const at::Device& device() const { return device_; }
  bool cuda() const { return device_.is_cuda(); }
  void enter();                // in the rank's thread: its device and stream become current
  void* stream_handle() const; // for AOTIModelPackageLoader::run (nullptr on CPU)
  void synchronize();          // wait for the caller's and the rank's streams (after allocating)
  void finish();               // wait for the rank's stream (the end of a step)

  // Collectives: mark a value this rank sends as ready (an event slot), and bring a value another
  // rank sent onto this rank's device and stream, in order after its producer.
  int mark_sent();
  at::Tensor receive(const Sent& value, const RankDevice& sender);

 private:
  at::Device device_;
  struct Cuda;  // stream and events (device.cpp)
  std::unique_ptr<Cuda> cuda_;
};

// One device per rank, from the option string and the packages' device (one line on a refusal).
std::vector<at::Device> parse_devices(const std::string& devices, const std::string& compiled_for, int world_size);

// Every rank's value of a collective, on this rank's device: all_reduce summed in rank order.
std::vector<at::Tensor> receive_all(const std::vector<Sent>& values, StepKind kind, int rank,
                                    const std::vector<std::unique_ptr<RankDevice>>& devices);

}  // namespace cqil::rt
