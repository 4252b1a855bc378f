//! A flat buffer the engine owns: a model's parameters, its gradients, the optimizer's state. Code outside
//! the engine never holds such memory as a slice: it uploads host values, downloads them (checkpoints, saving,
//! fingerprints) or edits them through `with_host_mut` (the all-reduce hook, merging adapters). On the CPU
//! backend each of these is free; a device backend adds a `Storage` variant, and every `match` here and in the
//! engine's entry points says what it costs there.
//!
//! Frozen weights (the reference model) whose values are all bf16 are held in bf16 (`frozen_copy`): half the
//! memory, the same numbers, since the engine widens them exactly where it reads them.
use super::cpu::weights::{exact_bf16, Weights, Widen};
use crate::fingerprint::Fingerprint;
use std::borrow::Cow;

/// The bf16 bits of `values` when every one of them is exactly a bf16.
fn exact_bf16s(values: &[f32]) -> Option<Vec<u16>> {
    values.iter().map(|&x| exact_bf16(x)).collect()
}

#[derive(Clone, PartialEq)]
enum Storage {
    /// Host memory, read and written by the CPU backend in place.
    Host(Vec<f32>),
    /// Frozen host weights, each the upper half of its f32 (read-only: no gradient, update or edit reaches them).
    HostBf16(Vec<u16>),
}

#[derive(Clone, PartialEq)]
pub struct Buffer(Storage);

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

    /// The same values in f32 (trainable).
    pub fn thawed(self) -> Buffer {
        match self.0 {
            Storage::HostBf16(v) => Buffer::from_host(v.iter().map(|x| x.widen()).collect()),
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
            Storage::HostBf16(_) => self.clone(),
        }
    }

    /// `frozen_copy`, consuming the buffer (no copy when it stays as it is).
    pub fn frozen(self) -> Buffer {
        match &self.0 {
            Storage::Host(v) => exact_bf16s(v).map_or(self, |b| Buffer(Storage::HostBf16(b))),
            Storage::HostBf16(_) => self,
        }
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            Storage::Host(v) => v.len(),
            Storage::HostBf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the values take (for the memory plan).
    pub fn bytes(&self) -> usize {
        match &self.0 {
            Storage::Host(v) => std::mem::size_of_val(v.as_slice()),
            Storage::HostBf16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// The values on the host (a download; borrowed on the CPU backend, widened from bf16).
    pub fn to_host(&self) -> Cow<'_, [f32]> {
        match &self.0 {
            Storage::Host(v) => Cow::Borrowed(v),
            Storage::HostBf16(v) => Cow::Owned(v.iter().map(|x| x.widen()).collect()),
        }
    }

    /// Adds the values to `h` as `Fingerprint::f32s` of `to_host()` would, without a full-size download.
    pub fn fingerprint(&self, h: &mut Fingerprint) {
        h.u64(self.len() as u64);
        match &self.0 {
            Storage::Host(v) => {
                h.f32_values(v);
            }
            Storage::HostBf16(v) => {
                let mut wide = vec![0f32; WIDEN_CHUNK.min(v.len())];
                for chunk in v.chunks(WIDEN_CHUNK) {
                    let wide = &mut wide[..chunk.len()];
                    wide.iter_mut().zip(chunk).for_each(|(w, b)| *w = b.widen());
                    h.f32_values(wide);
                }
            }
        }
    }

    /// Replaces the values with `values`, which must have the buffer's length (an upload).
    pub fn upload(&mut self, values: &[f32]) {
        assert_eq!(values.len(), self.len(), "upload of {} values into a buffer of {}", values.len(), self.len());
        self.with_host_mut(|v| v.copy_from_slice(values));
    }

    /// Runs `edit` on the values on the host and keeps what it wrote: download, edit, upload. The hook through
    /// which MPI sums gradients and adapters are merged into weights. Frozen bf16 values become f32 first.
    pub fn with_host_mut<R>(&mut self, edit: impl FnOnce(&mut [f32]) -> R) -> R {
        if let Storage::HostBf16(_) = &self.0 {
            *self = std::mem::take(self).thawed();
        }
        edit(self.host_mut())
    }

    /// The CPU backend's view of weights, in whichever dtype they are held.
    pub(in crate::engine) fn weights(&self) -> Weights<'_> {
        match &self.0 {
            Storage::Host(v) => Weights::F32(v),
            Storage::HostBf16(v) => Weights::Bf16(v),
        }
    }

    /// The CPU backend's view of an f32 buffer (gradients, optimizer state, trainable weights).
    pub(in crate::engine) fn host(&self) -> &[f32] {
        match &self.0 {
            Storage::Host(v) => v,
            Storage::HostBf16(_) => panic!("a frozen bf16 buffer has no f32 view (only weights() reads it)"),
        }
    }

    pub(in crate::engine) fn host_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            Storage::Host(v) => v,
            Storage::HostBf16(_) => panic!("a frozen bf16 buffer cannot be written"),
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
        let dtype = match &self.0 {
            Storage::Host(_) => "f32",
            Storage::HostBf16(_) => "bf16",
        };
        write!(f, "Buffer({} {dtype} on the host)", self.len())
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
}
