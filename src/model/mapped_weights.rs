//! Frozen weights held where their checkpoint's pages lie: each large stack of tensors stored in the dtype the
//! engine holds (bf16 of a hub checkpoint, f32 of an f32 one) is placed in the layout at an address congruent to
//! its file offset modulo the page size (modulo 2 MiB when it spans several, so that the page cache's huge folios
//! map as huge pages), on pages of its own, and those pages of the file are mapped there
//! (`engine::cpu::mapped::Region`). The rest (stacks stored apart in the file, as [q|k|v] is, small tensors,
//! values converted) is copied into the region's anonymous pages between them. Loading a 0.5B model then
//! writes about 5% of its weights into fresh memory instead of all of them (fresh memory costs the kernel a
//! zeroing first: 1-3 GB/s on this project's VMs, most of the load time). The gaps between stacks take address
//! space, not memory.
//!
//! A mapped page is private and read-only: nothing of ours writes the file, and a write to the file by someone
//! else while kto runs shows in pages not yet read, as it would in a model PyTorch maps. Truncating the file
//! under a running kto ends it (SIGBUS), as with any mapped model. Files replaced by a new download are new
//! files: the mapped ones stay as they were.
use super::weights::{fill, Held, Slot, Stored};
use super::{ModelSpec, ParamLayout, Placement};
use crate::engine::cpu::mapped::{page_size, Region, HUGE_PAGE};
use crate::engine::Buffer;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Stacks smaller than this many pages are copied: mapping them would cost more in padding and calls than it
/// saves.
const MIN_MAPPED_PAGES: usize = 16;

/// Bytes between copied stacks, so each starts on its own cache line.
const COPY_ALIGN: usize = 64;

/// File pages mapped into the region: `len` bytes of file `file` from `offset` at region byte `at`.
struct Piece {
    file: usize,
    at: usize,
    offset: usize,
    len: usize,
}

/// The placement described above, for values held as `width`-byte `dtype`.
struct FilePages<'a> {
    stored: HashMap<&'a str, &'a Stored<'a>>,
    dtype: safetensors::Dtype,
    width: usize,
    page: usize,
    /// Where the next stack may start, in bytes.
    cursor: usize,
    pieces: Vec<Piece>,
}

impl FilePages<'_> {
    /// The stack's file and the offset of its bytes there, when it can be mapped: stored in the held dtype,
    /// its tensors one after another in one file, in the stack's order, on an element boundary, and large.
    fn mappable(&self, stack: &[(&str, usize)]) -> Option<(usize, usize)> {
        let first = self.stored.get(stack.first()?.0)?;
        let mut end = first.file_offset;
        for &(name, len) in stack {
            let s = self.stored.get(name)?;
            let contiguous = s.file_index == first.file_index && s.file_offset == end && s.view.data().len() == len * self.width;
            if s.view.dtype() != self.dtype || !contiguous {
                return None;
            }
            end += len * self.width;
        }
        let large = end - first.file_offset >= MIN_MAPPED_PAGES * self.page;
        (large && first.file_offset % self.width == 0).then_some((first.file_index, first.file_offset))
    }
}

impl Placement for FilePages<'_> {
    fn place(&mut self, stack: &[(&str, usize)]) -> usize {
        let bytes = stack.iter().map(|&(_, len)| len).sum::<usize>() * self.width;
        let at = match self.mappable(stack) {
            Some((file, offset)) => {
                // A stack spanning a huge page's worth goes where its whole huge pages can be mapped as such.
                let align = if bytes >= 2 * HUGE_PAGE { HUGE_PAGE.max(self.page) } else { self.page };
                let at = self.cursor.next_multiple_of(align) + offset % align;
                let in_page = offset % self.page;
                let page_start = at - in_page;
                self.pieces.push(Piece { file, at: page_start, offset: offset - in_page, len: in_page + bytes });
                // Whatever follows starts past the mapping's last page, which holds file bytes to its end.
                self.cursor = (at + bytes).next_multiple_of(self.page);
                at
            }
            None => {
                let at = self.cursor.next_multiple_of(COPY_ALIGN);
                self.cursor = at + bytes;
                at
            }
        };
        at / self.width
    }

    fn end(&self) -> usize {
        self.cursor.div_ceil(self.width)
    }
}

/// The model's frozen weights as `T`, mapped where they lie in `files` as described above. When none can be
/// (values converted: an f32 file of bf16 values held in bf16), all are copied into the region's anonymous pages:
/// ordinary pages, which this VM hands out at 1.4-2.8 GB/s where the huge pages `memory::zeroed` asks for came at
/// 0.36 GB/s (a first touch of 2 GB in a fresh process, `madvise` mode; the second touch runs at 8 GB/s).
pub(super) fn load<T: Held>(dir: &Path, spec: &ModelSpec, stored: &[Stored], files: &[&File]) -> Result<(ParamLayout, Buffer)> {
    let width = std::mem::size_of::<T>();
    let stored_by_name = stored.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut placement = FilePages { stored: stored_by_name, dtype: T::STORED, width, page: page_size(), cursor: 0, pieces: Vec::new() };
    let layout = ParamLayout::placed(spec, &mut placement);
    let mut region = Region::anonymous(layout.total * width).map_err(|e| Error::model(dir, format!("cannot reserve memory for the weights: {e}")))?;
    for p in &placement.pieces {
        let path = stored.iter().find(|s| s.file_index == p.file).map_or(dir, |s| s.file);
        region.map_file(p.at, files[p.file], p.offset, p.len).map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
    }
    let base = region.as_mut_ptr();
    let slots = layout
        .tensors
        .iter()
        .map(|t| {
            let at = t.offset * width;
            let mapped = placement.pieces.iter().any(|p| (p.at..p.at + p.len).contains(&at));
            // SAFETY: the layout's tensors are disjoint and lie inside the region (its length is the layout's
            // total), at multiples of T's size from a page-aligned base. A mapped tensor's pages are only read;
            // a copied tensor's pages are anonymous, written through this one slice alone, before `seal`.
            Some(unsafe {
                let ptr = base.add(at).cast::<T>();
                match mapped {
                    true => Slot::InPlace(std::slice::from_raw_parts(ptr, t.len())),
                    false => Slot::Write(std::slice::from_raw_parts_mut(ptr, t.len())),
                }
            })
        })
        .collect();
    fill(dir, slots, &layout, stored)?;
    region.seal().map_err(|e| Error::model(dir, format!("cannot protect the weights' memory: {e}")))?;
    let params = Buffer::from_region(region, T::BF16, layout.total);
    Ok((layout, params))
}
