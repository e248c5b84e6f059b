// spec.cpp: manifest.json -> EngineSpec, with the checks described in spec.hpp.
#include "spec.hpp"

#include <torch/version.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.hpp"
#include "sha256.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace cqil::rt {
namespace {

// Typed access to the manifest; a failure names the field (as cqil/exporters/schema.py does).
class Checker {
 public:
  explicit Checker(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + path_ + ": " + where + " " + what);
  }
  const json& get(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.is_object() || !obj.contains(key)) fail(where + key, "is missing");
    return obj.at(key);
  }
  const json& object(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = get(obj, key, where);
    if (!v.is_object()) fail(where + key, "must be an object, got " + v.dump());
    return v;
  }
  const json& array(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = get(obj, key, where);
    if (!v.is_array()) fail(where + key, "must be a list, got " + v.dump());
    return v;
  }
  std::string string(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = get(obj, key, where);
    if (!v.is_string()) fail(where + key, "must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  int64_t integer(const json& obj, const std::string& key, const std::string& where, int64_t low) const {
    const json& v = get(obj, key, where);
    if (!v.is_number_integer()) fail(where + key, "must be an int, got " + v.dump());
    int64_t value = v.get<int64_t>();
    if (value < low) fail(where + key, "must be >= " + std::to_string(low) + ", got " + std::to_string(value));
    return value;
  }
  std::vector<std::string> strings(const json& obj, const std::string& key, const std::string& where) const {
    std::vector<std::string> out;
    for (const json& v : array(obj, key, where)) {
      // tensor records {name, dtype, shape} or plain names
      const json& name = v.is_object() && v.contains("name") ? v.at("name") : v;
      if (!name.is_string()) fail(where + key, "must hold names, got " + v.dump());
      out.push_back(name.get<std::string>());
    }
    return out;
  }
  void relpath(const std::string& value, const std::string& where) const {
    fs::path p(value);
    bool up = std::any_of(p.begin(), p.end(), [](const fs::path& part) { return part == ".."; });
    if (value.empty() || p.is_absolute() || up || value.find('\\') != std::string::npos)
      fail(where, "must be a path inside the engine directory, got '" + value + "'");
  }

 private:
  std::string path_;
};

json read_json(const fs::path& path) {
  std::ifstream f(path);
  if (!f) rt::fail(CQIL_ERROR_ENGINE, "engine: cannot read " + path.string());
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + path.string() + " is not valid JSON (" + first_line(e.what()) + ")");
  }
}

void add_ids(const json& value, std::set<int64_t>& ids) {
  if (value.is_number_integer()) ids.insert(value.get<int64_t>());
  if (value.is_array())
    for (const json& v : value)
      if (v.is_number_integer()) ids.insert(v.get<int64_t>());
}

// The eos ids the Python runtime uses (cqil.runtime.completion.eos_ids): the tokenizer's eos token,
// generation_config.json's and the model config's eos_token_id. Optional files: a bad one is skipped.
std::vector<int64_t> read_eos_ids(const fs::path& dir, const json& model) {
  std::set<int64_t> ids;
  add_ids(model.value("eos_token_id", json()), ids);
  auto optional = [&](const char* name) -> json {
    fs::path p = dir / name;
    if (!fs::is_regular_file(p)) return json();
    try {
      return read_json(p);
    } catch (const Error&) {
      return json();
    }
  };
  json gen = optional("generation_config.json");
  if (gen.is_object()) add_ids(gen.value("eos_token_id", json()), ids);
  json tok_config = optional("tokenizer_config.json");
  json eos = tok_config.is_object() ? tok_config.value("eos_token", json()) : json();
  if (eos.is_object()) eos = eos.value("content", json());
  if (eos.is_string()) {
    json tok = optional("tokenizer.json");
    std::string text = eos.get<std::string>();
    if (tok.is_object() && tok.contains("added_tokens") && tok["added_tokens"].is_array())
      for (const json& t : tok["added_tokens"])
        if (t.is_object() && t.value("content", json()) == text) add_ids(t.value("id", json()), ids);
    if (tok.is_object() && tok.contains("model") && tok["model"].is_object()) {
      const json& vocab = tok["model"].value("vocab", json());
      if (vocab.is_object() && vocab.contains(text)) add_ids(vocab[text], ids);
    }
  }
  return {ids.begin(), ids.end()};
}

void verify_files(const fs::path& root, const json& files, const Checker& c) {
  for (auto it = files.begin(); it != files.end(); ++it) {
    const std::string& rel = it.key();
    fs::path path = root / rel;
    if (!fs::is_regular_file(path)) rt::fail(CQIL_ERROR_ENGINE, "engine: " + rel + " is missing from " + root.string());
    int64_t want = c.integer(it.value(), "bytes", "files['" + rel + "'].", 0);
    auto size = static_cast<int64_t>(fs::file_size(path));
    if (size != want)
      rt::fail(CQIL_ERROR_ENGINE, "engine: " + rel + " has " + std::to_string(size) + " bytes, the manifest records " +
                                        std::to_string(want) + " (truncated or replaced?)");
    if (sha256_file(path.string()) != c.string(it.value(), "sha256", "files['" + rel + "']."))
      rt::fail(CQIL_ERROR_ENGINE, "engine: " + rel + " does not match its sha256 in the manifest (corrupted or modified)");
  }
}

