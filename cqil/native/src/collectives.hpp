// collectives.hpp: collectives between the rank threads of one engine.
//
// Every rank deposits its value and waits at one barrier; the last rank to arrive combines the
// values before any is released: an all_reduce adds them in rank order ((v0 + v1) + v2 ...), as
// cqil.program.rank_ordered_sum does, so the sums are the bits of the Python runtime's. Results are
// shared, read-only tensors: a second barrier is not needed, because the next combine (which
// replaces them) runs only once every rank has arrived at the next collective, i.e. has read this one.
// A failing rank aborts the barrier, so that the others stop at once (no hang); a rank that does not
// arrive within the timeout is named.
//
// On CUDA each value lives on its rank's device and stream: the combine waits for each producer's
// stream (an event), adds on the combining rank's device, and every rank's stream waits for the
// result before reading it (cuda.cpp); values are never copied through the host.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "spec.hpp"

namespace cqil::rt {

// Thrown in a rank whose collective was abandoned because another rank failed: a victim, not a cause.
struct Abandoned : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A value sent to a collective; `event`: the sender's CUDA event slot that marks it ready (-1 on CPU).
struct Sent {
  at::Tensor tensor;
  int event = -1;
};

class Collectives {
 public:
  // share_values: every rank gets every rank's value and combines on its own device (CUDA);
  // otherwise the last rank to arrive combines for all (CPU).
  Collectives(int world_size, double timeout_s, bool share_values = false)
      : p_(world_size), timeout_s_(timeout_s), share_(share_values), values_(world_size) {}

  // Take part in collective `kind` with `value`. Returns the result for this rank: one value
  // (broadcast, all_reduce) or one per rank (all_gather); with share_values, the values as sent.
  std::vector<Sent> run(int rank, StepKind kind, Sent value);

  void abort(int failed_rank);  // wake every waiting rank: `failed_rank` failed (the first one is kept)
  void reset();                 // before the next step, after a failed one

 private:
  void combine(StepKind kind);

  int p_;
  double timeout_s_;
  bool share_;
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<Sent> values_, result_;
  std::vector<bool> arrived_;
  int count_ = 0;
  uint64_t generation_ = 0;
  int failed_ = -1;
  bool aborted_ = false;
};

}  // namespace cqil::rt
