// engine.cpp: loading the ranks, their threads, one step (see engine.hpp).
#include "engine.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <system_error>
#include <thread>

#include "collectives.hpp"
#include "device.hpp"
#include "error.hpp"

namespace cqil::rt {

struct KVCache {
  int64_t batch = 0, length = 0, capacity = 0;
  std::vector<std::vector<at::Tensor>> buffers;  // [rank][2 * i + kind]: kv_layers[i]'s key, value
};

namespace {

using Loader = torch::inductor::AOTIModelPackageLoader;

struct SegmentRun {
  std::string file;
  std::unique_ptr<Loader> loader;
  std::vector<int> inputs;   // >= 0: a value slot; < 0: the KV buffer -1 - index
  std::vector<int> outputs;  // value slots
  int threads = 1;
};

struct StepRun {
  StepKind kind;
  int segment = -1, input = -1;  // input: -1 when this rank sends nothing (a broadcast's receivers)
  std::vector<int> outputs;
};

struct Rank {
  int rank = 0;
  std::vector<SegmentRun> segments;
  std::vector<StepRun> program;
  int slots = 3, logits = -1;  // slots 0..2: input_ids, attention_mask, position_ids
  int threads = 1;
  std::thread thread;
  std::string error;
  bool victim = false, finished = true;
};

at::ScalarType scalar_type(const std::string& dtype) {
  return dtype == "float16" ? at::kHalf : dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
}

std::string rank_prefix(int rank, const std::string& message) {
  std::string prefix = "rank " + std::to_string(rank);
  return message.rfind(prefix, 0) == 0 ? message : prefix + ": " + message;
}

}  // namespace

struct Engine::Impl {
  EngineSpec spec;
  Options options;
  std::vector<std::unique_ptr<Rank>> ranks;
  std::vector<std::unique_ptr<RankDevice>> devices;
  std::unique_ptr<Collectives> collectives;
  std::mutex step_mutex;  // one forward pass at a time
  std::string broken;     // why the engine refuses work (a rank hangs)
  // the step being run, published under m
  std::mutex m;
  std::condition_variable go, finished;
  uint64_t generation = 0;
  int done = 0;
  bool stopping = false;
  std::vector<at::Tensor> inputs;  // ids, mask, positions (host)
  KVCache* cache = nullptr;
  at::Tensor logits;