void check_toolchain(const json& aoti, const std::string& dir, const Checker& c) {
  std::string built = c.string(aoti, "torch", "aoti.");
  std::ostringstream ours;
  ours << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR;
  // packages and the loader share the aoti_torch_* C shim: only the same major.minor is safe
  std::string major_minor = built.substr(0, built.find('.', built.find('.') + 1));
  if (major_minor != ours.str())
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + dir + " holds AOTInductor packages built by torch " + built +
                                      ", this libcqil runs torch " + ours.str() + ": recompile the engine with torch " +
                                      ours.str() + " (or build libcqil against torch " + major_minor + ")");
  std::string missing;
  std::string isa = aoti.value("isa", "");
  if (c.string(aoti, "device", "aoti.") == "cpu" && !cpu_supports(isa, &missing))
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + dir + " holds packages compiled for CPUs with " + isa +
                                      ", and this CPU lacks " + missing + ": recompile the engine on this machine");
}

}  // namespace

EngineSpec EngineSpec::read(const std::string& dir_name, bool verify) {
  try {
    return read_checked(dir_name, verify);
  } catch (const json::exception& e) {  // a value of an unexpected type the checks above did not name
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + "/manifest.json: " + first_line(e.what()));
  } catch (const fs::filesystem_error& e) {
    rt::fail(CQIL_ERROR_ENGINE, "engine: " + first_line(e.what()));
  }
}

