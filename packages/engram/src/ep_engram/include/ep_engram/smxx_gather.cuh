// Engram row gather: rows named by global id, read from the owners' peer-mapped segments (GPU
// memory over NVLink, or pinned host memory over PCIe / C2C) into one output buffer.
//
// Global row g lives on rank g / E at local row g % E. Id -1 gives a zero row and all-zero scale
// bytes. Any other id outside [0, R*E) also gives zeros and lowers *error_pos (initialised to
// INT64_MAX by the host) to the smallest flat position of such an id, for the host to report.
//
// Three variants of the row copy (kVariant):
//   kIlp (0): the rows are one flat list of 16-byte chunks and each thread first resolves, then
//     loads kUnroll chunks before storing any, so kUnroll * blockDim.x * 16 bytes are in flight
//     per CTA (what hides the ~1-2 us latency of host reads with few SMs);
//   kWarp (1): each warp copies one row at a time, a lane per 16-byte chunk (few bytes in
//     flight per SM: latency-bound on host memory);
//   kBulk (2): each warp moves batches of kRowsPerStage rows with bulk asynchronous copies
//     (cp.async.bulk global -> shared, completing on an mbarrier, then shared -> global),
//     kStages batches in flight per warp: up to the whole shared memory of the SM in flight
//     with 4 warps;
//   kTile (3): rows in tiles of blockDim.x * kUnroll * 16 bytes; the tile's rows are resolved
//     once (one thread per row, 32-bit arithmetic where ids fit) into shared memory while the
//     previous tile is copied, then every thread loads kUnroll 16-byte chunks before storing any:
//     the ilp variant without the per-chunk index load and 64-bit division;
//   kTileSorted (6): the tile variant over ids sorted by the host side, with `order` giving
//     each sorted id's position in the output (rows of nearby ids are read together: fewer
//     distinct pages at a time);
//   kRing (4) / kRingBulk (5): each warp keeps a ring of kStages slots of kRowsPerStage rows in
//     shared memory, filled by bulk asynchronous copies (one lane per row, one mbarrier per slot)
//     with kStages - 1 (kRing) or kStages - 2 (kRingBulk) slots loading while the oldest is
//     written out: kRing writes it with 16-byte stores from shared memory (the slot is free again
//     at once), kRingBulk with one bulk shared -> global copy per slot (the batch's rows are
//     contiguous in the output). Zero rows are written into the slot, so a slot is always
//     written out whole. The ids of batch k + 1 are loaded while batch k is issued (their load
//     latency is off the critical path).
//   kWide (7): each warp copies groups of kGroupRows rows whose kUnroll * 32 16-byte chunks a
//     lane loads all before it stores any (kUnroll chunks per lane in flight); the ids of the
//     warp's next group are loaded while the current one is copied, each row's address is
//     resolved once by one lane and passed by shuffle. Rows larger than kUnroll * 512 bytes take
//     several groups' worth of chunks per row, one group of one row at a time.
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>

