// PTX wrappers for memory-model operations on peer-mapped (NVLink) memory.
//
// Plain loads and stores give no ordering across GPUs; these helpers spell out the scope
// (.sys: every GPU and the host, .gpu: this GPU) and the semantics (acquire/release/relaxed)
// the kernels rely on, so the intent is visible at every call site.
#pragma once

#include <cuda/std/cstdint>

namespace ep_jit {

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* ptr) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ int32_t ld_acquire_sys(const int32_t* ptr) {
  return static_cast<int32_t>(ld_acquire_sys(reinterpret_cast<const uint32_t*>(ptr)));
}

__device__ __forceinline__ uint32_t ld_relaxed_sys(const uint32_t* ptr) {
  uint32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* ptr) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* ptr, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(int32_t* ptr, int32_t v) {
  st_release_sys(reinterpret_cast<uint32_t*>(ptr), static_cast<uint32_t>(v));
}

__device__ __forceinline__ void st_relaxed_sys(uint32_t* ptr, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// Adds without returning the old value (a reduction), with release semantics at system scope.
__device__ __forceinline__ void red_add_release_sys(uint32_t* ptr, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t atom_add_acq_rel_sys(uint32_t* ptr, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.sys.global.add.u32 %0, [%1], %2;"
               : "=r"(old)
               : "l"(ptr), "r"(v)
               : "memory");
  return old;
}

__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

// Nanoseconds of the GPU global timer: independent of the SM clock, so timeouts in seconds
// mean seconds whatever the clocks do.
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

}  // namespace ep_jit
