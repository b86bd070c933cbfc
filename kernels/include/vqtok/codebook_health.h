// One training step of codebook health tracking (vqtok.quantizers.health.CodebookHealth) in one
// call: the batch's counts, the histogram, the usage EMA with its denormal flush, the dead-code
// count and the batch's entropy, in one pass over the K codes plus one over the batch (torch-free).
#pragma once

#include <cstdint>

namespace vqtok {

struct HealthStep {
  int64_t distinct = 0;        // codes the batch used
  int64_t total = 0;           // ids counted
  double batch_entropy = 0.0;  // nats, of the batch's code distribution (counts / total)
  int64_t dead = 0;            // codes whose EMA is below dead_threshold after the update
  bool moments = false;        // whether the two sums below were taken
  double d_sum = 0.0;          // sum over the used codes of (after - before), in float64
  double d_xlogx = 0.0;        // sum over the used codes of (after log after - before log before)
};

// ema [k] float32 and hist [k] int64 are updated in place. The batch is either `ids` [n] (each in
// [0, k); counted here) or dense `counts` [k] int64 (ids == nullptr). With total ids T > 0:
//   ema = flush(ema * float(decay)) + counts * float((1 - decay) / T),  flush: v <= FLT_MIN -> 0
// (each product and the sum rounded in fp32, as torch's mul_ and index_add_ with alpha),
// hist += counts, and `dead` counts ema < dead_threshold. With T = 0 nothing changes.
// `moments_below`: take d_sum / d_xlogx (the change of sum w and sum w log w at the used codes,
// before = the decayed value) when distinct * moments_below < k; 0 never.
HealthStep health_step(float* ema, int64_t* hist, int64_t k, const int64_t* ids, int64_t n,
                       const int64_t* counts, double decay, float dead_threshold, int64_t moments_below);

}  // namespace vqtok