namespace ep_engram {

__device__ __forceinline__ int4 ld_nc_v4(const void* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void st_na_v4(void* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Resolves global id `g`: returns the owner's base address (+ the row's offset), or 0 for a zero
// row; a bad id also records `item` in *error_pos when `report` is set.
template <int kRowBytes>
__device__ __forceinline__ const char* row_address(long long g, long long item, bool report,
                                                   const unsigned long long* bases,
                                                   long long entries, long long num_rows,
                                                   long long* error_pos) {
    if (g >= 0 && g < num_rows) {
        const long long owner = g / entries;
        const long long local = g - owner * entries;
        return reinterpret_cast<const char*>(bases[owner]) + local * kRowBytes;
    }
    if (g != -1 && report) atomicMin(error_pos, item);
    return nullptr;
}

enum : int {
    kIlp = 0,
    kWarp = 1,
    kBulk = 2,
    kTile = 3,
    kRing = 4,
    kRingBulk = 5,
    kTileSorted = 6,
    kWide = 7,
};

// Like row_address, with 32-bit division when the ids fit (the common case: a 64-bit division
// is a long instruction sequence, a 32-bit one a few).
template <int kRowBytes>
__device__ __forceinline__ const char* row_address_fast(long long g, long long item,
                                                        const unsigned long long* bases,
                                                        long long entries, long long num_rows,
                                                        long long* error_pos) {
    if (g >= 0 && g < num_rows) {
        long long owner, local;
        if (num_rows <= 0xffffffffll) {
            const uint32_t g32 = static_cast<uint32_t>(g);
            const uint32_t e32 = static_cast<uint32_t>(entries);
            owner = g32 / e32;
            local = g32 - static_cast<uint32_t>(owner) * e32;
        } else {
            owner = g / entries;
            local = g - owner * entries;
        }
        return reinterpret_cast<const char*>(bases[owner]) + local * kRowBytes;
    }
    if (g != -1) atomicMin(error_pos, item);
    return nullptr;
}

__device__ __forceinline__ int4 ld_shared_v4(const void* p) {
    int4 v;
    asm volatile("ld.shared.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(ep_jit::smem_addr(p)));
    return v;
}

__device__ __forceinline__ void st_shared_v4(void* p, const int4& v) {
    asm volatile("st.shared.v4.s32 [%0], {%1, %2, %3, %4};" ::"r"(ep_jit::smem_addr(p)), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Writes one zero row with 16-byte stores (ids -1 and bad ids in the bulk variant).
template <int kRowBytes>
__device__ __forceinline__ void zero_row(char* row) {
    const int4 zero = make_int4(0, 0, 0, 0);
#pragma unroll 4
    for (int c = 0; c < kRowBytes / 16; ++c) st_na_v4(row + c * 16, zero);
}

// The bulk variant's copy loop for one warp (see the file comment). Shared memory: per warp,
// kStages stages of kRowsPerStage rows; static: one mbarrier per stage.
template <typename IndexT, int kRowBytes, int kStages, int kRowsPerStage>
__device__ __forceinline__ void bulk_copy(const IndexT* indices, char* dst, long long* error_pos,
                                          const unsigned long long* bases, long long num_items,
                                          long long entries, long long num_rows) {
    static_assert(kRowsPerStage >= 1 && kRowsPerStage <= 32, "one row per lane at most");
    constexpr int kMaxWarps = 32;
    extern __shared__ __align__(128) unsigned char smem_rows[];
    __shared__ __align__(8) uint64_t bars[kMaxWarps * kStages];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    uint64_t* my_bars = bars + warp * kStages;
    unsigned char* my_rows =
        smem_rows + static_cast<size_t>(warp) * kStages * kRowsPerStage * kRowBytes;
    if (lane == 0) {
        for (int s = 0; s < kStages; ++s) ep_jit::mbar_init(&my_bars[s], 1);
        ep_jit::fence_mbar_init();
    }
    __syncwarp();
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
    const long long first = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + warp;
    auto batch_item = [&](long long k) { return (first + k * warps) * kRowsPerStage + lane; };
    auto slot = [&](long long k) {
        return my_rows + (static_cast<size_t>(k % kStages) * kRowsPerStage + lane) * kRowBytes;
    };
    // Waits for batch k's loads and stores its rows (each lane its own row).
    auto drain = [&](long long k) {
        const int s = static_cast<int>(k % kStages);
        const uint32_t parity = static_cast<uint32_t>((k / kStages) & 1);
        while (!ep_jit::mbar_try_wait(&my_bars[s], parity)) {
        }
        const long long item = batch_item(k);
        if (lane < kRowsPerStage && item < num_items) {
            const long long g = static_cast<long long>(indices[item]);
            if (g >= 0 && g < num_rows) ep_jit::tma_store(dst + item * kRowBytes, slot(k), kRowBytes);
        }
        ep_jit::tma_commit();
    };
    long long k = 0;
    for (;; ++k) {
        if ((first + k * warps) * kRowsPerStage >= num_items) break;
        // This lane's stores of the batch that used the stage before have read their rows.
        ep_jit::tma_wait_read<0>();
        __syncwarp();
        const long long item = batch_item(k);
        const char* src = nullptr;
        if (lane < kRowsPerStage && item < num_items) {
            const long long g = static_cast<long long>(indices[item]);
            src = row_address<kRowBytes>(g, item, true, bases, entries, num_rows, error_pos);
            if (src == nullptr) zero_row<kRowBytes>(dst + item * kRowBytes);
        }
        const unsigned loading = __ballot_sync(0xffffffffu, src != nullptr);
        const int s = static_cast<int>(k % kStages);
        if (lane == 0) ep_jit::mbar_expect_tx(&my_bars[s], __popc(loading) * kRowBytes);
        __syncwarp();
        if (src != nullptr) ep_jit::tma_load(slot(k), src, kRowBytes, &my_bars[s]);
        if (k >= kStages - 1) drain(k - (kStages - 1));
    }
    for (long long d = k > kStages - 1 ? k - (kStages - 1) : 0; d < k; ++d) drain(d);
    ep_jit::tma_wait_all();
}

// The tile variants (see the file comment). Shared memory: two tiles of row addresses (static),
// and with `kSorted` two tiles of destination rows.
template <typename IndexT, int kRowBytes, int kUnroll, bool kSorted>
__device__ __forceinline__ void tile_copy(const IndexT* indices, const long long* order, char* dst,
                                          long long* error_pos, const unsigned long long* bases,
                                          long long num_items, long long entries,
                                          long long num_rows) {
    constexpr int kChunks = kRowBytes / 16;
    // Rows per tile: what blockDim.x * kUnroll chunks hold, at least 1, at most one per thread
    // (each row is resolved by one thread); the array is sized for 1024 threads.
    constexpr int kFit = (1024 * kUnroll * 16) / kRowBytes;
    constexpr int kMaxTileRows = kFit < 1 ? 1 : (kFit > 1024 ? 1024 : kFit);
    __shared__ const char* s_src[2][kMaxTileRows];
    __shared__ char* s_dst[2][kSorted ? kMaxTileRows : 1];
    int tile_rows = static_cast<int>(blockDim.x) * kUnroll * 16 / kRowBytes;
    tile_rows = tile_rows < 1 ? 1 : tile_rows;
    tile_rows = tile_rows > static_cast<int>(blockDim.x) ? static_cast<int>(blockDim.x) : tile_rows;
    tile_rows = tile_rows > kMaxTileRows ? kMaxTileRows : tile_rows;
    const long long num_tiles = (num_items + tile_rows - 1) / tile_rows;
    const int4 zero = make_int4(0, 0, 0, 0);
    long long t = blockIdx.x;
    if (t >= num_tiles) return;
    // This thread's row of a tile (threads >= tile_rows resolve nothing).
    auto resolve = [&](long long tile, int buf, long long g, long long pos) {
        const long long item = tile * tile_rows + threadIdx.x;
        if (static_cast<int>(threadIdx.x) < tile_rows) {
            if (!kSorted) pos = item;
            s_src[buf][threadIdx.x] =
                item < num_items
                    ? row_address_fast<kRowBytes>(g, pos, bases, entries, num_rows, error_pos)
                    : nullptr;
            if constexpr (kSorted) s_dst[buf][threadIdx.x] = dst + pos * kRowBytes;
        }
    };
    auto load_pos = [&](long long tile) -> long long {
        const long long item = tile * tile_rows + threadIdx.x;
        return kSorted && static_cast<int>(threadIdx.x) < tile_rows && item < num_items
                   ? order[item]
                   : 0ll;
    };
    auto load_id = [&](long long tile) -> long long {
        const long long item = tile * tile_rows + threadIdx.x;
        return static_cast<int>(threadIdx.x) < tile_rows && item < num_items
                   ? static_cast<long long>(indices[item])
                   : -1ll;
    };
    resolve(t, 0, load_id(t), load_pos(t));
    __syncthreads();
    for (int buf = 0; t < num_tiles; t += gridDim.x, buf ^= 1) {
        const long long next = t + gridDim.x;
        // Issued now, used after the copy: the id load's latency hides behind the tile's.
        const long long g_next = next < num_tiles ? load_id(next) : -1ll;
        const long long pos_next = next < num_tiles ? load_pos(next) : 0ll;
        const long long first = t * tile_rows;
        const long long rows_here = num_items - first < tile_rows ? num_items - first : tile_rows;
        const int chunks = static_cast<int>(rows_here) * kChunks;
        char* out = dst + first * kRowBytes + threadIdx.x * 16;
        const int step = blockDim.x;
        for (int base = threadIdx.x; base < chunks; base += step * kUnroll) {
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int q = base + u * step;
                v[u] = zero;
                if (q < chunks) {
                    const int row = q / kChunks;
                    const char* src = s_src[buf][row];
                    if (src != nullptr) v[u] = ld_nc_v4(src + (q - row * kChunks) * 16);
                }
            }
            const int left = chunks - base;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                if (u * step < left) {
                    if constexpr (kSorted) {
                        const int q = base + u * step;
                        const int row = q / kChunks;
                        st_na_v4(s_dst[buf][row] + (q - row * kChunks) * 16, v[u]);
                    } else {
                        st_na_v4(out + (base - static_cast<int>(threadIdx.x) + u * step) * 16ll, v[u]);
                    }
                }
            }
        }
        if (next < num_tiles) resolve(next, buf ^ 1, g_next, pos_next);
        __syncthreads();
    }
}

// The ring variants (see the file comment). Shared memory: per warp, kStages slots of
// kRowsPerStage rows (dynamic); static: one mbarrier per slot.
template <typename IndexT, int kRowBytes, int kStages, int kRowsPerStage, bool kBulkStore>
__device__ __forceinline__ void ring_copy(const IndexT* indices, char* dst, long long* error_pos,
                                          const unsigned long long* bases, long long num_items,
                                          long long entries, long long num_rows) {
    static_assert(kRowsPerStage >= 1 && kRowsPerStage <= 32, "one row per lane at most");
    static_assert(kStages >= (kBulkStore ? 3 : 2), "too few slots for the ring");
    constexpr int kMaxWarps = 32;
    constexpr int kChunks = kRowBytes / 16;
    constexpr int kSlotBytes = kRowsPerStage * kRowBytes;
    // Slots loading while the oldest is written out: a bulk store keeps its slot one step longer.
    constexpr int kAhead = kBulkStore ? kStages - 2 : kStages - 1;
    extern __shared__ __align__(128) unsigned char smem_rows[];
    __shared__ __align__(8) uint64_t ring_bars[kMaxWarps * kStages];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    uint64_t* my_bars = ring_bars + warp * kStages;
    unsigned char* my_slots = smem_rows + static_cast<size_t>(warp) * kStages * kSlotBytes;
    if (lane == 0) {
        for (int s = 0; s < kStages; ++s) ep_jit::mbar_init(&my_bars[s], 1);
        ep_jit::fence_mbar_init();
    }
    __syncwarp();
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
    const long long first = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + warp;
    auto batch_first = [&](long long k) { return (first + k * warps) * kRowsPerStage; };
    // Waits for batch k's loads and writes the slot out (its rows are contiguous in `dst`).
    auto drain = [&](long long k) {
        const int s = static_cast<int>(k % kStages);
        const uint32_t parity = static_cast<uint32_t>((k / kStages) & 1);
        while (!ep_jit::mbar_try_wait(&my_bars[s], parity)) {
        }
        const long long item0 = batch_first(k);
        const long long left = num_items - item0;
        const int rows = left < kRowsPerStage ? static_cast<int>(left) : kRowsPerStage;
        unsigned char* slot = my_slots + static_cast<size_t>(s) * kSlotBytes;
        char* out = dst + item0 * kRowBytes;
        if constexpr (kBulkStore) {
            if (lane == 0) {
                ep_jit::tma_store(out, slot, static_cast<uint32_t>(rows) * kRowBytes);
                ep_jit::tma_commit();
            }
        } else {
            // Four shared loads in flight per lane before their global stores.
            const int chunks = rows * kChunks;
            for (int c = lane; c < chunks; c += 4 * 32) {
                int4 v[4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (c + u * 32 < chunks) v[u] = ld_shared_v4(slot + (c + u * 32) * 16);
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    if (c + u * 32 < chunks) st_na_v4(out + (c + u * 32) * 16, v[u]);
            }
            __syncwarp();
        }
    };
    // This lane's id of batch k (-1 past the end), loaded one batch ahead.
    auto load_id = [&](long long k) -> long long {
        const long long item = batch_first(k) + lane;
        return lane < kRowsPerStage && item < num_items ? static_cast<long long>(indices[item])
                                                        : -1ll;
    };
    long long g_next = load_id(0);
    long long k = 0;
    for (;; ++k) {
        const long long item0 = batch_first(k);
        if (item0 >= num_items) break;
        const long long g_here = g_next;
        g_next = load_id(k + 1);
        const int s = static_cast<int>(k % kStages);
        unsigned char* slot = my_slots + static_cast<size_t>(s) * kSlotBytes;
        if constexpr (kBulkStore) {
            // The bulk store of batch k - kStages (committed kStages - kAhead - 1 groups ago at
            // the latest) has read the slot.
            if (lane == 0) ep_jit::tma_wait_read<kStages - kAhead - 1>();
            __syncwarp();
        }
        const long long item = item0 + lane;
        const char* src = nullptr;
        if (lane < kRowsPerStage && item < num_items) {
            src = row_address_fast<kRowBytes>(g_here, item, bases, entries, num_rows, error_pos);
            if (src == nullptr) {
                const int4 zero = make_int4(0, 0, 0, 0);
                unsigned char* row = slot + lane * kRowBytes;
#pragma unroll 4
                for (int c = 0; c < kChunks; ++c) st_shared_v4(row + c * 16, zero);
                if constexpr (kBulkStore) ep_jit::fence_proxy_async_smem();
            }
        }
        const unsigned loading = __ballot_sync(0xffffffffu, src != nullptr);
        if (lane == 0) ep_jit::mbar_expect_tx(&my_bars[s], __popc(loading) * kRowBytes);
        __syncwarp();
        if (src != nullptr) ep_jit::tma_load(slot + lane * kRowBytes, src, kRowBytes, &my_bars[s]);
        if (k >= kAhead) drain(k - kAhead);
    }
    for (long long d = k > kAhead ? k - kAhead : 0; d < k; ++d) drain(d);
    if constexpr (kBulkStore) {
        if (lane == 0) ep_jit::tma_wait_all();
    }
}

// The wide variant (see the file comment). No shared memory beyond the owners' bases.
template <typename IndexT, int kRowBytes, int kUnroll>
__device__ __forceinline__ void wide_copy(const IndexT* indices, char* dst, long long* error_pos,
                                          const unsigned long long* bases, long long num_items,
                                          long long entries, long long num_rows) {
    constexpr int kChunks = kRowBytes / 16;
    // Rows per group: what kUnroll chunks per lane cover, 1..32 (one resolving lane per row).
    constexpr int kFit = 32 * kUnroll / kChunks;
    constexpr int kGroupRows = kFit < 1 ? 1 : (kFit > 32 ? 32 : kFit);
    constexpr int kGroupChunks = kGroupRows * kChunks;
    // Chunks in flight per lane and step: all of a group, or kUnroll of a row larger than that.
    constexpr int kStep = kGroupChunks < 32 * kUnroll ? (kGroupChunks + 31) / 32 : kUnroll;
    const int lane = threadIdx.x % 32;
    const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
    const long long num_groups = (num_items + kGroupRows - 1) / kGroupRows;
    auto load_id = [&](long long group) -> long long {
        const long long item = group * kGroupRows + lane;
        return group < num_groups && lane < kGroupRows && item < num_items
                   ? static_cast<long long>(indices[item])
                   : -1ll;
    };
    const int4 zero = make_int4(0, 0, 0, 0);
    long long group = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    long long g_next = load_id(group);
    for (; group < num_groups; group += warps) {
        const long long g = g_next;
        g_next = load_id(group + warps);
        const long long first = group * kGroupRows;
        const long long item = first + lane;
        const char* mine = nullptr;
        if (lane < kGroupRows && item < num_items)
            mine = row_address_fast<kRowBytes>(g, item, bases, entries, num_rows, error_pos);
        const long long rows_here = num_items - first < kGroupRows ? num_items - first : kGroupRows;
        const int chunks = static_cast<int>(rows_here) * kChunks;
        char* out = dst + first * kRowBytes;
        for (int base = 0; base < chunks; base += 32 * kStep) {
            int4 v[kStep];
#pragma unroll
            for (int u = 0; u < kStep; ++u) {
                const int q = base + u * 32 + lane;
                const int row = q / kChunks;
                // Every lane takes part in the shuffle; lanes past the group read nothing.
                const unsigned long long a = __shfl_sync(
                    0xffffffffu, reinterpret_cast<unsigned long long>(mine), row < 32 ? row : 0);
                v[u] = zero;
                if (q < chunks && a != 0ull)
                    v[u] = ld_nc_v4(reinterpret_cast<const char*>(a) + (q - row * kChunks) * 16);
            }
#pragma unroll
            for (int u = 0; u < kStep; ++u) {
                const int q = base + u * 32 + lane;
                if (q < chunks) st_na_v4(out + q * 16ll, v[u]);
            }
        }
    }
}

// Ranks a node can hold (the owners' base addresses are staged in shared memory).
constexpr int kMaxRanks = 64;

template <typename IndexT, int kRowBytes, int kNumSfPacks, bool kSfColMajor, int kUnroll, int kVariant, int kStages, int kRowsPerStage>
__device__ __forceinline__ void gather(const void* indices_raw, void* out, void* out_sf,
                                       long long* error_pos,
                                       const unsigned long long* rows_base,
                                       const unsigned long long* sf_base, long long num_items,
                                       long long entries, long long per_token, long long sf_ld,
                                       int num_ranks, const long long* order) {
    // order: nullptr, or (kTileSorted) the output position of each (sorted) id.
    static_assert(kRowBytes % 16 == 0, "rows are copied in 16-byte chunks");
    const IndexT* indices = static_cast<const IndexT*>(indices_raw);
    constexpr int kChunks = kRowBytes / 16;
    __shared__ unsigned long long s_rows[kMaxRanks];
    __shared__ unsigned long long s_sf[kMaxRanks];
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
        s_rows[r] = rows_base[r];
        s_sf[r] = kNumSfPacks > 0 ? sf_base[r] : 0ull;
    }
    __syncthreads();
    const long long num_rows = entries * num_ranks;
    char* dst = reinterpret_cast<char*>(out);
    const int4 zero = make_int4(0, 0, 0, 0);

    if constexpr (kVariant == kTile || kVariant == kTileSorted) {
        tile_copy<IndexT, kRowBytes, kUnroll, kVariant == kTileSorted>(
            indices, order, dst, error_pos, s_rows, num_items, entries, num_rows);
    } else if constexpr (kVariant == kRing || kVariant == kRingBulk) {
        ring_copy<IndexT, kRowBytes, kStages, kRowsPerStage, kVariant == kRingBulk>(
            indices, dst, error_pos, s_rows, num_items, entries, num_rows);
    } else if constexpr (kVariant == kWide) {
        wide_copy<IndexT, kRowBytes, kUnroll>(indices, dst, error_pos, s_rows, num_items, entries,
                                              num_rows);
    } else if constexpr (kVariant == kBulk) {
        bulk_copy<IndexT, kRowBytes, kStages, kRowsPerStage>(indices, dst, error_pos, s_rows,
                                                             num_items, entries, num_rows);
    } else if constexpr (kVariant == kWarp) {
        const int lane = threadIdx.x % 32;
        const long long warps = static_cast<long long>(gridDim.x) * (blockDim.x / 32);
        for (long long item = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; item < num_items;
             item += warps) {
            const long long g = static_cast<long long>(indices[item]);
            const char* src =
                row_address<kRowBytes>(g, item, lane == 0, s_rows, entries, num_rows, error_pos);
            char* row = dst + item * kRowBytes;
            for (int c = lane; c < kChunks; c += 32) {
                const int4 v = src != nullptr ? ld_nc_v4(src + c * 16) : zero;
                st_na_v4(row + c * 16, v);
            }
        }
    } else {
        const long long total = num_items * kChunks;
        const long long tile = static_cast<long long>(blockDim.x) * kUnroll;
        for (long long base = blockIdx.x * tile; base < total; base += gridDim.x * tile) {
            const char* src[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const long long q = base + u * blockDim.x + threadIdx.x;
                src[u] = nullptr;
                if (q < total) {
                    const long long item = q / kChunks;
                    const int c = static_cast<int>(q - item * kChunks);
                    const long long g = static_cast<long long>(indices[item]);
                    const char* row =
                        row_address<kRowBytes>(g, item, c == 0, s_rows, entries, num_rows, error_pos);
                    src[u] = row != nullptr ? row + c * 16 : nullptr;
                }
            }
            int4 v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) v[u] = src[u] != nullptr ? ld_nc_v4(src[u]) : zero;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const long long q = base + u * blockDim.x + threadIdx.x;
                if (q < total) st_na_v4(dst + q * 16, v[u]);
            }
        }
    }

    if constexpr (kNumSfPacks > 0) {
        // Scales: 4-byte packs, kept in the owners' GPU segments.
        const long long total = num_items * kNumSfPacks;
        uint32_t* sf = reinterpret_cast<uint32_t*>(out_sf);
        for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < total;
             j += static_cast<long long>(gridDim.x) * blockDim.x) {
            const long long item = j / kNumSfPacks;
            const int p = static_cast<int>(j - item * kNumSfPacks);
            const long long g = static_cast<long long>(indices[item]);
            const long long at = kVariant == kTileSorted ? order[item] : item;
            uint32_t value = 0;
            if (g >= 0 && g < num_rows) {
                const long long owner = g / entries;
                const long long local = g - owner * entries;
                value = reinterpret_cast<const uint32_t*>(s_sf[owner])[local * kNumSfPacks + p];
            }
            if constexpr (kSfColMajor) {
                const long long t = at / per_token;
                const long long k = at - t * per_token;
                sf[(k * kNumSfPacks + p) * sf_ld + t] = value;
            } else {
                sf[at * kNumSfPacks + p] = value;
            }
        }
    }
}

}  // namespace ep_engram
