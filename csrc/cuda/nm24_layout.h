// The packed 2:4 weight layout read by the sparse-tensor-core kernel (nm24.cu), as index arithmetic usable on
// the host and the device. Plain C++ (no CUDA headers needed), so a host-only test can compile it and check the
// packing against an emulation of mma.sp without a GPU.
//
// Input: a balanced weight with bank = 4, keep = 2: values [out, in/4, 2] and in-bank indices [out, in/4, 2]
// (uint8, increasing within a bank). Y = X W^T is computed as Y^T = W X^T so that the sparse W is the A operand
// of mma.sp.sync.aligned.m16n8k32 (A: 16 rows x 32 logical columns, stored as 16 x 16 kept values).
//
// Packed values  [out/16, in/32, 32 lanes, 8]: the A fragment of each 16 x 32 tile in register order, so a lane
// loads its 8 values with one 16-byte load. For lane l (g = l/4, q = l%4), element i:
//   row  = 16*mt + g + 8*((i/2) % 2)
//   compressed column c = 2q + i%2 + 8*(i/4)  (c/2 = 4-column group within the tile, c%2 = which kept value)
// Packed metadata [out/16, in/64, 32 lanes] uint32: one word per lane per pair of k-tiles. Tile 2p is issued
// with sparsity selector 0 (lanes q = 0, 1 supply metadata), tile 2p+1 with selector 1 (lanes q = 2, 3), so
// every lane's word is used. Lane (g, q) holds tile kt = 2p + q/2, logical columns 16*(q%2) .. +15 of it:
//   bits  0..15: row g,     bits 16..31: row g + 8;
//   inside each 16-bit half, 4 bits per 4-column group j (bits 4j..4j+3): index of the first kept value in
//   bits 4j..4j+1, of the second in bits 4j+2..4j+3.
// This follows the PTX ISA's description of the m16n8k32 .f16/.bf16 sparse metadata; it has been checked here
// against an emulation of that description (tests/test_cuda_build.py), not yet on a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sparsekern::nm24 {

constexpr int kTileRows = 16;  // rows of one A tile
constexpr int kTileCols = 32;  // logical columns of one A tile (16 kept)
constexpr int kFragElems = 8;  // kept values per lane per tile
constexpr int kLanes = 32;

// Where element i of lane `lane` in tile (mt, kt) comes from in values [out, in/4, 2]: row, bank (4-column
// group, absolute) and slot (0 or 1).
struct Src {
  int64_t row, bank;
  int slot;
};

SK_HD Src value_source(int64_t mt, int64_t kt, int lane, int i) {
  const int g = lane >> 2, q = lane & 3;
  const int c = 2 * q + (i & 1) + 8 * (i >> 2);
  return {mt * kTileRows + g + 8 * ((i >> 1) & 1), kt * (kTileCols / 4) + c / 2, c & 1};
}

// 16 bits of metadata: four 4-column groups of one row, starting at absolute bank b0 (idx: [out, in/4, 2]).
template <typename idx_t>
SK_HD uint32_t meta16(const idx_t* idx, int64_t n_banks, int64_t row, int64_t b0) {
  uint32_t m = 0;
  for (int j = 0; j < 4; ++j) {
    const idx_t* p = idx + (row * n_banks + b0 + j) * 2;
    m |= (static_cast<uint32_t>(p[0] & 3) | (static_cast<uint32_t>(p[1] & 3) << 2)) << (4 * j);
  }
  return m;
}

// The metadata word of lane `lane` for the pair of k-tiles (2p, 2p+1) of row tile mt.
template <typename idx_t>
SK_HD uint32_t meta_word(const idx_t* idx, int64_t n_banks, int64_t mt, int64_t p, int lane) {
  const int g = lane >> 2, q = lane & 3;
  const int64_t kt = 2 * p + (q >> 1);
  const int64_t b0 = kt * (kTileCols / 4) + 4 * (q & 1);
  const int64_t r = mt * kTileRows + g;
  return meta16(idx, n_banks, r, b0) | (meta16(idx, n_banks, r + 8, b0) << 16);
}

// Shapes the packed layout supports: whole 16-row tiles and whole pairs of 32-column tiles.
SK_HD bool shape_ok(int64_t out, int64_t in) {
  return out > 0 && in > 0 && out % 16 == 0 && in % 64 == 0;
}

}  // namespace sparsekern::nm24
