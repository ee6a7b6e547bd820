// Raw-pointer interface of the vectorised balanced-sparse kernels (balanced_avx512.cpp, balanced_avx2.cpp).
// No torch headers: the ISA translation units include this file. Everything defined here has internal linkage.
//
// Layout (see sparse/formats.py, BalancedSparseWeight): values [out, n_banks, keep] and indices of the same shape
// (uint8 or int16, sorted per bank), both contiguous; index (o, b, k) names input column b * bank + indices[o, b, k].
// Activations are row-major with a row stride (x [T, in] with ldx, dy [T, out] with lddy); outputs are contiguous.
//
// How the kernels work (forward; the others follow the same plan):
//  - Tokens are vectorised: a tile of up to 8 vectors of tokens (128 on AVX-512, 64 on AVX2) is packed transposed
//    (X^T, token-contiguous, fp32) once per call and per thread, a chunk of a few banks at a time so that the
//    chunk stays in L1. bf16 is widened while packing, so every inner loop is fp32.
//  - Per kept weight: one broadcast and one precomputed offset load feed a whole row of the tile (8 FMAs on
//    AVX-512), and 2-8 output rows are interleaved so that 8-16 independent accumulators hide the FMA latency.
//    The inner loop is bound by loads: one vector load of X^T per FMA is inherent (each row picks its own
//    columns, so nothing is reused across rows), which caps it near half the dense FMA rate. On AVX-512 the
//    offsets of the next row group are computed while the current one runs; with 1-2 token vectors (T <= 32)
//    and keep % 4 == 0 the offsets come from one load of 4 indices and the weights from one load of 4 instead.
//  - Partial sums per chunk go to a per-thread buffer [rows, tile]; after the last chunk they are transposed into
//    Y in registers, adding bias and the activation. The chunked walk over W is strided, but the hardware
//    prefetchers follow it, and software prefetches of the next rows' slices made almost every BERT-base case
//    slower, so there are none (numbers: docs/measurements.md, "Balanced forward: no software prefetch of W").
//  - Vectorising over 16 output rows instead (weights and in-bank indices transposed per call into [entry][16 rows]
//    vectors, one vpermt2ps per token picking the rows' x values from the bank's 32 columns, X and Y row-major, no
//    transposes) was built and measured slower: a 512-bit vpermt2ps and the FMA it feeds sustain fewer FMAs per
//    cycle together than this plan's inner loop does alone, bound by loads (numbers: docs/measurements.md,
//    "Balanced forward: tokens vectorised, not output rows").
//  - T below kGatherMaxTokens (decode) picks x per kept entry instead (permutes of 32-column windows on AVX-512,
//    gathers on AVX2): the weight stream, not the FMAs, is the bound there. On AVX-512, bank 32 with keep 16 / 8 / 4
//    has its own path: each 16 kept entries are 1 / 2 / 4 whole banks, so the in-bank indices are the permute
//    indices (no column arithmetic, ~1 shuffle per bank per 16 entries), 16 rows are reduced into one vector of
//    outputs, the weights are prefetched 8 KiB ahead, and the indices are range-checked as they are read instead of
//    in a separate pass. With cold weights this path streams the sparse weight bytes as fast as oneDNN streams a
//    dense weight; what remains is the fixed cost of a call (dispatch + a 2-thread fork/join), a large share of a
//    keep-4 call (numbers: docs/measurements.md, "Balanced decode, bank 32").
#pragma once

#include <cstdint>