EngineSpec EngineSpec::read_checked(const std::string& dir_name, bool verify) {
  fs::path root(dir_name);
  if (!fs::is_directory(root)) fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + " is not a directory");
  fs::path path = root / "manifest.json";
  if (!fs::is_regular_file(path))
    fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + " has no manifest.json (not an engine directory?)");
  json m = read_json(path);
  Checker c(path.string());
  if (!m.is_object() || !m.contains("format_version") || !m["format_version"].is_number_integer())
    fail(CQIL_ERROR_ENGINE, "engine: " + path.string() + " has no integer format_version");
  int64_t version = m["format_version"].get<int64_t>();
  if (version > FORMAT_VERSION)
    fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + " has format_version " + std::to_string(version) +
                                ", newer than this libcqil reads (" + std::to_string(FORMAT_VERSION) +
                                "); upgrade cqil or recompile the engine");
  if (version < 1) c.fail("format_version", "must be >= 1, got " + std::to_string(version));
  if (!m.contains("aoti"))
    fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + " has no AOTInductor packages: recompile it with --formats onnx,aoti");
  const json& aoti = c.object(m, "aoti", "");
  if (c.string(aoti, "kv_layout", "aoti.") != "buffer") c.fail("aoti.kv_layout", "must be 'buffer'");
  check_toolchain(aoti, dir_name, c);

  EngineSpec spec;
  spec.dir = dir_name;
  spec.device = c.string(aoti, "device", "aoti.");
  if (spec.device != "cpu" && spec.device != "cuda") c.fail("aoti.device", "must be cpu or cuda, got " + spec.device);
  spec.torch_version = c.string(aoti, "torch", "aoti.");
  spec.isa = aoti.value("isa", "");
  const json& dims = c.object(aoti, "dims", "aoti.");
  const json& batch = c.array(dims, "batch", "aoti.dims.");
  if (batch.size() != 2 || !batch[1].is_number_integer()) c.fail("aoti.dims.batch", "must be [min, max]");
  spec.max_batch = batch[1].get<int64_t>();
  spec.dtype = c.string(m, "dtype", "");
  if (spec.dtype != "float32" && spec.dtype != "float16" && spec.dtype != "bfloat16")
    c.fail("dtype", "must be one of float32, float16, bfloat16, got '" + spec.dtype + "'");
  spec.max_seq_len = c.integer(m, "max_seq_len", "", 1);
  const json& model = c.object(m, "model", "");
  spec.vocab_size = c.integer(model, "vocab_size", "model.", 1);
  spec.num_kv_heads = c.integer(model, "num_kv_heads", "model.", 1);
  spec.head_dim = c.integer(model, "head_dim", "model.", 1);
  const json& plan = c.object(m, "plan", "");
  int64_t p = c.integer(plan, "p", "plan.", 1), start = c.integer(plan, "start", "plan.", 0);
  int64_t end = c.integer(plan, "end", "plan.", 0);
  bool replicate_outer = plan.value("replicate_outer", false);

  const json& files = c.object(m, "files", "");
  for (auto it = files.begin(); it != files.end(); ++it) c.relpath(it.key(), "files['" + it.key() + "']");
  const json& ranks = c.array(m, "ranks", "");
  if (static_cast<int64_t>(ranks.size()) != p)
    c.fail("ranks", "hold " + std::to_string(ranks.size()) + " ranks, the plan has p=" + std::to_string(p));
  spec.ranks.resize(p);
  std::vector<bool> seen(p, false);
  for (size_t i = 0; i < ranks.size(); ++i) {
    const json& rj = ranks[i];
    std::string where = "ranks[" + std::to_string(i) + "].";
    int64_t r = c.integer(rj, "rank", where, 0);
    if (r >= p || seen[r]) c.fail(where + "rank", "must name each rank of the plan once, got " + std::to_string(r));
    seen[r] = true;
    RankSpec& rank = spec.ranks[r];
    rank.rank = static_cast<int>(r);
    for (const json& l : c.array(rj, "kv_layers", where)) {
      if (!l.is_number_integer()) c.fail(where + "kv_layers", "must hold layer numbers, got " + l.dump());
      rank.kv_layers.push_back(l.get<int>());
    }
    std::map<std::string, int> index;
    const json& segments = c.array(rj, "segments", where);
    for (size_t j = 0; j < segments.size(); ++j) {
      std::string w = where + "segments[" + std::to_string(j) + "].";
      SegmentSpec seg;
      seg.name = c.string(segments[j], "name", w);
      if (!segments[j].contains("aoti"))
        fail(CQIL_ERROR_ENGINE, "engine: " + dir_name + ": rank " + std::to_string(r) + " " + seg.name +
                                    " has no package: recompile the engine with --formats onnx,aoti");
      const json& pkg = c.object(segments[j], "aoti", w);
      seg.file = c.string(pkg, "file", w + "aoti.");
      c.relpath(seg.file, w + "aoti.file");
      if (!files.contains(seg.file)) c.fail(w + "aoti.file", seg.file + " has no checksum in the manifest's files");
      seg.inputs = c.strings(pkg, "inputs", w + "aoti.");
      seg.outputs = c.strings(pkg, "outputs", w + "aoti.");
      std::vector<int> layers;
      for (const json& l : c.array(segments[j], "layers", w)) layers.push_back(l.is_number_integer() ? l.get<int>() : -1);
      // rank 0's segments of outer layers alone run while the other ranks wait (as cqil.runtime.engine)
      seg.outer = p > 1 && r == 0 && !replicate_outer && !layers.empty() &&
                  std::none_of(layers.begin(), layers.end(), [&](int l) { return l >= start && l < end; });
      index[seg.name] = static_cast<int>(rank.segments.size());
      rank.segments.push_back(std::move(seg));
    }
    const json& program = c.array(rj, "program", where);
    for (size_t j = 0; j < program.size(); ++j) {
      std::string w = where + "program[" + std::to_string(j) + "].";
      std::string kind = c.string(program[j], "kind", w);
      Step step;
      if (kind == "segment") {
        std::string name = c.string(program[j], "segment", w);
        if (!index.count(name)) c.fail(w + "segment", "names '" + name + "', which rank " + std::to_string(r) + " does not have");
        step.kind = StepKind::Segment;
        step.segment = index[name];
      } else {
        if (kind == "broadcast") step.kind = StepKind::Broadcast;
        else if (kind == "all_gather") step.kind = StepKind::AllGather;
        else if (kind == "all_reduce") step.kind = StepKind::AllReduce;
        else c.fail(w + "kind", "must be one of segment, broadcast, all_gather, all_reduce, got '" + kind + "'");
        std::vector<std::string> inputs = c.strings(program[j], "inputs", w);
        step.outputs = c.strings(program[j], "outputs", w);
        if (inputs.size() != 1 || step.outputs.empty())
          c.fail(w.substr(0, w.size() - 1), "must send one tensor (inputs) and receive at least one (outputs)");
        step.input = inputs[0];
      }
      rank.program.push_back(std::move(step));
    }
  }
  spec.eos_ids = read_eos_ids(root, model);
  if (verify) verify_files(root, files, c);
  return spec;
}

bool cpu_supports(const std::string& isa, std::string* missing) {
  // AOTI_CPU_ISA is inductor's vector ISA name, upper-cased; each word needs these /proc/cpuinfo flags
  static const std::map<std::string, std::vector<std::string>> needs = {
      {"AVX2", {"avx2", "fma", "f16c"}},
      {"AVX512", {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"}},
      {"AVX512_VNNI", {"avx512_vnni"}},
      {"AMX_TILE", {"amx_tile"}},
  };
  std::set<std::string> flags;
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;) flags.insert(w);
    break;
  }
  std::istringstream words(isa);
  for (std::string word; words >> word;) {
    auto it = needs.find(word);
    if (it == needs.end()) continue;  // ISAs of other architectures (NEON, VSX, ...) run where built
    if (flags.empty()) return true;   // no /proc/cpuinfo: nothing to check against
    for (const std::string& flag : it->second)
      if (!flags.count(flag)) {
        if (missing) *missing = flag;
        return false;
      }
  }
  return true;
}

}  // namespace cqil::rt
