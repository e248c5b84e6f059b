// spec.hpp: what libcqil reads from an engine directory: manifest.json as typed values, checked.
//
// The checks mirror the Python runtime's (cqil/exporters/manifest.py and schema.py) for what this
// runtime relies on: the format version first, then the fields, every file's size and sha256, and
// what only a native runtime must check: the packages' torch major.minor and CPU instruction set.
// Every failure is one line naming the engine and the field or file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cqil::rt {

constexpr int FORMAT_VERSION = 1;  // the newest manifest this runtime reads (cqil.exporters.manifest)

enum class StepKind { Segment, Broadcast, AllGather, AllReduce };

struct Step {
  StepKind kind;
  int segment = -1;                   // Segment: index into RankSpec::segments
  std::string input;                  // collectives: the value this rank sends
  std::vector<std::string> outputs;   // collectives: what it receives
};

struct SegmentSpec {
  std::string name, file;             // file: the package, relative to the engine directory
  std::vector<std::string> inputs;    // in call order; past_key_values.* are the rank's KV buffers
  std::vector<std::string> outputs;
  bool outer = false;                 // only layers outside the CQIL range: runs while other ranks wait
};

struct RankSpec {
  int rank = 0;
  std::vector<int> kv_layers;
  std::vector<SegmentSpec> segments;
  std::vector<Step> program;
};

struct EngineSpec {
  std::string dir;
  std::string dtype;                  // "float32", "float16", "bfloat16": activations and KV buffers
  int64_t max_seq_len = 0, max_batch = 0, vocab_size = 0, num_kv_heads = 0, head_dim = 0;
  std::string device;                 // what the packages were compiled for: "cpu" or "cuda"
  std::string torch_version, isa;
  std::vector<int64_t> eos_ids;       // tokenizer, generation_config.json, model config
  std::vector<RankSpec> ranks;        // ranks[r].rank == r

  // Read and check DIR/manifest.json; verify: also every file's size and sha256.
  static EngineSpec read(const std::string& dir, bool verify);

 private:
  static EngineSpec read_checked(const std::string& dir, bool verify);
};

// Whether this CPU runs code built for `isa` (AOTInductor's AOTI_CPU_ISA, e.g. "AVX2",
// "AVX512 AVX512_VNNI"); `missing` gets the first feature it lacks.
bool cpu_supports(const std::string& isa, std::string* missing);

}  // namespace cqil::rt