namespace sparsekern::cpu {

struct BalShape {
  int64_t out, in, bank, n_banks, keep;
  bool bf16;   // values/activations are bfloat16 (else float32); accumulation is always float32
  bool idx16;  // indices are int16 (else uint8)
};

// Most tokens per tile of any ISA (8 zmm of fp32): 8 zmm per broadcast beat 4, and 3 rows x 8 zmm (24
// accumulators) was slower than 2 x 8 (numbers: docs/measurements.md, "Balanced forward: tile and chunk sizes").
constexpr int64_t kMaxTokTile = 128;
// Floats of the packed X^T chunk kept in L1 (32 KiB, most of a 48 KiB L1d): smaller chunks cost more partial-sum
// traffic, larger ones L1 misses (numbers: the same section).
constexpr int64_t kChunkFloats = 8192;
// Below this many tokens the forward picks x per kept entry instead of packing a token tile, which is cheaper
// there than a mostly empty tile (numbers: the same section).
constexpr int64_t kGatherMaxTokens = 4;

// Banks per packed chunk for a token tile of `tile` tokens: the chunk fits kChunkFloats, at least one bank.
static inline int64_t bal_chunk_banks(const BalShape& s, int64_t tile) {
  const int64_t cb = kChunkFloats / (tile * s.bank);
  return cb < 1 ? 1 : (cb > s.n_banks ? s.n_banks : cb);
}

static inline int64_t bal_chunk_floats(const BalShape& s) {
  return kChunkFloats > s.bank * kMaxTokTile ? kChunkFloats : s.bank * kMaxTokTile;
}

// Most kept entries of one row in one chunk (any tile, the smallest being 8 tokens): bounds the per-row offset
// arrays.
static inline int64_t bal_chunk_entries(const BalShape& s) {
  return bal_chunk_banks(s, 8) * s.keep;
}

// Most output rows one forward micro-kernel call handles at once (AVX2, 8-token tiles).
constexpr int64_t kMaxRowGroup = 8;

// Scratch (in floats, 64-byte alignments included) one thread needs: forward for `rows` output rows, grad_input
// with rows = out, sddmm see below.
static inline int64_t bal_scratch_floats(const BalShape& s, int64_t rows) {
  const int64_t row_len = s.n_banks * s.keep;
  // Entry offsets: the AVX-512 forward keeps two row groups' worth (the next one computed ahead).
  const int64_t tiles =
      bal_chunk_floats(s) + (rows + 16) * kMaxTokTile + (2 * kMaxRowGroup + 1) * (bal_chunk_entries(s) + 16) + 128;
  const int64_t gather = kGatherMaxTokens * (s.in + 128) + row_len + 96;
  return tiles > gather ? tiles : gather;
}

// sddmm: the tiles, per-chunk column offsets (int64) and a float32 accumulator [rows, n_banks * keep].
static inline int64_t bal_sddmm_scratch_floats(const BalShape& s, int64_t rows) {
  return bal_chunk_floats(s) + (rows + 16) * kMaxTokTile + 2 * (bal_chunk_floats(s) / 4 + 32) +
         rows * s.n_banks * s.keep + 128;
}

// Whether the AVX-512 forward takes the bank-32 decode path for these tokens, which checks every in-bank index as it
// reads it (its permutes use only an index's low 5 bits, so a bad one cannot read outside x) and reports a bad one
// instead of the caller checking beforehand: a separate pass over every index was a large share of a cold decode
// call (numbers: docs/measurements.md, "Balanced decode, bank 32").
static inline bool bal_fwd_checks_indices_avx512(const BalShape& s, int64_t T) {
  return T >= 1 && T < kGatherMaxTokens && s.bank == 32 && (s.keep == 16 || s.keep == 8 || s.keep == 4);
}

// Entry points, one set per ISA. act uses the numbering of Act in epilogue.h. scratch holds
// bal_scratch_floats(s, o1 - o0) floats (grad_input: bal_scratch_floats(s, s.out); sddmm:
// bal_sddmm_scratch_floats(s, o1 - o0)).
//
// y[t, o] = act(bias[o] + sum_{b,k} values[o, b, k] * x[t, b * bank + indices[o, b, k]]) for o in [o0, o1).
// The AVX-512 forward returns false if it found an index outside its bank (only where
// bal_fwd_checks_indices_avx512; y is then unspecified), else true.
bool balanced_fwd_avx512(const BalShape& s, const void* x, int64_t ldx, int64_t T, const void* values,
                         const void* indices, const void* bias, int act, void* y, int64_t o0, int64_t o1,
                         float* scratch);
void balanced_fwd_avx2(const BalShape& s, const void* x, int64_t ldx, int64_t T, const void* values,
                       const void* indices, const void* bias, int act, void* y, int64_t o0, int64_t o1, float* scratch);
// dx[t, c] = sum_{o,k} dy[t, o] * values[o, b, k] over the entries of bank b naming column c, for banks [b0, b1).
void balanced_grad_input_avx512(const BalShape& s, const void* dy, int64_t lddy, int64_t T, const void* values,
                                const void* indices, void* dx, int64_t b0, int64_t b1, float* scratch);
void balanced_grad_input_avx2(const BalShape& s, const void* dy, int64_t lddy, int64_t T, const void* values,
                              const void* indices, void* dx, int64_t b0, int64_t b1, float* scratch);
// dw[o, b, k] = sum_t dy[t, o] * x[t, b * bank + indices[o, b, k]] for o in [o0, o1).
void balanced_sddmm_avx512(const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx, int64_t T,
                           const void* indices, void* dw, int64_t o0, int64_t o1, float* scratch);
void balanced_sddmm_avx2(const BalShape& s, const void* dy, int64_t lddy, const void* x, int64_t ldx, int64_t T,
                         const void* indices, void* dw, int64_t o0, int64_t o1, float* scratch);

}  // namespace sparsekern::cpu
