// collectives.cpp: the barrier, the rank-ordered combine, abort and timeout (see collectives.hpp).
#include "collectives.hpp"

#include <chrono>

#include "error.hpp"

namespace cqil::rt {
namespace {

const char* kind_name(StepKind kind) {
  switch (kind) {
    case StepKind::Broadcast: return "broadcast";
    case StepKind::AllGather: return "all_gather";
    case StepKind::AllReduce: return "all_reduce";
    default: return "segment";
  }
}

}  // namespace

std::vector<Sent> Collectives::run(int rank, StepKind kind, Sent value) {
  if (p_ == 1) return {value};
  std::unique_lock<std::mutex> lock(m_);
  if (aborted_) throw Abandoned("rank " + std::to_string(rank) + ": " + kind_name(kind) + " abandoned: rank " +
                                std::to_string(failed_) + " failed");
  if (arrived_.empty()) arrived_.assign(p_, false);
  values_[rank] = std::move(value);
  arrived_[rank] = true;
  uint64_t generation = generation_;
  if (++count_ == p_) {
    combine(kind);
    count_ = 0;
    arrived_.assign(p_, false);
    ++generation_;
    cv_.notify_all();
    return result_;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
  bool done = cv_.wait_until(lock, deadline, [&] { return generation_ != generation || aborted_; });
  if (generation_ != generation) return result_;  // complete, even if a later abort came
  if (aborted_)
    throw Abandoned("rank " + std::to_string(rank) + ": " + kind_name(kind) + " abandoned: rank " +
                    std::to_string(failed_) + " failed");
  (void)done;
  std::string missing;
  for (int r = 0; r < p_; ++r)
    if (!arrived_[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
  aborted_ = true;  // nobody may complete this collective any more
  cv_.notify_all();
  throw Abandoned("rank " + std::to_string(rank) + ": " + kind_name(kind) + " timed out after " +
                  std::to_string(static_cast<int>(timeout_s_)) + " s waiting for rank(s) " + missing + ", which hang");
}

void Collectives::combine(StepKind kind) {
  // runs under the lock, in the last rank to arrive; the values are read-only from here on
  if (kind == StepKind::Broadcast) {
    result_ = {values_[0]};
  } else if (kind == StepKind::AllGather || share_) {
    result_ = values_;
  } else {
    at::Tensor total = values_[0].tensor;
    for (int r = 1; r < p_; ++r) total = total + values_[r].tensor;  // rank order: the reference's bits
    result_ = {Sent{total}};
  }
  for (auto& v : values_) v = Sent();
}

void Collectives::abort(int failed_rank) {
  std::lock_guard<std::mutex> lock(m_);
  if (failed_ < 0) failed_ = failed_rank;
  aborted_ = true;
  cv_.notify_all();
}

void Collectives::reset() {
  std::lock_guard<std::mutex> lock(m_);
  aborted_ = false;
  failed_ = -1;
  count_ = 0;
  arrived_.assign(p_, false);
  for (auto& v : values_) v = Sent();
  result_.clear();
}

}  // namespace cqil::rt
