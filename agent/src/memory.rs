//! The allocator's settings for an agent that handles big buffers now and then (the weights of a
//! federated round, a model being swapped in) and idles in between.
//!
//! glibc's malloc serves blocks of at least its mmap threshold from their own mappings, which go
//! back to the kernel when freed. By default the threshold follows the largest block freed (up
//! to 32 MiB on 64-bit), so after the first round a round's buffers come from the heap arenas
//! instead, and what a round frees stays there: in `cargo xtask bench fl-large` the agent kept
//! 20-40 MiB of freed arena memory for a 4 MiB model. [`tune`] fixes the threshold; [`release`]
//! hands back what the arenas hold free after a round (`malloc_trim`). Both are no-ops where the
//! C library is not glibc.

/// Blocks from this size on get their own mapping: big buffers never linger in the arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes the mmap threshold. Call once at start, before other threads allocate.
#[allow(unsafe_code)] // two libc calls with no pointers; nothing else here is unsafe
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns the arenas' free memory to the kernel (after a round's big buffers are dropped).
#[allow(unsafe_code)] // as in `tune`
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
