//! A flat `f32` buffer the engine owns: a model's parameters, its gradients, the optimizer's state. Code outside
//! the engine never holds such memory as a slice: it uploads host values, downloads them (checkpoints, saving,
//! fingerprints) or edits them through `with_host_mut` (the all-reduce hook, merging adapters). On the CPU
//! backend each of these is free; a device backend adds a `Storage` variant, and every `match` here and in the
//! engine's entry points says what it costs there.
use std::borrow::Cow;

#[derive(Clone, PartialEq)]
enum Storage {
    /// Host memory, read and written by the CPU backend in place.
    Host(Vec<f32>),
}

#[derive(Clone, PartialEq)]
pub struct Buffer(Storage);

impl Buffer {
    /// A buffer holding `values` (an upload).
    pub fn from_host(values: Vec<f32>) -> Buffer {
        Buffer(Storage::Host(values))
    }

    pub fn zeros(len: usize) -> Buffer {
        Buffer::from_host(super::cpu::memory::zeroed(len))
    }

    pub fn len(&self) -> usize {
        let Storage::Host(v) = &self.0;
        v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values on the host (a download; borrowed on the CPU backend).
    pub fn to_host(&self) -> Cow<'_, [f32]> {
        let Storage::Host(v) = &self.0;
        Cow::Borrowed(v)
    }

    /// Replaces the values with `values`, which must have the buffer's length (an upload).
    pub fn upload(&mut self, values: &[f32]) {
        assert_eq!(values.len(), self.len(), "upload of {} values into a buffer of {}", values.len(), self.len());
        self.with_host_mut(|v| v.copy_from_slice(values));
    }

    /// Runs `edit` on the values on the host and keeps what it wrote: download, edit, upload. The hook through
    /// which MPI sums gradients and adapters are merged into weights.
    pub fn with_host_mut<R>(&mut self, edit: impl FnOnce(&mut [f32]) -> R) -> R {
        let Storage::Host(v) = &mut self.0;
        edit(v)
    }

    /// The CPU backend's view of the values.
    pub(in crate::engine) fn host(&self) -> &[f32] {
        let Storage::Host(v) = &self.0;
        v
    }

    pub(in crate::engine) fn host_mut(&mut self) -> &mut [f32] {
        let Storage::Host(v) = &mut self.0;
        v
    }
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer::from_host(Vec::new())
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} f32 on the host)", self.len())
    }
}
