//! Frozen weights held where their checkpoint's pages lie. Each safetensors file is mapped whole (private,
//! read-only) into one region, at an address congruent to its start modulo 2 MiB, so that the page cache's huge
//! folios map as huge pages; each stack of tensors stored in the dtype the engine holds (bf16 of a hub
//! checkpoint, f32 of an f32 one), one after another in the stack's order, is read where it lies in its file.
//! The others ([q|k|v], whose tensors the file stores apart; values converted, as an f32 file of bf16 values held
//! in bf16) are copied into the region's anonymous pages after the files. Loading a 0.5B model then writes about
//! 5% of its weights into fresh memory instead of all of them (fresh memory costs the kernel a zeroing first:
//! 0.4-3 GB/s on this project's VMs, most of the load time before). The file bytes the layout does not use
//! (headers, the copied tensors' originals) take address space, not memory.
//!
//! A mapped page is private and read-only: nothing of ours writes the file, and a write to the file by someone
//! else while kto runs shows in pages not yet read, as it would in a model PyTorch maps. Truncating the file
//! under a running kto ends it (SIGBUS), as with any mapped model. Files replaced by a new download are new
//! files: the mapped ones stay as they were.
use super::weights::{fill, Held, Slot, Stored};
use super::{ModelSpec, ParamLayout, Placement};
use crate::engine::cpu::mapped::{Region, HUGE_PAGE};
use crate::engine::Buffer;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Bytes between copied stacks, so each starts on its own cache line.
const COPY_ALIGN: usize = 64;

/// The placement described above, for values held as `width`-byte `dtype`: file `i` from region byte
/// `file_starts[i]`, the copied stacks from `copy_start` on.
struct FilePages<'a> {
    stored: HashMap<&'a str, &'a Stored<'a>>,
    dtype: safetensors::Dtype,
    width: usize,
    file_starts: Vec<usize>,
    copy_start: usize,
    /// Where the next copied stack may start, in bytes.
    cursor: usize,
}

impl FilePages<'_> {
    /// The stack's place in the region, when it can be read where it lies: stored in the held dtype, its tensors
    /// one after another in one file, in the stack's order, on an element boundary.
    fn in_file(&self, stack: &[(&str, usize)]) -> Option<usize> {
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
        (first.file_offset % self.width == 0).then(|| self.file_starts[first.file_index] + first.file_offset)
    }
}

impl Placement for FilePages<'_> {
    fn place(&mut self, stack: &[(&str, usize)]) -> usize {
        let at = self.in_file(stack).unwrap_or_else(|| {
            let at = self.cursor.next_multiple_of(COPY_ALIGN);
            self.cursor = at + stack.iter().map(|&(_, len)| len).sum::<usize>() * self.width;
            at
        });
        at / self.width
    }

    fn end(&self) -> usize {
        self.cursor.div_ceil(self.width)
    }
}

/// The model's frozen weights as `T`, read where they lie in `files` (each open, with its whole map) or copied, as
/// described above. Copies go to ordinary pages, which this VM hands out at 1.4-2.8 GB/s where the huge pages
/// `memory::zeroed` asks for came at 0.36 GB/s (a first touch of 2 GB in a fresh process, `madvise` mode).
pub(super) fn load<T: Held>(
    dir: &Path,
    spec: &ModelSpec,
    stored: &[Stored],
    files: &[(File, memmap2::Mmap)],
) -> Result<(ParamLayout, Buffer)> {
    let width = std::mem::size_of::<T>();
    let stored_by_name = stored.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut file_starts = Vec::with_capacity(files.len());
    let mut end = 0;
    for (_, map) in files {
        file_starts.push(end);
        end = (end + map.len()).next_multiple_of(HUGE_PAGE);
    }
    let mut placement = FilePages { stored: stored_by_name, dtype: T::STORED, width, file_starts, copy_start: end, cursor: end };
    let layout = ParamLayout::placed(spec, &mut placement);
    let mut region = Region::anonymous(layout.total * width).map_err(|e| Error::model(dir, format!("cannot reserve memory for the weights: {e}")))?;
    for (i, (&start, (file, map))) in placement.file_starts.iter().zip(files).enumerate() {
        let path = stored.iter().find(|s| s.file_index == i).map_or(dir, |s| s.file);
        region.map_file(start, file, 0, map.len()).map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
    }
    let base = region.as_mut_ptr();
    let slots = layout
        .tensors
        .iter()
        .map(|t| {
            let at = t.offset * width;
            // SAFETY: the layout's tensors are disjoint (`ParamLayout::placed` checks) and lie inside the region
            // (its length is the layout's total), at multiples of T's size from an aligned base. A tensor in a
            // file is only read; a copied one lies in anonymous pages, written through this one slice alone,
            // before `seal`.
            Some(unsafe {
                let ptr = base.add(at).cast::<T>();
                match at < placement.copy_start {
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
