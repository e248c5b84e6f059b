// cqil-run-native: generate from an engine directory with libcqil (the C++ API, cqil.hpp).
//
//   cqil-run-native ENGINE_DIR --input-ids 1,2,3 [--max-new-tokens N] [--json] [--threads N]
//                   [--do-sample --temperature T --top-k K --top-p P --seed S] [--ignore-eos]
//                   [--devices D] [--no-verify]
//
// As `cqil-run ENGINE --input-ids ...`: streams the new token ids to stdout (a stats line on
// stderr), or with --json prints one object with cqil-run's keys (input_ids, output_ids,
// new_tokens, prefill_ms, ms_per_token, stopped; no "text": libcqil has no tokenizer). Errors are
// one line on stderr: exit 2 for bad input or a bad engine, 1 when running failed.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cqil.hpp"

namespace {

struct Args {
  std::string engine, input_ids, devices;
  int64_t max_new_tokens = 32;
  bool json = false, do_sample = false, ignore_eos = false, verify = true, seeded = false;
  int threads = 0;
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
};

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double number(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  throw Usage("argument " + flag + ": invalid number: '" + text + "'");
}

int64_t integer(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    long long v = std::stoll(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  throw Usage("argument " + flag + ": invalid int value: '" + text + "'");
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage("argument " + arg + ": expected one argument");
      return argv[++i];
    };
    if (arg == "--input-ids") a.input_ids = value();
    else if (arg == "--max-new-tokens") a.max_new_tokens = integer(arg, value());
    else if (arg == "--json") a.json = true;
    else if (arg == "--threads") a.threads = static_cast<int>(integer(arg, value()));
    else if (arg == "--do-sample") a.do_sample = true;
    else if (arg == "--temperature") a.temperature = number(arg, value());
    else if (arg == "--top-k") a.top_k = integer(arg, value());
    else if (arg == "--top-p") a.top_p = number(arg, value());
    else if (arg == "--seed") a.seed = static_cast<uint64_t>(integer(arg, value())), a.seeded = true;
    else if (arg == "--ignore-eos") a.ignore_eos = true;
    else if (arg == "--devices") a.devices = value();
    else if (arg == "--no-verify") a.verify = false;
    else if (!arg.empty() && arg[0] == '-') throw Usage("unrecognized arguments: " + arg);
    else if (a.engine.empty()) a.engine = arg;
    else throw Usage("unrecognized arguments: " + arg);
  }
  if (a.engine.empty()) throw Usage("the following arguments are required: engine");
  if (a.input_ids.empty()) throw Usage("the following arguments are required: --input-ids");
  if (a.max_new_tokens < 1) throw Usage("max_new_tokens must be >= 1, got " + std::to_string(a.max_new_tokens));
  if (a.threads < 0) throw Usage("--threads must be >= 1, got " + std::to_string(a.threads));
  return a;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    bool digits = !item.empty() && item.find_first_not_of("-0123456789") == std::string::npos;
    try {
      if (!digits) throw std::invalid_argument(item);
      ids.push_back(std::stoll(item));
    } catch (const std::exception&) {
      throw Usage("--input-ids must be comma-separated integers (no empty items), got '" + text + "'");
    }
  }
  if (text.empty() || text.back() == ',') throw Usage("--input-ids must be comma-separated integers (no empty items), got '" + text + "'");
  return ids;
}

std::string join(const std::vector<int64_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  return "[" + out + "]";
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

int run(const Args& a) {
  std::vector<int64_t> prompt = parse_ids(a.input_ids);
  cqil::EngineOptions options;
  options.threads(a.threads).verify(a.verify);
  if (!a.devices.empty()) options.devices(a.devices);
  cqil::Engine engine(a.engine, options);
  cqil::Params params;
  params.max_new_tokens(a.max_new_tokens);
  if (a.do_sample) params.sampling(a.temperature, a.top_k, a.top_p);
  if (a.seeded) params.seed(a.seed);
  if (!a.ignore_eos) params.eos(engine.eos_ids());

  auto t0 = std::chrono::steady_clock::now();
  cqil::Generator gen(engine, {prompt}, params);
  double prefill_ms = ms_since(t0);
  auto t1 = std::chrono::steady_clock::now();
  std::vector<int64_t> output;
  while (!gen.done()) {
    output.push_back(gen.next_tokens()[0]);
    if (!a.json) std::printf("%lld ", static_cast<long long>(output.back())), std::fflush(stdout);
  }
  double decode_ms = ms_since(t1);
  size_t steps = output.size();
  double per_token = steps > 1 ? decode_ms / static_cast<double>(steps - 1) : 0.0;
  const char* stopped = gen.finish_reason(0) == 1 ? "eos" : "length";
  if (a.json) {
    std::printf("{\"input_ids\": %s, \"output_ids\": %s, \"new_tokens\": %zu, \"prefill_ms\": %.3f, "
                "\"ms_per_token\": %.3f, \"stopped\": \"%s\"}\n",
                join(prompt).c_str(), join(output).c_str(), steps, prefill_ms, per_token, stopped);
  } else {
    std::printf("\n");
    std::fprintf(stderr, "cqil-run-native: %zu tokens, prefill %.1f ms, %.2f ms/token (%s)\n", steps, prefill_ms,
                 per_token, stopped);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const Usage& e) {
    std::fprintf(stderr, "cqil-run-native: error: %s (see the header of cqil_run_native.cpp)\n", e.what());
    return 2;
  } catch (const cqil::Error& e) {
    std::fprintf(stderr, "cqil-run-native: error: %s\n", e.what());
    bool bad_input = e.status() == CQIL_ERROR_INVALID_ARGUMENT || e.status() == CQIL_ERROR_ENGINE;
    return bad_input ? 2 : 1;
  }
}
