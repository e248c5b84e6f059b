// cqil.hpp: the C++ API of libcqil: RAII classes over the C API (cqil.h), errors as exceptions.
//
//     cqil::Engine engine("engine_dir");                       // cqil::EngineOptions for threads, devices
//     cqil::Generator gen(engine, {{1, 2, 3}, {4, 5}}, cqil::Params().max_new_tokens(16));
//     while (!gen.done()) auto tokens = gen.next_tokens();      // one per row
//     std::vector<int64_t> row0 = gen.tokens(0);               // prompt + new tokens, no padding
//
// Every failing call throws cqil::Error, whose what() is the one-line message and status() the
// C status. Thread safety is the C API's (cqil.h): an Engine may be shared by threads, a
// Generator belongs to one thread at a time. A Generator keeps its engine alive.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cqil.h"

namespace cqil {

class Error : public std::runtime_error {
 public:
  Error(cqil_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  cqil_status status() const { return status_; }

 private:
  cqil_status status_;
};

namespace detail {

inline void check(cqil_status status) {
  if (status != CQIL_OK) throw Error(status, cqil_last_error());
}

// A move-only owner of a C handle and its destroy function.
template <class T, void (*Destroy)(T*)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(T* p) : p_(p) {}
  Handle(Handle&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) reset(std::exchange(o.p_, nullptr));
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(nullptr); }
  T* get() const { return p_; }

 private:
  void reset(T* p) {
    if (p_) Destroy(p_);
    p_ = p;
  }
  T* p_ = nullptr;
};

// Ragged rows -> ids back to back + one length per row, as the C API takes them.
struct Flat {
  std::vector<int64_t> ids;
  std::vector<size_t> lengths;
  explicit Flat(const std::vector<std::vector<int64_t>>& rows) {
    for (const auto& r : rows) ids.insert(ids.end(), r.begin(), r.end()), lengths.push_back(r.size());
  }
};

}  // namespace detail

inline std::string version() { return cqil_version(); }

class EngineOptions {
 public:
  EngineOptions() {
    cqil_engine_options* p = nullptr;
    detail::check(cqil_engine_options_create(&p));
    h_ = decltype(h_)(p);
  }
  EngineOptions& threads(int n) { return detail::check(cqil_engine_options_set_threads(h_.get(), n)), *this; }
  EngineOptions& verify(bool on) { return detail::check(cqil_engine_options_set_verify(h_.get(), on)), *this; }
  EngineOptions& devices(const std::string& d) { return detail::check(cqil_engine_options_set_devices(h_.get(), d.c_str())), *this; }
  EngineOptions& timeout(double s) { return detail::check(cqil_engine_options_set_timeout(h_.get(), s)), *this; }
  const cqil_engine_options* get() const { return h_.get(); }

 private:
  detail::Handle<cqil_engine_options, cqil_engine_options_destroy> h_;
};

class Engine {
 public:
  explicit Engine(const std::string& dir, const EngineOptions& options = EngineOptions()) {
    cqil_engine* p = nullptr;
    detail::check(cqil_engine_create(dir.c_str(), options.get(), &p));
    h_ = decltype(h_)(p);
  }
  int64_t vocab_size() const { return get(cqil_engine_vocab_size); }
  int64_t max_seq_len() const { return get(cqil_engine_max_seq_len); }
  int64_t max_batch() const { return get(cqil_engine_max_batch); }
  int64_t num_ranks() const { return get(cqil_engine_num_ranks); }
  std::vector<int64_t> eos_ids() const {
    size_t n = 0;
    detail::check(cqil_engine_eos_ids(h_.get(), nullptr, 0, &n));
    std::vector<int64_t> ids(n);
    detail::check(cqil_engine_eos_ids(h_.get(), ids.data(), n, &n));
    return ids;
  }
  cqil_engine* get() const { return h_.get(); }

 private:
  int64_t get(cqil_status (*f)(const cqil_engine*, int64_t*)) const {
    int64_t v = 0;
    detail::check(f(h_.get(), &v));
    return v;
  }
  detail::Handle<cqil_engine, cqil_engine_destroy> h_;
};

class Params {
 public:
  Params() {
    cqil_params* p = nullptr;
    detail::check(cqil_params_create(&p));
    h_ = decltype(h_)(p);
  }
  Params& max_new_tokens(int64_t n) { return detail::check(cqil_params_set_max_new_tokens(h_.get(), n)), *this; }
  Params& sampling(double temperature, int64_t top_k = 0, double top_p = 1.0) {
    return detail::check(cqil_params_set_sampling(h_.get(), temperature, top_k, top_p)), *this;
  }
  Params& seed(uint64_t s) { return detail::check(cqil_params_set_seed(h_.get(), s)), *this; }
  Params& eos(const std::vector<int64_t>& ids) { return detail::check(cqil_params_set_eos(h_.get(), ids.data(), ids.size())), *this; }
  Params& pad(int64_t id) { return detail::check(cqil_params_set_pad(h_.get(), id)), *this; }
  const cqil_params* get() const { return h_.get(); }

 private:
  detail::Handle<cqil_params, cqil_params_destroy> h_;
};

class Generator {
 public:
  Generator(Engine& engine, const std::vector<std::vector<int64_t>>& prompts, const Params& params = Params()) {
    detail::Flat flat(prompts);
    cqil_generator* p = nullptr;
    detail::check(cqil_generator_create(engine.get(), params.get(), flat.ids.data(), flat.lengths.data(),
                                        flat.lengths.size(), &p));
    h_ = decltype(h_)(p);
    vocab_ = engine.vocab_size();
  }
  std::vector<int64_t> next_tokens() {
    std::vector<int64_t> tokens(batch());
    detail::check(cqil_generator_next_tokens(h_.get(), tokens.data(), tokens.size()));
    return tokens;
  }
  void append_tokens(const std::vector<std::vector<int64_t>>& rows) {
    detail::Flat flat(rows);
    detail::check(cqil_generator_append_tokens(h_.get(), flat.ids.data(), flat.lengths.data(), flat.lengths.size()));
  }
  void rewind(size_t n) { detail::check(cqil_generator_rewind(h_.get(), n)); }
  bool done() const {
    int d = 0;
    detail::check(cqil_generator_done(h_.get(), &d));
    return d != 0;
  }
  size_t batch() const {
    size_t b = 0;
    detail::check(cqil_generator_batch(h_.get(), &b));
    return b;
  }
  std::vector<float> logits() const {  // [batch, vocab]
    std::vector<float> out(batch() * static_cast<size_t>(vocab_));
    detail::check(cqil_generator_logits(h_.get(), out.data(), out.size()));
    return out;
  }
  std::vector<int64_t> tokens(size_t row) const {
    size_t n = 0;
    detail::check(cqil_generator_tokens(h_.get(), row, nullptr, 0, &n));
    std::vector<int64_t> out(n);
    detail::check(cqil_generator_tokens(h_.get(), row, out.data(), n, &n));
    return out;
  }
  int finish_reason(size_t row) const {  // 0 running, 1 eos, 2 length
    int r = 0;
    detail::check(cqil_generator_finish_reason(h_.get(), row, &r));
    return r;
  }

 private:
  detail::Handle<cqil_generator, cqil_generator_destroy> h_;
  int64_t vocab_ = 0;
};

}  // namespace cqil
