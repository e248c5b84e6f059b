// c_api.cpp: cqil.h over the C++ runtime: handles, statuses and the per-thread error line.
//
// Every entry point runs inside `guarded`, which turns any exception into a status and a one-line
// message: nothing thrown crosses the C boundary, and no bad input aborts the process.
#include "cqil.h"

#include <torch/version.h>

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "engine.hpp"
#include "error.hpp"
#include "generator.hpp"

struct cqil_engine_options {
  cqil::rt::Options options;
};
struct cqil_engine {
  std::shared_ptr<cqil::rt::Engine> engine;
};
struct cqil_params {
  cqil::rt::Params params;
};
struct cqil_generator {
  std::unique_ptr<cqil::rt::Generator> generator;
};

namespace {

thread_local std::string last_error;

template <class F>
cqil_status guarded(F&& body) {
  try {
    body();
    return CQIL_OK;
  } catch (const cqil::rt::Error& e) {
    last_error = cqil::rt::first_line(e.what(), 1000);
    return e.status();
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
  } catch (const std::exception& e) {
    last_error = "internal error: " + cqil::rt::first_line(e.what());
  } catch (...) {
    last_error = "internal error: unknown exception";
  }
  return CQIL_ERROR_INTERNAL;
}

template <class T>
T& need(T* handle, const char* what) {
  if (!handle) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, std::string(what) + " is NULL");
  return *handle;
}

void need_out(const void* out, const char* what) {
  if (!out) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, std::string(what) + " (an output pointer) is NULL");
}

// Rows of a batch given as ids back to back and one length per row.
std::vector<std::vector<int64_t>> rows_of(const int64_t* ids, const size_t* lengths, size_t batch) {
  if (batch == 0) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "batch must be >= 1");
  if (!lengths) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "lengths is NULL");
  std::vector<std::vector<int64_t>> rows(batch);
  size_t offset = 0;
  for (size_t b = 0; b < batch; ++b) {
    if (lengths[b] == 0) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "row " + std::to_string(b) + " is empty");
    if (!ids) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "ids is NULL");
    rows[b].assign(ids + offset, ids + offset + lengths[b]);
    offset += lengths[b];
  }
  return rows;
}

}  // namespace

extern "C" {

const char* cqil_last_error(void) { return last_error.c_str(); }

const char* cqil_version(void) { return "0.1.0 (torch " TORCH_VERSION ")"; }

cqil_status cqil_engine_options_create(cqil_engine_options** out) {
  return guarded([&] {
    need_out(out, "out");
    *out = new cqil_engine_options();
  });
}

void cqil_engine_options_destroy(cqil_engine_options* options) { delete options; }

cqil_status cqil_engine_options_set_threads(cqil_engine_options* options, int threads) {
  return guarded([&] {
    if (threads < 0) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "threads must be >= 0 (0: every core), got " + std::to_string(threads));
    need(options, "options").options.threads = threads;
  });
}

cqil_status cqil_engine_options_set_verify(cqil_engine_options* options, int verify) {
  return guarded([&] { need(options, "options").options.verify = verify != 0; });
}

cqil_status cqil_engine_options_set_devices(cqil_engine_options* options, const char* devices) {
  return guarded([&] { need(options, "options").options.devices = devices ? devices : ""; });
}

cqil_status cqil_engine_options_set_timeout(cqil_engine_options* options, double seconds) {
  return guarded([&] {
    if (!(seconds > 0)) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "timeout must be > 0 seconds");
    need(options, "options").options.timeout_s = seconds;
  });
}

cqil_status cqil_engine_create(const char* engine_dir, const cqil_engine_options* options, cqil_engine** out) {
  return guarded([&] {
    need_out(out, "out");
    if (!engine_dir) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "engine_dir is NULL");
    auto engine = std::make_shared<cqil::rt::Engine>(engine_dir, options ? options->options : cqil::rt::Options());
    *out = new cqil_engine{std::move(engine)};
  });
}

void cqil_engine_destroy(cqil_engine* engine) { delete engine; }

cqil_status cqil_engine_vocab_size(const cqil_engine* engine, int64_t* out) {
  return guarded([&] {
    need_out(out, "out");
    *out = need(engine, "engine").engine->spec().vocab_size;
  });
}

cqil_status cqil_engine_max_seq_len(const cqil_engine* engine, int64_t* out) {
  return guarded([&] {
    need_out(out, "out");
    *out = need(engine, "engine").engine->spec().max_seq_len;
  });
}

cqil_status cqil_engine_max_batch(const cqil_engine* engine, int64_t* out) {
  return guarded([&] {
    need_out(out, "out");
    *out = need(engine, "engine").engine->spec().max_batch;
  });
}

cqil_status cqil_engine_num_ranks(const cqil_engine* engine, int64_t* out) {
  return guarded([&] {
    need_out(out, "out");
    *out = static_cast<int64_t>(need(engine, "engine").engine->spec().ranks.size());
  });
}

cqil_status cqil_engine_eos_ids(const cqil_engine* engine, int64_t* out, size_t capacity, size_t* count) {
  return guarded([&] {
    need_out(count, "count");
    const auto& eos = need(engine, "engine").engine->spec().eos_ids;
    if (capacity && !out) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "out is NULL");
    for (size_t i = 0; i < eos.size() && i < capacity; ++i) out[i] = eos[i];
    *count = eos.size();
  });
}

cqil_status cqil_params_create(cqil_params** out) {
  return guarded([&] {
    need_out(out, "out");
    *out = new cqil_params();
  });
}

