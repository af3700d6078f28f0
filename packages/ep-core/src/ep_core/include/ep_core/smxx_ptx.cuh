// The device helpers the EP kernels use, all written once in ep-jit: system-scope
// acquire/release and relaxed accesses, TMA bulk copies and mbarriers, named barriers and proxy
// fences (<ep_jit/smxx_ptx.cuh>), the timed waits of the one timeout system
// (<ep_jit/smxx_timeout.cuh>) and epoch-tagged signal words (<ep_jit/smxx_signal.cuh>).
#pragma once

#include <cuda/std/cstdint>

#include <ep_jit/smxx_ptx.cuh>
#include <ep_jit/smxx_signal.cuh>
#include <ep_jit/smxx_timeout.cuh>

namespace ep_core {

using ep_jit::aborted;
using ep_jit::ErrorRecord;
using ep_jit::fence_acq_rel_sys;
using ep_jit::fence_mbar_init;
using ep_jit::fence_proxy_async;
using ep_jit::fence_proxy_async_smem;
using ep_jit::kTagRefreshPeriod;
using ep_jit::ld_acquire_sys;
using ep_jit::ld_relaxed_sys;
using ep_jit::ld_volatile;
using ep_jit::mbar_expect_tx;
using ep_jit::mbar_init;
using ep_jit::mbar_try_wait;
using ep_jit::named_barrier;
using ep_jit::red_add_relaxed_sys;
using ep_jit::red_add_release_sys;
using ep_jit::refresh_tags;
using ep_jit::smem_addr;
using ep_jit::spin_acquire;
using ep_jit::st_relaxed_sys;
using ep_jit::st_release_sys;
using ep_jit::tag_refresh_epoch;
using ep_jit::tma_commit;
using ep_jit::tma_load;
using ep_jit::tma_store;
using ep_jit::tma_wait_all;
using ep_jit::tma_wait_group_dyn;
using ep_jit::tma_wait_read;
using ep_jit::wait_geq;
using ep_jit::wait_mbar;
using ep_jit::wait_tag;
using ep_jit::WaitContext;
using ep_jit::warp_wait_tag;

}  // namespace ep_core