  void load_rank(const RankSpec& rs, int total_threads);
  void rank_main(Rank& r);
  void run_program(Rank& r, int& current_threads);
};

void Engine::Impl::load_rank(const RankSpec& rs, int total_threads) {
  auto r = std::make_unique<Rank>();
  r->rank = rs.rank;
  int p = static_cast<int>(spec.ranks.size());
  r->threads = std::max(1, total_threads / p);
  std::map<std::string, int> slot = {{"input_ids", 0}, {"attention_mask", 1}, {"position_ids", 2}};
  for (size_t i = 0; i < rs.kv_layers.size(); ++i) {
    std::string layer = std::to_string(rs.kv_layers[i]);
    slot["past_key_values." + layer + ".key"] = -1 - static_cast<int>(2 * i);
    slot["past_key_values." + layer + ".value"] = -2 - static_cast<int>(2 * i);
  }
  auto read = [&](const std::string& name, const std::string& where) {
    auto it = slot.find(name);
    if (it == slot.end())
      fail(CQIL_ERROR_ENGINE, "engine: " + where + " needs tensor " + name + ", which no earlier step produces");
    return it->second;
  };
  auto write = [&](const std::string& name) {
    auto [it, added] = slot.emplace(name, r->slots);
    if (added) ++r->slots;
    return it->second;
  };
  const at::Device& device = devices[rs.rank]->device();
  for (const SegmentSpec& ss : rs.segments) {
    SegmentRun seg;
    seg.file = ss.file;
    seg.threads = ss.outer ? total_threads : r->threads;
    try {
      // run_single_threaded: only this rank's thread ever calls the loader, so it needs no locks
      seg.loader = std::make_unique<Loader>(spec.dir + "/" + ss.file, "model", /*run_single_threaded=*/true,
                                            /*num_runners=*/1, device.is_cuda() ? device.index() : -1);
    } catch (const std::exception& e) {
      fail(CQIL_ERROR_ENGINE, "engine: cannot load " + ss.file + ": " + first_line(e.what()));
    }
    auto meta = seg.loader->get_metadata();
    std::string kind = meta.count("AOTI_DEVICE_KEY") ? meta["AOTI_DEVICE_KEY"] : "";
    if (kind != spec.device)
      fail(CQIL_ERROR_ENGINE, "engine: " + ss.file + " was compiled for '" + kind + "', the manifest says " + spec.device);
    r->segments.push_back(std::move(seg));
  }
  for (const Step& step : rs.program) {
    StepRun run{step.kind};
    std::string where = "rank " + std::to_string(rs.rank);
    if (step.kind == StepKind::Segment) {
      const SegmentSpec& ss = rs.segments[step.segment];
      run.segment = step.segment;
      for (const auto& name : ss.inputs) r->segments[step.segment].inputs.push_back(read(name, where + " " + ss.name));
      for (const auto& name : ss.outputs) r->segments[step.segment].outputs.push_back(write(name));
    } else {
      bool sends = step.kind != StepKind::Broadcast || rs.rank == 0;
      if (sends) run.input = read(step.input, where + " collective");
      for (const auto& name : step.outputs) run.outputs.push_back(write(name));
    }
    r->program.push_back(std::move(run));
  }
  if (rs.rank == 0) {
    if (!slot.count("logits") || slot["logits"] < 0) fail(CQIL_ERROR_ENGINE, "engine: rank 0 never produces logits");
    r->logits = slot["logits"];
  }
  ranks.push_back(std::move(r));
}

void Engine::Impl::rank_main(Rank& r) {
  // ATen's first parallel call in a thread applies the process-wide count: initialise it first,
  // then set this rank's (it is per thread: the OpenMP ICV and MKL's local count)
  at::internal::lazy_init_num_threads();
  at::set_num_threads(r.threads);
  int current = r.threads;
  c10::InferenceMode inference;
  devices[r.rank]->enter();
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(m);
      go.wait(lock, [&] { return generation != seen || stopping; });
      if (stopping) return;
      seen = generation;
    }
    std::string error;
    bool victim = false;
    try {
      run_program(r, current);
    } catch (const Abandoned& e) {
      error = e.what(), victim = true;
    } catch (const std::exception& e) {
      error = e.what();
      collectives->abort(r.rank);  // the ranks waiting for this one stop now, not at the timeout
    } catch (...) {
      error = "unknown error";
      collectives->abort(r.rank);
    }
    std::lock_guard<std::mutex> lock(m);
    r.error = error, r.victim = victim, r.finished = true;
    if (++done == static_cast<int>(ranks.size())) finished.notify_all();
  }
}

void Engine::Impl::run_program(Rank& r, int& current) {
  RankDevice& dev = *devices[r.rank];
  std::vector<at::Tensor> env(r.slots);
  for (int i = 0; i < 3; ++i) env[i] = dev.cuda() ? inputs[i].to(dev.device()) : inputs[i];
  std::vector<at::Tensor> kv = cache->buffers[r.rank];  // handles: the buffers stay alive meanwhile
  for (const StepRun& step : r.program) {
    if (step.kind == StepKind::Segment) {
      SegmentRun& seg = r.segments[step.segment];
      if (seg.threads != current) at::set_num_threads(current = seg.threads);
      std::vector<at::Tensor> args;
      args.reserve(seg.inputs.size());
      for (int i : seg.inputs) args.push_back(i >= 0 ? env[i] : kv[-1 - i]);
      std::vector<at::Tensor> outs;
      try {
        outs = seg.loader->run(args, dev.stream_handle());
      } catch (const std::exception& e) {
        throw std::runtime_error("engine: " + seg.file + " failed: " + first_line(e.what()));
      }
      if (outs.size() != seg.outputs.size())
        throw std::runtime_error("engine: " + seg.file + " returned " + std::to_string(outs.size()) + " outputs, the "
                                 "manifest lists " + std::to_string(seg.outputs.size()));
      for (size_t i = 0; i < outs.size(); ++i) env[seg.outputs[i]] = std::move(outs[i]);
      continue;
    }
    Sent sent;
    if (step.input >= 0) sent = Sent{env[step.input], dev.mark_sent()};
    std::vector<Sent> got = collectives->run(r.rank, step.kind, std::move(sent));
    std::vector<at::Tensor> values;
    if (dev.cuda()) {
      values = receive_all(got, step.kind, r.rank, devices);
    } else {
      for (auto& v : got) values.push_back(v.tensor);
    }
    for (size_t j = 0; j < step.outputs.size(); ++j) env[step.outputs[j]] = values[j];
  }
  // rank 0 hands over the last position's logits on the host, copied here on the rank's own stream
  // (the caller's thread would copy on another stream, which does not wait for this one)
  if (r.rank == 0) logits = env[r.logits].select(1, env[r.logits].size(1) - 1).to(at::kCPU, at::kFloat).contiguous();
  if (dev.cuda()) dev.finish();  // nothing of this step is left running once the caller returns
}

