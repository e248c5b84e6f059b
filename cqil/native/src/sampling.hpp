// sampling.hpp: the next token of one row from its logits: a pure function plus the row's random
// generator, as cqil.runtime.sampling.choose (steps 2, 4, 5, 6 of its order: temperature, top_k,
// top_p, draw). Greedy picks the first maximum, as numpy's argmax does, so ties give the Python
// runtime's token. Draws use std::mt19937_64 and need not match numpy's; a seed makes them repeat.
#pragma once

#include <cstdint>
#include <random>

namespace cqil::rt {

constexpr double GREEDY_BELOW = 1e-5;  // a temperature this small is greedy (as in the Python runtime)

struct Sampling {
  double temperature = 0.0;  // < GREEDY_BELOW: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off

  bool greedy() const { return temperature < GREEDY_BELOW; }
};

// Index of the first maximum of logits[0..n) (a NaN counts as the maximum, as in numpy).
int64_t argmax(const float* logits, int64_t n);

// One row's next token.
int64_t choose(const float* logits, int64_t n, const Sampling& sampling, std::mt19937_64& rng);

}  // namespace cqil::rt
