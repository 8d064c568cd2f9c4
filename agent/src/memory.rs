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
//!
//! [`tune`] also turns transparent huge pages off for the agent's process
//! (`PR_SET_THP_DISABLE`). Debian's arm64 kernel (what `cargo xtask image` installs) has THP set
//! to `always`: every anonymous region an idle agent touches (each thread's malloc arena, tokio's
//! and sled's buffers) got whole 2 MiB pages, and the idle agent inside the rpi4 image held
//! 32.5 MB of anonymous memory instead of ~2 MB (`cargo xtask bench rss --image rpi4`; on an
//! x86_64 host with THP set to `always`, idle PSS 21.8-23.9 MB against 9.6-9.7 MB with it off).
//! An agent that idles between small messages gains nothing from huge pages.

/// Blocks from this size on get their own mapping: big buffers never linger in the arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes the mmap threshold and turns transparent huge pages off for this process. Call once
/// at start, before other threads allocate.
#[allow(unsafe_code)] // three libc calls with no pointers; nothing else here is unsafe
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = turn_huge_pages_off() {
        // A kernel before 3.15 (or qemu-user, which passes only some prctl options on) refuses;
        // the agent runs as before.
        tracing::debug!("transparent huge pages stay as the kernel sets them: prctl: {e}");
    }
}

/// Sets `PR_SET_THP_DISABLE` for this process; the error is the kernel's (EINVAL where the
/// option is unknown).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // as in `tune`
fn turn_huge_pages_off() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only sets a flag of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// Whether transparent huge pages are off for this process (what [`super::tune`] sets).
    #[allow(unsafe_code)] // as in `tune`
    fn huge_pages_off() -> bool {
        // SAFETY: prctl with integer arguments; the call only reads the flag.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }

    #[test]
    fn tune_turns_huge_pages_off() {
        match super::turn_huge_pages_off() {
            Ok(()) => {}
            // qemu-user (the aarch64 test step) does not pass this prctl on to the host kernel.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipped: this kernel or emulator refuses PR_SET_THP_DISABLE: {e}");
                return;
            }
            Err(e) => panic!("prctl(PR_SET_THP_DISABLE): {e}"),
        }
        super::tune();
        assert!(huge_pages_off());
    }
}