Engine::Engine(const std::string& dir, const Options& options) : impl_(std::make_shared<Impl>()) {
  Impl& e = *impl_;
  e.spec = EngineSpec::read(dir, options.verify);
  e.options = options;
  if (!(options.timeout_s > 0)) fail(CQIL_ERROR_INVALID_ARGUMENT, "timeout must be > 0 seconds");
  if (options.threads < 0) fail(CQIL_ERROR_INVALID_ARGUMENT, "threads must be >= 0 (0: every core)");
  int p = static_cast<int>(e.spec.ranks.size());
  int threads = options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  auto devices = parse_devices(options.devices, e.spec.device, p);
  for (const auto& d : devices) e.devices.push_back(std::make_unique<RankDevice>(d));
  e.collectives = std::make_unique<Collectives>(p, options.timeout_s, devices[0].is_cuda());
  for (const RankSpec& rs : e.spec.ranks) e.load_rank(rs, threads);
  auto shared = impl_;  // the threads keep the state alive, even past a broken engine's destructor
  try {
    for (auto& r : e.ranks) {
      Rank* rank = r.get();
      r->thread = std::thread([shared, rank] { shared->rank_main(*rank); });
    }
  } catch (const std::system_error& err) {  // no thread to spare: stop the ones that started
    {
      std::lock_guard<std::mutex> lock(e.m);
      e.stopping = true;
    }
    e.go.notify_all();
    for (auto& r : e.ranks)
      if (r->thread.joinable()) r->thread.join();
    fail(CQIL_ERROR_INTERNAL, std::string("engine: cannot start the rank threads: ") + err.what());
  }
}

Engine::~Engine() {
  Impl& e = *impl_;
  std::vector<bool> idle;
  {
    std::lock_guard<std::mutex> lock(e.m);
    e.stopping = true;
    for (auto& r : e.ranks) idle.push_back(r->finished);
  }
  e.go.notify_all();
  for (size_t i = 0; i < e.ranks.size(); ++i) {
    std::thread& t = e.ranks[i]->thread;
    if (!t.joinable()) continue;
    if (idle[i]) t.join();
    else t.detach();  // hangs inside a segment: it cannot be stopped, and keeps impl_ alive
  }
}

const EngineSpec& Engine::spec() const { return impl_->spec; }

std::shared_ptr<KVCache> Engine::new_cache(int64_t batch, int64_t positions) const {
  const Impl& e = *impl_;
  auto cache = std::make_shared<KVCache>();
  cache->batch = batch;
  cache->capacity = std::min(positions, e.spec.max_seq_len) + 1;  // + the spare slot packages need
  for (const RankSpec& rs : e.spec.ranks) {
    auto options = at::TensorOptions().dtype(scalar_type(e.spec.dtype)).device(e.devices[rs.rank]->device());
    std::vector<at::Tensor> buffers;
    for (size_t i = 0; i < 2 * rs.kv_layers.size(); ++i)
      buffers.push_back(at::zeros({batch, e.spec.num_kv_heads, cache->capacity, e.spec.head_dim}, options));
    cache->buffers.push_back(std::move(buffers));
    e.devices[rs.rank]->synchronize();
  }
  return cache;
}

