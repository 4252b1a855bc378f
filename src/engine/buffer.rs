//! A flat buffer the engine owns: a model's parameters, its gradients, the optimizer's state. Code outside
//! the engine never holds such memory as a slice: it uploads host values, downloads them (checkpoints, saving,
//! fingerprints) or edits them through `with_host_mut` (the all-reduce hook, merging adapters). On the CPU
//! backend each of these is free; a device backend adds a `Storage` variant, and every `match` here and in the
//! engine's entry points says what it costs there.
//!
//! Frozen weights (the reference model) whose values are all bf16 are held in bf16 (`frozen_copy`): half the
//! memory, the same numbers, since the engine widens them exactly where it reads them. Frozen weights loaded from
//! a checkpoint whose dtype they keep lie where the file's pages are (`Storage::Mapped`), not in a copy.
use super::cpu::mapped::Region;
use super::cpu::weights::{exact_bf16, Weights, Widen};
use crate::fingerprint::Fingerprint;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// The bf16 bits of `values` when every one of them is exactly a bf16.
fn exact_bf16s(values: &[f32]) -> Option<Vec<u16>> {
    values.iter().map(|&x| exact_bf16(x)).collect()
}

#[derive(Clone)]
enum Storage {
    /// Host memory, read and written by the CPU backend in place.
    Host(Vec<f32>),
    /// Frozen host weights, each the upper half of its f32 (read-only: no gradient, update or edit reaches them).
    HostBf16(Vec<u16>),
    /// Frozen host weights, `len` values in bf16 or f32, in a read-only region that is mostly the checkpoint's
    /// own file pages (`model::mapped_weights`). Shared by its copies, as nothing writes it.
    Mapped { region: Arc<Region>, bf16: bool, len: usize },
}

#[derive(Clone)]
pub struct Buffer(Storage);

/// Equal values in the same order, whichever dtype or memory holds them.
impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        self.len() == other.len() && self.to_host() == other.to_host()
    }
}

/// Values widened at a time where a bf16 buffer is read whole (fingerprints, downloads): a multiple of 8.
const WIDEN_CHUNK: usize = 1 << 20;

impl Buffer {
    /// A buffer holding `values` (an upload).
    pub fn from_host(values: Vec<f32>) -> Buffer {
        Buffer(Storage::Host(values))
    }

    /// A frozen buffer of bf16 values, given as their bits.
    pub fn from_bf16_bits(values: Vec<u16>) -> Buffer {
        Buffer(Storage::HostBf16(values))
    }

    /// Frozen weights held in `region`: its first `len` values, bf16 when `bf16`, else f32. The region's
    /// size and alignment must allow that many.
    pub fn from_region(region: Region, bf16: bool, len: usize) -> Buffer {
        let width = if bf16 { 2 } else { 4 };
        assert!(len * width <= region.bytes().len(), "a mapped buffer longer than its region");
        Buffer(Storage::Mapped { region: Arc::new(region), bf16, len })
    }

    /// The same values in f32 (trainable).
    pub fn thawed(self) -> Buffer {
        match self.0 {
            Storage::HostBf16(v) => Buffer::from_host(v.iter().map(|x| x.widen()).collect()),
            Storage::Mapped { .. } => Buffer::from_host(self.to_host().into_owned()),
            host => Buffer(host),
        }
    }

    pub fn zeros(len: usize) -> Buffer {
        Buffer::from_host(super::cpu::memory::zeroed(len))
    }

    /// A read-only copy for weights that never train: in bf16 when every value is exactly a bf16 (a checkpoint
    /// stored in bf16, not yet trained), else in f32.
    pub fn frozen_copy(&self) -> Buffer {
        match &self.0 {
            Storage::Host(v) => exact_bf16s(v).map_or_else(|| self.clone(), |b| Buffer(Storage::HostBf16(b))),
            Storage::HostBf16(_) | Storage::Mapped { .. } => self.clone(),
        }
    }

