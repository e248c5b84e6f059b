// engine.hpp: an opened engine directory: every rank's packages, threads and collectives.
//
// One persistent std::thread per rank (its OpenMP team then persists between steps), each with its
// intra-op thread count, c10::InferenceMode, and, on CUDA, its device and stream. A step: the caller
// publishes the inputs, every rank runs its program (segments and collectives, from the manifest),
// the caller waits for all and copies rank 0's logits of the last position out. The first rank to
// fail aborts the collectives (the others stop at once) and is named; a rank that hangs inside a
// segment is named after the timeout, and the engine then refuses further work.
//
// KV cache: one KVCache per generator, holding per rank and layer a key and a value buffer
// [batch, kv_heads, capacity, head_dim] that the packages write in place (their buffer form); it is
// allocated once per generation (capacity = the generation's longest sequence + 1 spare slot, which
// the packages require) and reallocated, keeping its contents, only if a sequence outgrows it.
//
// This header keeps libtorch out of the files that include it (they compile in a second, not 20).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "spec.hpp"

namespace cqil::rt {

struct Options {
  int threads = 0;         // intra-op threads in all; 0: every core
  bool verify = true;      // sha256 of every file at open
  std::string devices;     // "", "cpu", "cuda", "cuda:0,cuda:1"
  double timeout_s = 600;  // how long a collective waits for a rank
};

struct KVCache;  // engine.cpp

class Engine {
 public:
  Engine(const std::string& dir, const Options& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineSpec& spec() const;

  // Empty caches of every rank for `batch` rows and at least `positions` positions.
  std::shared_ptr<KVCache> new_cache(int64_t batch, int64_t positions) const;
  static int64_t cache_length(const KVCache& cache);
  static void rewind(KVCache& cache, int64_t n);  // forget the last n positions

  // One step of every rank. ids and positions int64 [batch, seq]; mask int64 [batch, total] with
  // total = cache length + seq. Writes rank 0's logits after the last position, float32
  // [batch, vocab], into last_logits, and extends the cache by seq positions. Serialised: any thread.
  void forward(const int64_t* ids, const int64_t* mask, const int64_t* positions, int64_t batch, int64_t seq,
               int64_t total, KVCache& cache, float* last_logits);

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;  // shared with the rank threads, which may outlive a broken engine
};

}  // namespace cqil::rt
