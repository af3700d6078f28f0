// Grouping of row ids by bucket on a few CTAs: a counting sort ahead of the tile_sorted gather,
// so that rows of one bucket of the table (about one 2 MiB translation granule of the host
// segment) are read together.
//
// Bucket of id g: g >> shift for 0 <= g < num_rows; every other id (-1 and bad ids) falls in the
// last bucket, num_buckets - 1 (the host picks shift so that (num_rows - 1) >> shift is below it).
// Ids keep their values: bad ids reach the gather unchanged, which reports them.
//
// Two launches on the same grid of C CTAs; CTA c owns the contiguous slice [c*S, min(N, (c+1)*S))
// of the N ids, S = ceil(N / C):
//   bucket_count: CTA c counts the buckets of its slice in shared memory and writes them to
//     counts[c][0, num_buckets) (every entry, so the scratch needs no clearing);
//   bucket_scatter: each CTA sums the counts of every CTA per bucket (the bucket's size) and of
//     the CTAs before it (its own start inside the bucket), scans the sizes over the buckets in
//     shared memory, then moves its slice: grouped[p] = ids[i], order[p] = i, p taken from the
//     bucket's cursor by a shared atomic, one per warp and bucket (lanes of one bucket share it,
//     so hot rows and runs of -1 cost one atomic per warp).
// Within a bucket CTA c's ids come before CTA c+1's; inside one CTA their order may vary between
// runs. No grid-wide synchronisation: the launch boundary orders the two steps.
#pragma once

#include <cuda/std/cstdint>

namespace ep_engram {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int bucket_of(long long g, long long num_rows, int shift, int last) {
    return g >= 0 && g < num_rows ? static_cast<int>(g >> shift) : last;
}

// This CTA's slice of the ids.
__device__ __forceinline__ void bucket_slice(long long num_items, long long& begin,
                                             long long& end) {
    const long long per = (num_items + gridDim.x - 1) / gridDim.x;
    begin = per * blockIdx.x;
    end = begin + per < num_items ? begin + per : num_items;
}

template <typename IndexT, int kMaxBuckets>
__device__ __forceinline__ void bucket_count(const void* ids_raw, int* counts, long long num_items,
                                             long long num_rows, int shift, int num_buckets) {
    __shared__ int s_count[kMaxBuckets];
    const IndexT* ids = static_cast<const IndexT*>(ids_raw);
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) s_count[b] = 0;
    __syncthreads();
    long long begin, end;
    bucket_slice(num_items, begin, end);
    const int lane = threadIdx.x % 32;
    const int last = num_buckets - 1;
    // Whole warps step together so that every lane takes part in the match.
    for (long long base = begin + (threadIdx.x - lane); base < end; base += blockDim.x) {
        const long long i = base + lane;
        const int b = i < end ? bucket_of(static_cast<long long>(ids[i]), num_rows, shift, last) : -1;
        const unsigned peers = __match_any_sync(kFullMask, b);
        if (b >= 0 && lane == __ffs(peers) - 1) atomicAdd(&s_count[b], __popc(peers));
    }
    __syncthreads();
    int* mine = counts + static_cast<long long>(blockIdx.x) * num_buckets;
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) mine[b] = s_count[b];
}

template <typename IndexT, int kMaxBuckets>
__device__ __forceinline__ void bucket_scatter(const void* ids_raw, void* grouped_raw,
                                               long long* order, const int* counts,
                                               long long num_items, long long num_rows, int shift,
                                               int num_buckets) {
    constexpr int kMaxThreads = 1024;
    constexpr int kMaxRun = (kMaxBuckets + kMaxThreads - 1) / kMaxThreads;
    __shared__ int s_next[kMaxBuckets];
    __shared__ int s_warp[kMaxThreads / 32];
    const IndexT* ids = static_cast<const IndexT*>(ids_raw);
    IndexT* grouped = static_cast<IndexT*>(grouped_raw);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = (blockDim.x + 31) / 32;

    // Each thread owns a run of consecutive buckets: their sizes, and this CTA's start in each.
    const int run = (num_buckets + blockDim.x - 1) / blockDim.x;
    const int first = threadIdx.x * run;
    int size[kMaxRun];
    int before[kMaxRun];
    int run_total = 0;
#pragma unroll
    for (int j = 0; j < kMaxRun; ++j) {
        size[j] = 0;
        before[j] = 0;
        const int b = first + j;
        if (j < run && b < num_buckets) {
            for (int c = 0; c < static_cast<int>(gridDim.x); ++c) {
                const int n = counts[static_cast<long long>(c) * num_buckets + b];
                size[j] += n;
                if (c < static_cast<int>(blockIdx.x)) before[j] += n;
            }
        }
        run_total += size[j];
    }
    // Exclusive scan of the runs over the CTA: within the warp, then over the warps.
    int inclusive = run_total;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
        const int v = __shfl_up_sync(kFullMask, inclusive, d);
        if (lane >= d) inclusive += v;
    }
    if (lane == 31) s_warp[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const int own = lane < num_warps ? s_warp[lane] : 0;
        int acc = own;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const int v = __shfl_up_sync(kFullMask, acc, d);
            if (lane >= d) acc += v;
        }
        if (lane < num_warps) s_warp[lane] = acc - own;
    }
    __syncthreads();
    int start = s_warp[warp] + inclusive - run_total;
#pragma unroll
    for (int j = 0; j < kMaxRun; ++j) {
        const int b = first + j;
        if (j < run && b < num_buckets) s_next[b] = start + before[j];
        start += size[j];
    }
    __syncthreads();

    long long begin, end;
    bucket_slice(num_items, begin, end);
    const int last = num_buckets - 1;
    const unsigned below = (1u << lane) - 1u;
    for (long long base = begin + (threadIdx.x - lane); base < end; base += blockDim.x) {
        const long long i = base + lane;
        const IndexT g = i < end ? ids[i] : static_cast<IndexT>(0);
        const int b = i < end ? bucket_of(static_cast<long long>(g), num_rows, shift, last) : -1;
        const unsigned peers = __match_any_sync(kFullMask, b);
        const int leader = __ffs(peers) - 1;
        int at = 0;
        if (b >= 0 && lane == leader) at = atomicAdd(&s_next[b], __popc(peers));
        at = __shfl_sync(kFullMask, at, leader);
        if (b >= 0) {
            const int p = at + __popc(peers & below);
            grouped[p] = g;
            order[p] = i;
        }
    }
}

}  // namespace ep_engram
