// sampling.cpp: see sampling.hpp; the same arithmetic as cqil/runtime/sampling.py, in double.
#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace cqil::rt {

int64_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i])) return i;
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

int64_t choose(const float* logits, int64_t n, const Sampling& s, std::mt19937_64& rng) {
  if (s.greedy()) return argmax(logits, n);
  std::vector<double> probs(logits, logits + n);
  double top = *std::max_element(probs.begin(), probs.end());
  double sum = 0;
  for (double& p : probs) sum += (p = std::exp((p - top) / s.temperature));
  for (double& p : probs) p /= sum;
  if (s.top_k > 0 && s.top_k < n) {  // keep what scores at least the k-th best (ties kept)
    std::vector<double> sorted(probs);
    std::nth_element(sorted.begin(), sorted.begin() + (n - s.top_k), sorted.end());
    double kth = sorted[n - s.top_k];
    for (double& p : probs)
      if (p < kth) p = 0;
  }
  if (s.top_p < 1.0) {  // the smallest most-likely prefix whose mass reaches top_p
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
    double mass = std::accumulate(probs.begin(), probs.end(), 0.0), before = 0;
    for (int64_t i : order) {
      double p = probs[i] / mass;
      if (before >= s.top_p) probs[i] = 0;
      before += p;
    }
  }
  double total = std::accumulate(probs.begin(), probs.end(), 0.0);
  double u = std::uniform_real_distribution<double>(0.0, total)(rng);
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (probs[i] <= 0) continue;
    last = i;
    if ((u -= probs[i]) < 0) return i;
  }
  return last;  // rounding left u a hair above the total
}

}  // namespace cqil::rt
