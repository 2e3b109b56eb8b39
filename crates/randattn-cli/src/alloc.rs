//! The binary's allocator settings: the counting allocator (`randattn::counting`), so that
//! `bench` can report the peak memory a method allocates beyond its inputs, and glibc's reuse
//! of freed memory.

pub use randattn::counting::{Counting, peak_since, start};

/// Makes the C allocator keep freed memory for reuse, as a long-running process that calls the
/// same kernels again and again ends up doing. By default glibc maps every allocation above its
/// (at most 32 MiB) mmap threshold afresh and returns it on free, so at n = 16384 (B·H = 8, d = 64:
/// 32 MiB per output tensor) every call pays about a page fault per 4 KiB of its outputs —
/// measured 6.6 of 9.5 ms of V-Mean's forward — which would make the timings scale
/// super-linearly for reasons that have nothing to do with the methods. Returns whether glibc
/// accepted the settings.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning parameters; it is called before any
        // timing, from the main thread.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
