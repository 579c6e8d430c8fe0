//! How glibc's allocator gives memory back. By default it returns the free top
//! of a heap to the kernel once more than 128 KiB is free there; a busy tunnel
//! frees and allocates 32-64 KiB packet and copy buffers all the time, so each
//! return was followed by page faults to zero-fill the same pages again (about
//! a tenth of the tunnel ends' CPU on bulk transfers, `perf`: `heap_trim`,
//! `madvise`, `exc_page_fault`, `clear_page`).

/// Free heap kept before it is returned. What a bulk transfer holds in flight
/// (windows of up to 32 MiB, queued writes) comes and goes in this range: at
/// 4 MiB the page faults were still 11 % of the two tunnel ends' samples, at
/// 32 MiB 1.2 %. A process keeps at most this much free per heap.
pub const TRIM_THRESHOLD: usize = 32 * 1024 * 1024;
/// Allocations from this size on get pages of their own. Setting the trim
/// threshold turns off glibc's adjusting of this one, whose default (128 KiB)
/// would map and unmap every large buffer (websocket batches are up to 256 KiB).
pub const MMAP_THRESHOLD: usize = 1024 * 1024;

/// Keep recently freed memory mapped (see the module docs). Binaries call this
/// once at start; without glibc it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both values are in range.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
