// generator.cpp: see generator.hpp; each method follows its namesake in cqil/runtime/generator.py.
#include "generator.hpp"

#include <algorithm>
#include <numeric>

#include "error.hpp"

namespace cqil::rt {
namespace {

// Left-pad ragged rows to one width: (ids, mask), padding is id 0 with mask 0.
void left_pad(const std::vector<std::vector<int64_t>>& rows, std::vector<std::vector<int64_t>>& ids,
              std::vector<std::vector<int64_t>>& mask) {
  size_t width = 0;
  for (const auto& r : rows) width = std::max(width, r.size());
  ids.assign(rows.size(), std::vector<int64_t>(width, 0));
  mask.assign(rows.size(), std::vector<int64_t>(width, 0));
  for (size_t b = 0; b < rows.size(); ++b) {
    size_t pad = width - rows[b].size();
    std::copy(rows[b].begin(), rows[b].end(), ids[b].begin() + pad);
    std::fill(mask[b].begin() + pad, mask[b].end(), 1);
  }
}

std::string count(int64_t n) { return std::to_string(n); }

}  // namespace

Generator::Generator(std::shared_ptr<Engine> engine, const Params& params, const std::vector<std::vector<int64_t>>& rows)
    : engine_(std::move(engine)), params_(params) {
  const EngineSpec& spec = engine_->spec();
  vocab_ = spec.vocab_size, max_seq_len_ = spec.max_seq_len;
  batch_ = static_cast<int64_t>(rows.size());
  if (batch_ < 1) fail(CQIL_ERROR_INVALID_ARGUMENT, "input_ids must hold at least one non-empty sequence");
  if (batch_ > spec.max_batch)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "batch of " + count(batch_) + " rows, but the engine's packages take at most " +
                                          count(spec.max_batch) + " (cqil-compile --max-batch)");
  check_rows(rows, "input_ids");
  const Sampling& s = params.sampling;
  if (!(s.temperature >= 0)) fail(CQIL_ERROR_INVALID_ARGUMENT, "temperature must be >= 0, got " + std::to_string(s.temperature));
  if (s.top_k < 0) fail(CQIL_ERROR_INVALID_ARGUMENT, "top_k must be >= 0 (0 = off), got " + count(s.top_k));
  if (!(s.top_p > 0 && s.top_p <= 1)) fail(CQIL_ERROR_INVALID_ARGUMENT, "top_p must be in (0, 1], got " + std::to_string(s.top_p));
  if (params.max_new_tokens < 0)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "max_new_tokens must be >= 1 (0: until max_seq_len), got " + count(params.max_new_tokens));
  for (int64_t id : params.eos)
    if (id < 0 || id >= vocab_) fail(CQIL_ERROR_INVALID_ARGUMENT, "eos id " + count(id) + " is outside the vocabulary [0, " + count(vocab_) + ")");
  std::sort(params_.eos.begin(), params_.eos.end());
  params_.eos.erase(std::unique(params_.eos.begin(), params_.eos.end()), params_.eos.end());
  pad_ = params.has_pad ? params.pad : (params_.eos.empty() ? 0 : params_.eos.front());
  std::vector<std::vector<int64_t>> ids, mask;
  left_pad(rows, ids, mask);
  int64_t width = static_cast<int64_t>(ids[0].size());
  if (width > max_seq_len_)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "prompt of " + count(width) + " tokens is longer than the engine's max_seq_len " + count(max_seq_len_));
  if (params.max_new_tokens && width + params.max_new_tokens > max_seq_len_)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "prompt (" + count(width) + ") + max_new_tokens (" + count(params.max_new_tokens) +
                                          ") exceeds the engine's max_seq_len " + count(max_seq_len_));
  reasons_.assign(batch_, RUNNING);
  output_count_.assign(batch_, 0);
  std::random_device entropy;
  for (int64_t b = 0; b < batch_; ++b)
    rngs_.emplace_back(params.seeded ? params.seed + static_cast<uint64_t>(b) : (uint64_t(entropy()) << 32 | entropy()));
  ids_.assign(batch_, {});
  mask_.assign(batch_, {});
  // the KV buffers are sized once for the whole generation (+1 spare slot inside new_cache)
  cache_ = engine_->new_cache(batch_, params.max_new_tokens ? width + params.max_new_tokens : max_seq_len_);
  feed(ids, mask);
}

void Generator::check_rows(const std::vector<std::vector<int64_t>>& rows, const char* what) const {
  for (size_t b = 0; b < rows.size(); ++b) {
    if (rows[b].empty()) fail(CQIL_ERROR_INVALID_ARGUMENT, std::string(what) + " row " + count(b) + " is empty");
    for (int64_t id : rows[b])
      if (id < 0 || id >= vocab_)
        fail(CQIL_ERROR_INVALID_ARGUMENT, "input ids outside the vocabulary [0, " + count(vocab_) + "): " + count(id));
  }
}

