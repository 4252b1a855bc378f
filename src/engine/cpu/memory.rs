//! Large f32 allocations backed by transparent huge pages where the kernel offers them on request (Linux's
//! `madvise` mode, the common default): a 2 GB weight buffer then takes about a thousand page faults instead of
//! half a million (measured: most of the system time of loading a 0.5B model and of the first optimizer step).
//! PyTorch's CPU allocator does the same. Elsewhere, and for small buffers, a plain zeroed `Vec`.

/// Below this size a buffer spans too few huge pages to matter.
const HUGE_MIN_BYTES: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// `len` zeros, their pages not yet touched, advised to huge pages when large.
pub fn zeroed<T: bytemuck::Zeroable + Clone>(len: usize) -> Vec<T> {
    // A zero of a primitive type allocates zeroed memory (calloc): no page is touched here.
    let v = vec![T::zeroed(); len];
    advise_huge_pages(&v);
    v
}

/// Asks for huge pages over the whole 2 MiB-aligned part of `v`'s allocation. Only advice: it changes no value,
/// and an error (no THP support) leaves ordinary pages.
fn advise_huge_pages<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        let bytes = std::mem::size_of_val(v);
        if bytes < HUGE_MIN_BYTES {
            return;
        }
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (v.as_ptr() as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside `v`'s allocation; MADV_HUGEPAGE does not change its contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}