int64_t Engine::cache_length(const KVCache& cache) { return cache.length; }

void Engine::rewind(KVCache& cache, int64_t n) {
  cache.length = std::max<int64_t>(0, cache.length - n);  // later rows are overwritten before being read
}

void Engine::forward(const int64_t* ids, const int64_t* mask, const int64_t* positions, int64_t batch, int64_t seq,
                     int64_t total, KVCache& cache, float* last_logits) {
  Impl& e = *impl_;
  std::lock_guard<std::mutex> step(e.step_mutex);
  if (!e.broken.empty()) fail(CQIL_ERROR_RUNTIME, "engine: unusable since " + e.broken + "; open it again");
  if (batch != cache.batch || total != cache.length + seq || seq < 1)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "engine: a step of batch " + std::to_string(batch) + " after " +
                                          std::to_string(total - seq) + " positions, but the cache holds batch " +
                                          std::to_string(cache.batch) + " with " + std::to_string(cache.length));
  if (total > e.spec.max_seq_len)
    fail(CQIL_ERROR_INVALID_ARGUMENT, "engine: " + std::to_string(total) + " positions exceed the engine's max_seq_len " +
                                          std::to_string(e.spec.max_seq_len));
  if (total + 1 > cache.capacity) {  // rare: an appended turn outgrew the generation's estimate
    int64_t capacity = std::min(std::max(total + 1, 2 * cache.capacity), e.spec.max_seq_len + 1);
    for (auto& rank_buffers : cache.buffers)
      for (auto& buffer : rank_buffers) {
        auto grown = at::zeros({batch, e.spec.num_kv_heads, capacity, e.spec.head_dim}, buffer.options());
        grown.narrow(2, 0, cache.length).copy_(buffer.narrow(2, 0, cache.length));
        buffer = grown;
      }
    for (auto& d : e.devices) d->synchronize();
    cache.capacity = capacity;
  }
  auto i64 = at::TensorOptions().dtype(at::kLong);
  // copies (tiny), so that a rank left hanging never reads the caller's freed memory
  e.inputs = {at::from_blob(const_cast<int64_t*>(ids), {batch, seq}, i64).clone(),
              at::from_blob(const_cast<int64_t*>(mask), {batch, total}, i64).clone(),
              at::from_blob(const_cast<int64_t*>(positions), {batch, seq}, i64).clone()};
  e.cache = &cache;
  std::unique_lock<std::mutex> lock(e.m);
  e.done = 0;
  for (auto& r : e.ranks) r->finished = false, r->error.clear(), r->victim = false;
  ++e.generation;
  e.go.notify_all();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(e.options.timeout_s);
  if (!e.finished.wait_until(lock, deadline, [&] { return e.done == static_cast<int>(e.ranks.size()); })) {
    for (auto& r : e.ranks)
      if (!r->finished) {
        e.broken = "rank " + std::to_string(r->rank) + " hangs inside a segment (no answer for " +
                   std::to_string(static_cast<int>(e.options.timeout_s)) + " s)";
        break;
      }
    e.collectives->abort(-1);
    fail(CQIL_ERROR_RUNTIME, e.broken);
  }
  e.cache = nullptr;
  Rank* cause = nullptr;  // the first rank's own error, else the first victim's (which names who hung)
  for (auto& r : e.ranks)
    if (!r->error.empty() && (!cause || (cause->victim && !r->victim))) cause = r.get();
  if (cause) {
    e.collectives->reset();
    e.logits = at::Tensor();
    fail(CQIL_ERROR_RUNTIME, rank_prefix(cause->rank, cause->error));
  }
  std::memcpy(last_logits, e.logits.data_ptr<float>(), sizeof(float) * batch * e.spec.vocab_size);  // [B, V]
  e.logits = at::Tensor();
  cache.length = total;
}

}  // namespace cqil::rt