    /// `frozen_copy`, consuming the buffer (no copy when it stays as it is).
    pub fn frozen(self) -> Buffer {
        match &self.0 {
            Storage::Host(v) => exact_bf16s(v).map_or(self, |b| Buffer(Storage::HostBf16(b))),
            Storage::HostBf16(_) | Storage::Mapped { .. } => self,
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Storage::Host(v) => v.len(),
            Storage::HostBf16(v) => v.len(),
            Storage::Mapped { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes a value takes: 2 for bf16, 4 for f32.
    pub fn value_bytes(&self) -> usize {
        match self.weights() {
            Weights::F32(_) => 4,
            Weights::Bf16(_) => 2,
        }
    }

    /// Bytes the buffer takes, gaps between a layout's tensors included (`Model::weight_bytes` counts values).
    pub fn bytes(&self) -> usize {
        match &self.0 {
            Storage::Host(v) => std::mem::size_of_val(v.as_slice()),
            Storage::HostBf16(v) => std::mem::size_of_val(v.as_slice()),
            Storage::Mapped { bf16, len, .. } => len * if *bf16 { 2 } else { 4 },
        }
    }

    /// The values on the host (a download; borrowed on the CPU backend, widened from bf16).
    pub fn to_host(&self) -> Cow<'_, [f32]> {
        match self.weights() {
            Weights::F32(v) => Cow::Borrowed(v),
            Weights::Bf16(v) => Cow::Owned(v.iter().map(|x| x.widen()).collect()),
        }
    }

    /// Adds the values to `h` as `Fingerprint::f32s` of `to_host()` would, without a full-size download.
    pub fn fingerprint(&self, h: &mut Fingerprint) {
        self.fingerprint_ranges(std::iter::once(0..self.len()), h)
    }

    /// Adds the values of `ranges`, one after another, to `h` as `Fingerprint::f32s` of them gathered into
    /// one slice would: what a model's weights fingerprint to, whatever gaps its layout leaves between them.
    pub fn fingerprint_ranges(&self, ranges: impl Iterator<Item = Range<usize>> + Clone, h: &mut Fingerprint) {
        h.u64(ranges.clone().map(|r| r.len()).sum::<usize>() as u64);
        // `f32_values` takes a long run in parts that are multiples of 8 values, so the runs are restaged in
        // chunks of WIDEN_CHUNK unless one range is the whole run and needs no widening.
        let mut staged: Vec<f32> = Vec::new();
        for range in ranges {
            if let (Weights::F32(v), true) = (self.weights(), staged.is_empty() && range.len() % 8 == 0) {
                h.f32_values(&v[range]);
                continue;
            }
            let mut at = range.start;
            while at < range.end {
                let n = (range.end - at).min(WIDEN_CHUNK - staged.len());
                match self.weights().slice(at, n) {
                    Weights::F32(v) => staged.extend_from_slice(v),
                    Weights::Bf16(v) => staged.extend(v.iter().map(|x| x.widen())),
                }
                at += n;
                if staged.len() == WIDEN_CHUNK {
                    h.f32_values(&staged);
                    staged.clear();
                }
            }
        }
        h.f32_values(&staged);
    }

    /// Replaces the values with `values`, which must have the buffer's length (an upload).
    pub fn upload(&mut self, values: &[f32]) {
        assert_eq!(values.len(), self.len(), "upload of {} values into a buffer of {}", values.len(), self.len());
        self.with_host_mut(|v| v.copy_from_slice(values));
    }

    /// Runs `edit` on the values on the host and keeps what it wrote: download, edit, upload. The hook through
    /// which MPI sums gradients and adapters are merged into weights. Frozen bf16 values become f32 first.
    pub fn with_host_mut<R>(&mut self, edit: impl FnOnce(&mut [f32]) -> R) -> R {
        if !matches!(self.0, Storage::Host(_)) {
            *self = std::mem::take(self).thawed();
        }
        edit(self.host_mut())
    }

    /// The CPU backend's view of weights, in whichever dtype they are held.
    pub(in crate::engine) fn weights(&self) -> Weights<'_> {
        match &self.0 {
            Storage::Host(v) => Weights::F32(v),
            Storage::HostBf16(v) => Weights::Bf16(v),
            Storage::Mapped { region, bf16: true, len } => Weights::Bf16(&bytemuck::cast_slice(region.bytes())[..*len]),
            Storage::Mapped { region, bf16: false, len } => Weights::F32(&bytemuck::cast_slice(region.bytes())[..*len]),
        }
    }

    /// The CPU backend's view of an f32 buffer (gradients, optimizer state, trainable weights).
    pub(in crate::engine) fn host(&self) -> &[f32] {
        match self.weights() {
            Weights::F32(v) => v,
            Weights::Bf16(_) => panic!("a frozen bf16 buffer has no f32 view (only weights() reads it)"),
        }
    }

    pub(in crate::engine) fn host_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            Storage::Host(v) => v,
            Storage::HostBf16(_) | Storage::Mapped { .. } => panic!("a frozen buffer cannot be written"),
        }
    }
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer::from_host(Vec::new())
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (dtype, place) = match &self.0 {
            Storage::Host(_) => ("f32", "on the host"),
            Storage::HostBf16(_) => ("bf16", "on the host"),
            Storage::Mapped { bf16, .. } => (if *bf16 { "bf16" } else { "f32" }, "mapped from files"),
        };
        write!(f, "Buffer({} {dtype} {place})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_copies_keep_bf16_values_in_bf16_and_read_the_same() {
        let exact: Vec<f32> = (0..2_100_000).map(|i| ((i % 255) as f32 - 127.0) * 0.125).collect();
        let buf = Buffer::from_host(exact.clone());
        let frozen = buf.frozen_copy();
        assert_eq!(frozen.bytes(), exact.len() * 2);
        assert_eq!(frozen.to_host().as_ref(), exact.as_slice());
        let (mut a, mut b) = (Fingerprint::default(), Fingerprint::default());
        buf.fingerprint(&mut a);
        frozen.fingerprint(&mut b);
        assert_eq!(a.finish(), b.finish());
        assert_eq!(a.finish(), Fingerprint::default().f32s(&exact).finish());
        // Editing a frozen copy makes it f32 again, with the values it had.
        let mut edited = frozen.clone();
        edited.with_host_mut(|v| v[0] += 1.0);
        assert_eq!(edited.bytes(), exact.len() * 4);
        assert_eq!(edited.to_host()[1..], exact[1..]);
        // One value that is not a bf16 keeps the whole copy in f32.
        let mut inexact = exact;
        inexact[5] = 0.1;
        assert_eq!(Buffer::from_host(inexact).frozen_copy().bytes(), 2_100_000 * 4);
    }

    #[test]
    fn ranges_fingerprint_as_their_values_gathered() {
        // Ranges of odd lengths around gaps, one longer than a staging chunk, in f32 and in bf16.
        let values: Vec<f32> = (0..2_300_000).map(|i| ((i % 251) as f32 - 125.0) * 0.25).collect();
        let ranges = [0..13, 20..1_200_000, 1_200_003..1_200_003, 1_200_003..2_299_990];
        let gathered: Vec<f32> = ranges.iter().flat_map(|r| values[r.clone()].iter().copied()).collect();
        let want = Fingerprint::default().f32s(&gathered).finish();
        for buf in [Buffer::from_host(values.clone()), Buffer::from_host(values.clone()).frozen_copy()] {
            let mut h = Fingerprint::default();
            buf.fingerprint_ranges(ranges.iter().cloned(), &mut h);
            assert_eq!(h.finish(), want, "{buf:?}");
        }
        // A range left out changes it.
        let mut h = Fingerprint::default();
        Buffer::from_host(values).fingerprint_ranges(ranges[1..].iter().cloned(), &mut h);
        assert_ne!(h.finish(), want);
    }
}