void cqil_params_destroy(cqil_params* params) { delete params; }

cqil_status cqil_params_set_max_new_tokens(cqil_params* params, int64_t max_new_tokens) {
  return guarded([&] {
    if (max_new_tokens < 0)
      cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "max_new_tokens must be >= 1 (0: until max_seq_len), got " + std::to_string(max_new_tokens));
    need(params, "params").params.max_new_tokens = max_new_tokens;
  });
}

cqil_status cqil_params_set_sampling(cqil_params* params, double temperature, int64_t top_k, double top_p) {
  return guarded([&] {
    if (!(temperature >= 0)) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "temperature must be >= 0, got " + std::to_string(temperature));
    if (top_k < 0) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
    if (!(top_p > 0 && top_p <= 1)) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "top_p must be in (0, 1], got " + std::to_string(top_p));
    need(params, "params").params.sampling = {temperature, top_k, top_p};
  });
}

cqil_status cqil_params_set_seed(cqil_params* params, uint64_t seed) {
  return guarded([&] {
    auto& p = need(params, "params").params;
    p.seeded = true, p.seed = seed;
  });
}

cqil_status cqil_params_set_eos(cqil_params* params, const int64_t* ids, size_t count) {
  return guarded([&] {
    auto& p = need(params, "params").params;
    if (count && !ids) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "ids is NULL");
    p.eos.assign(ids, ids + count);
  });
}

cqil_status cqil_params_set_pad(cqil_params* params, int64_t pad_id) {
  return guarded([&] {
    if (pad_id < 0) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "pad id must be >= 0, got " + std::to_string(pad_id));
    auto& p = need(params, "params").params;
    p.has_pad = true, p.pad = pad_id;
  });
}

cqil_status cqil_generator_create(cqil_engine* engine, const cqil_params* params, const int64_t* ids,
                                  const size_t* lengths, size_t batch, cqil_generator** out) {
  return guarded([&] {
    need_out(out, "out");
    auto& e = need(engine, "engine");
    auto rows = rows_of(ids, lengths, batch);
    auto gen = std::make_unique<cqil::rt::Generator>(e.engine, params ? params->params : cqil::rt::Params(), rows);
    *out = new cqil_generator{std::move(gen)};
  });
}

void cqil_generator_destroy(cqil_generator* generator) { delete generator; }

cqil_status cqil_generator_next_tokens(cqil_generator* generator, int64_t* tokens, size_t capacity) {
  return guarded([&] {
    auto& g = *need(generator, "generator").generator;
    need_out(tokens, "tokens");
    if (capacity < static_cast<size_t>(g.batch()))
      cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "tokens holds " + std::to_string(capacity) + ", the batch has " + std::to_string(g.batch()));
    g.next_tokens(tokens);
  });
}

cqil_status cqil_generator_append_tokens(cqil_generator* generator, const int64_t* ids, const size_t* lengths, size_t batch) {
  return guarded([&] { need(generator, "generator").generator->append_tokens(rows_of(ids, lengths, batch)); });
}

cqil_status cqil_generator_rewind(cqil_generator* generator, size_t n) {
  return guarded([&] { need(generator, "generator").generator->rewind(static_cast<int64_t>(n)); });
}

cqil_status cqil_generator_done(const cqil_generator* generator, int* done) {
  return guarded([&] {
    need_out(done, "done");
    *done = need(generator, "generator").generator->done() ? 1 : 0;
  });
}

cqil_status cqil_generator_batch(const cqil_generator* generator, size_t* batch) {
  return guarded([&] {
    need_out(batch, "batch");
    *batch = static_cast<size_t>(need(generator, "generator").generator->batch());
  });
}

cqil_status cqil_generator_logits(const cqil_generator* generator, float* out, size_t capacity) {
  return guarded([&] {
    const auto& g = *need(generator, "generator").generator;
    need_out(out, "out");
    if (!g.has_logits()) cqil::rt::fail(CQIL_ERROR_STATE, "no logits after a rewind: append tokens first");
    const auto& logits = g.logits();
    if (capacity < logits.size())
      cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "out holds " + std::to_string(capacity) + " floats, the logits need " + std::to_string(logits.size()));
    std::memcpy(out, logits.data(), logits.size() * sizeof(float));
  });
}

cqil_status cqil_generator_tokens(const cqil_generator* generator, size_t row, int64_t* out, size_t capacity, size_t* count) {
  return guarded([&] {
    const auto& g = *need(generator, "generator").generator;
    need_out(count, "count");
    if (row >= static_cast<size_t>(g.batch()))
      cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "row " + std::to_string(row) + " outside the batch of " + std::to_string(g.batch()));
    auto tokens = g.tokens(static_cast<int64_t>(row));
    if (capacity && !out) cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "out is NULL");
    std::copy(tokens.begin(), tokens.begin() + std::min(capacity, tokens.size()), out);
    *count = tokens.size();
  });
}

cqil_status cqil_generator_finish_reason(const cqil_generator* generator, size_t row, int* reason) {
  return guarded([&] {
    const auto& g = *need(generator, "generator").generator;
    need_out(reason, "reason");
    if (row >= static_cast<size_t>(g.batch()))
      cqil::rt::fail(CQIL_ERROR_INVALID_ARGUMENT, "row " + std::to_string(row) + " outside the batch of " + std::to_string(g.batch()));
    *reason = g.finish_reason(static_cast<int64_t>(row));
  });
}

}  // extern "C"
