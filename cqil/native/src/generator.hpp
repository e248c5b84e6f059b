// generator.hpp: the decode state of one batch, mirroring cqil.runtime.generator.Generator.
//
// The batch shares one sequence axis. Ragged prompts (and ragged appends) are left-padded with mask
// zeros; position ids count real tokens only, so padding never shifts a row's positions. A chosen
// token is fed to the model lazily, by the next next_tokens() or append_tokens(), so the last token
// of a generation costs no forward. A row that emits an eos id is finished: it keeps receiving the
// pad id, fed with mask 0. append_tokens() starts a new turn: every row runs again and counts
// max_new_tokens anew. Not here (Python only): penalties, min_p, logprobs, stop strings, and
// continuous batching (merge/select).
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "engine.hpp"
#include "sampling.hpp"

namespace cqil::rt {

struct Params {
  int64_t max_new_tokens = 0;  // per row and turn; 0: until max_seq_len
  Sampling sampling;
  bool seeded = false;
  uint64_t seed = 0;            // row b draws from seed + b
  std::vector<int64_t> eos;
  bool has_pad = false;
  int64_t pad = 0;              // default: min(eos), or 0
};

enum FinishReason { RUNNING = 0, STOP = 1, LENGTH = 2 };

class Generator {
 public:
  // rows: the prompts, each non-empty, ids in [0, vocab).
  Generator(std::shared_ptr<Engine> engine, const Params& params, const std::vector<std::vector<int64_t>>& rows);

  void next_tokens(int64_t* out);  // [batch]
  void append_tokens(const std::vector<std::vector<int64_t>>& rows);
  void rewind(int64_t n);

  bool done() const;
  int64_t batch() const { return batch_; }
  int64_t length() const { return cached() + (has_pending_ ? 1 : 0); }
  int64_t cached() const { return static_cast<int64_t>(mask_.empty() ? 0 : mask_[0].size()); }
  bool has_logits() const { return has_logits_; }
  const std::vector<float>& logits() const { return logits_; }  // [batch, vocab]
  std::vector<int64_t> tokens(int64_t row) const;
  FinishReason finish_reason(int64_t row) const { return reasons_[row]; }

 private:
  void check_rows(const std::vector<std::vector<int64_t>>& rows, const char* what) const;
  void feed(const std::vector<std::vector<int64_t>>& ids, const std::vector<std::vector<int64_t>>& mask);
  void flush();
  void finish(int64_t row, FinishReason reason);

  std::shared_ptr<Engine> engine_;  // keeps the engine open while this generator lives
  Params params_;
  int64_t batch_, vocab_, max_seq_len_, pad_;
  std::shared_ptr<KVCache> cache_;
  std::vector<std::vector<int64_t>> ids_, mask_;  // every fed position, padding included
  std::vector<int64_t> pending_, pending_mask_;   // chosen tokens not yet fed
  bool has_pending_ = false, has_logits_ = false;
  std::vector<float> logits_;
  std::vector<FinishReason> reasons_;
  std::vector<int64_t> output_count_;             // tokens chosen per row in this turn
  std::vector<std::mt19937_64> rngs_;
};

}  // namespace cqil::rt