void Generator::feed(const std::vector<std::vector<int64_t>>& ids, const std::vector<std::vector<int64_t>>& mask) {
  int64_t n = static_cast<int64_t>(ids[0].size()), before = cached(), total = before + n;
  if (total > max_seq_len_)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "the sequence would reach " + count(total) + " positions, more than the engine's max_seq_len " +
                                          count(max_seq_len_));
  std::vector<int64_t> flat_ids(batch_ * n), flat_mask(batch_ * total), positions(batch_ * n);
  for (int64_t b = 0; b < batch_; ++b) {
    int64_t real = std::accumulate(mask_[b].begin(), mask_[b].end(), int64_t(0));
    std::copy(mask_[b].begin(), mask_[b].end(), flat_mask.begin() + b * total);
    for (int64_t t = 0; t < n; ++t) {
      real += mask[b][t];
      flat_ids[b * n + t] = ids[b][t];
      flat_mask[b * total + before + t] = mask[b][t];
      positions[b * n + t] = std::max<int64_t>(real - 1, 0);  // cumsum(mask) - 1, as positions_of
    }
  }
  std::vector<float> logits(batch_ * vocab_);
  engine_->forward(flat_ids.data(), flat_mask.data(), positions.data(), batch_, n, total, *cache_, logits.data());
  for (int64_t b = 0; b < batch_; ++b) {
    ids_[b].insert(ids_[b].end(), ids[b].begin(), ids[b].end());
    mask_[b].insert(mask_[b].end(), mask[b].begin(), mask[b].end());
  }
  logits_ = std::move(logits);
  has_logits_ = true;
}

void Generator::flush() {
  if (!has_pending_) return;
  std::vector<std::vector<int64_t>> ids(batch_), mask(batch_);
  for (int64_t b = 0; b < batch_; ++b) ids[b] = {pending_[b]}, mask[b] = {pending_mask_[b]};
  feed(ids, mask);  // throws before anything changes: the token stays pending
  has_pending_ = false;
}

bool Generator::done() const {
  bool all = std::all_of(reasons_.begin(), reasons_.end(), [](FinishReason r) { return r != RUNNING; });
  return all || length() >= max_seq_len_;
}

void Generator::finish(int64_t row, FinishReason reason) {
  if (reasons_[row] == RUNNING) reasons_[row] = reason;
}

void Generator::next_tokens(int64_t* out) {
  if (done()) fail(CQIL_ERROR_STATE, "the generator is done: append tokens to continue");
  flush();
  if (!has_logits_) fail(CQIL_ERROR_STATE, "no logits to choose from after a rewind: append tokens first");
  pending_.assign(batch_, pad_);
  pending_mask_.assign(batch_, 0);
  for (int64_t b = 0; b < batch_; ++b) {
    if (reasons_[b] != RUNNING) continue;
    int64_t token = choose(logits_.data() + b * vocab_, vocab_, params_.sampling, rngs_[b]);
    pending_[b] = token, pending_mask_[b] = 1;
    ++output_count_[b];
    if (std::binary_search(params_.eos.begin(), params_.eos.end(), token)) finish(b, STOP);
    else if (params_.max_new_tokens && output_count_[b] >= params_.max_new_tokens) finish(b, LENGTH);
  }
  has_pending_ = true;
  if (length() >= max_seq_len_)
    for (int64_t b = 0; b < batch_; ++b) finish(b, LENGTH);
  std::copy(pending_.begin(), pending_.end(), out);
}

void Generator::append_tokens(const std::vector<std::vector<int64_t>>& rows) {
  if (static_cast<int64_t>(rows.size()) != batch_)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "append_tokens: got " + count(rows.size()) + " row(s), the generator has " + count(batch_));
  check_rows(rows, "append_tokens");
  std::vector<std::vector<int64_t>> ids, mask;
  left_pad(rows, ids, mask);
  if (has_pending_)
    for (int64_t b = 0; b < batch_; ++b) {
      ids[b].insert(ids[b].begin(), pending_[b]);
      mask[b].insert(mask[b].begin(), pending_mask_[b]);
    }
  feed(ids, mask);
  has_pending_ = false;
  reasons_.assign(batch_, RUNNING);
  output_count_.assign(batch_, 0);
}

void Generator::rewind(int64_t n) {
  if (n < 0 || n > length())
    fail(CQIL_ERROR_INVALID_ARGUMENT, "rewind: n must be in [0, " + count(length()) + "], got " + count(n));
  if (n && has_pending_) has_pending_ = false, --n;
  if (!n) return;
  for (int64_t b = 0; b < batch_; ++b) {
    ids_[b].resize(ids_[b].size() - n);
    mask_[b].resize(mask_[b].size() - n);
  }
  Engine::rewind(*cache_, n);
  has_logits_ = false;
}

std::vector<int64_t> Generator::tokens(int64_t row) const {
  std::vector<int64_t> out;
  for (size_t t = 0; t < ids_[row].size(); ++t)
    if (mask_[row][t]) out.push_back(ids_[row][t]);
  if (has_pending_ && pending_mask_[row]) out.push_back(pending_[row]);
  return out;
}

}  // namespace cqil::rt
