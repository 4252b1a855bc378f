//! Read-only host memory made of pages of files and pages the loader writes. A frozen weight stored in the
//! dtype the engine reads already lies in the page cache once its file is read: mapping those pages where the
//! model's layout wants the tensor costs a page-table entry a page, where a copy costs fresh memory that the
//! kernel must zero first (on this project's KVM machine: huge pages at 0.36 GB/s on first touch, ordinary ones
//! at 1.4-2.8 GB/s; the copy was 78% of loading a 2 GB f32 model).
//! Linux only (MAP_FIXED over a reserved range); elsewhere `Region` cannot be made and the loader copies.
#[cfg(target_os = "linux")]
pub use linux::{page_size, Region, HUGE_PAGE};
#[cfg(not(target_os = "linux"))]
pub use other::Region;

#[cfg(not(target_os = "linux"))]
mod other {
    /// No region exists off Linux (none can be made), so the buffer variant that holds one is never built.
    pub enum Region {}

    impl Region {
        pub fn bytes(&self) -> &[u8] {
            match *self {}
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::ptr::NonNull;

    /// Whole pages at a fixed address: anonymous (zeroed, writable until sealed) except where `map_file` put a
    /// file's pages (private and read-only: the file is never written, and a write of ours would fault).
    pub struct Region {
        base: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the region is owned memory like a Vec's; it is written only through `&mut self` (before `seal`).
    unsafe impl Send for Region {}
    unsafe impl Sync for Region {}

    /// A PMD's span on x86-64 and aarch64 with 4 KiB pages: a file's page-cache folio of this size, mapped at an
    /// address congruent to its file offset modulo this, takes one TLB entry instead of 512 (decoding reads every
    /// weight each token; measured 10% slower on 4 KiB pages than on huge ones).
    pub const HUGE_PAGE: usize = 2 << 20;

    /// The size of a page, to which `map_file`'s addresses and file offsets must be aligned.
    pub fn page_size() -> usize {
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
    }

    impl Region {
        /// `len` bytes (whole pages) of zeroed anonymous memory, starting on a multiple of `HUGE_PAGE`; no page is
        /// touched until written.
        pub fn anonymous(len: usize) -> io::Result<Region> {
            let len = len.max(1).next_multiple_of(page_size());
            // Reserve HUGE_PAGE more and give back what lies before the first aligned address and after the end.
            let reserved = len + HUGE_PAGE;
            // SAFETY: a new private anonymous mapping at an address the kernel picks; no existing memory is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    reserved,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let (start, base) = (ptr as usize, (ptr as usize).next_multiple_of(HUGE_PAGE));
            // SAFETY: both ranges lie in the mapping just made and outside [base, base + len), which we keep.
            unsafe {
                if base > start {
                    libc::munmap(ptr, base - start);
                }
                if start + reserved > base + len {
                    libc::munmap((base + len) as *mut libc::c_void, start + reserved - (base + len));
                }
            }
            Ok(Region { base: NonNull::new(base as *mut u8).expect("mmap returned a null mapping"), len })
        }

        /// Replaces the pages `[at, at + len)` of the region by `file`'s bytes from `offset` on, private and
        /// read-only, and maps them in now (they are in the page cache when the file was just read). Where `at`
        /// and `offset` agree modulo `HUGE_PAGE` and the page cache holds that span in one folio, the kernel
        /// maps it with one huge entry.
        /// `at` and `offset` must be multiples of the page size; `len` is rounded up to whole pages, which must lie
        /// in the region and in the file's last page at most.
        pub fn map_file(&mut self, at: usize, file: &File, offset: usize, len: usize) -> io::Result<()> {
            let page = page_size();
            let len = len.next_multiple_of(page);
            assert!(at % page == 0 && offset % page == 0, "file pages mapped at an address or offset off a page");
            assert!(at.checked_add(len).is_some_and(|end| end <= self.len), "file pages mapped past the region's end");
            let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::other("file offset out of range"))?;
            // SAFETY: [at, at + len) lies inside our own mapping (asserted), which MAP_FIXED replaces; nothing else
            // refers to those pages, since only `&mut self` reaches them before `seal`.
            let ptr = unsafe {
                libc::mmap(
                    self.base.as_ptr().add(at).cast(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_POPULATE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// The start of the region, for the loader's writes into its anonymous pages (before `seal`).
        pub fn as_mut_ptr(&mut self) -> *mut u8 {
            self.base.as_ptr()
        }

        /// Makes every page read-only: what the loader wrote is final.
        pub fn seal(&mut self) -> io::Result<()> {
            // SAFETY: changes the protection of our own mapping only.
            if unsafe { libc::mprotect(self.base.as_ptr().cast(), self.len, libc::PROT_READ) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        pub fn bytes(&self) -> &[u8] {
            // SAFETY: the whole region is mapped and readable for as long as `self` lives.
            unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the range this region mapped; no reference into it outlives `self`.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }

}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_pages_appear_where_mapped_and_the_rest_stays_as_written() {
        let page = page_size();
        let mut file = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..3 * page + 100).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).unwrap();
        let mut region = Region::anonymous(5 * page).unwrap();
        // SAFETY: the first page is anonymous and writable; nothing else refers to it.
        unsafe { region.as_mut_ptr().write_bytes(7, page) };
        // The file's last two pages (the second of them only partly in the file) at the region's third page.
        region.map_file(2 * page, &file, 2 * page, page + 100).unwrap();
        region.seal().unwrap();
        let bytes = region.bytes();
        assert!(bytes[..page].iter().all(|&b| b == 7));
        assert!(bytes[page..2 * page].iter().all(|&b| b == 0));
        assert_eq!(&bytes[2 * page..3 * page + 100], &content[2 * page..]);
        // Past the file's end, the last file page reads zeros; the page after it is the region's own again.
        assert!(bytes[3 * page + 100..].iter().all(|&b| b == 0));
    }
}
