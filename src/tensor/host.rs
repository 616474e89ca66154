//! [`HostBuf`]: a tensor's host memory, either owned or viewed in place in a read-only memory map
//! of the file it was loaded from, so that loading a checkpoint costs no more resident memory
//! than the checkpoint (its pages are the file's, shared with the page cache and dropped under
//! memory pressure instead of swapped).

use memmap2::Mmap;
use std::ops::Deref;
use std::sync::Arc;

/// Element types a file's little-endian bytes can be viewed as in place: plain data for which
/// every bit pattern is a valid value.
pub trait Plain: Copy + Send + Sync + 'static {
    /// The value of `bytes` (exactly `size_of::<Self>()` of them, little-endian).
    fn from_le_slice(bytes: &[u8]) -> Self;
}

impl Plain for u8 {
    fn from_le_slice(b: &[u8]) -> u8 {
        b[0]
    }
}

impl Plain for f32 {
    fn from_le_slice(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Plain for half::f16 {
    fn from_le_slice(b: &[u8]) -> half::f16 {
        half::f16::from_le_bytes([b[0], b[1]])
    }
}

impl Plain for half::bf16 {
    fn from_le_slice(b: &[u8]) -> half::bf16 {
        half::bf16::from_le_bytes([b[0], b[1]])
    }
}

/// Host memory holding `T`s: a `Vec<T>`, or `len` values at a byte offset of a shared file
/// mapping. Reads go through `Deref<Target = [T]>`; a clone of a mapped buffer shares the
/// mapping; writing ([`HostBuf::make_mut`]) first copies a mapped buffer into memory of its own.
pub struct HostBuf<T>(Repr<T>);

enum Repr<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Plain> HostBuf<T> {
    /// `len` values at byte `offset` of `map`, viewed in place when the place is aligned for `T`
    /// (and the host is little-endian, as the files are), else decoded into a copy of their own
    /// (one tensor at a time). `None` when the range lies outside the map.
    pub fn from_map(map: &Arc<Mmap>, offset: usize, len: usize) -> Option<HostBuf<T>> {
        let size = std::mem::size_of::<T>();
        let bytes = map.get(offset..offset.checked_add(len.checked_mul(size)?)?)?;
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        Some(if aligned && cfg!(target_endian = "little") {
            HostBuf(Repr::Mapped {
                map: map.clone(),
                offset,
                len,
            })
        } else {
            HostBuf(Repr::Owned(
                bytes.chunks_exact(size).map(T::from_le_slice).collect(),
            ))
        })
    }

    /// The mapped file range these values are read from, if any.
    pub fn region(&self) -> Option<MappedRegion> {
        match &self.0 {
            Repr::Mapped { map, offset, len } => Some(MappedRegion {
                map: map.clone(),
                offset: *offset,
                len: len * std::mem::size_of::<T>(),
            }),
            Repr::Owned(_) => None,
        }
    }

    /// Whether the values are read in place from a file mapping.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// The values, writable: a mapped buffer is first copied into memory of its own.
    pub fn make_mut(&mut self) -> &mut [T] {
        if self.is_mapped() {
            *self = HostBuf(Repr::Owned(self.to_vec()));
        }
        match &mut self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => unreachable!("copied just above"),
        }
    }

    /// The values as a `Vec` (moved when owned, copied when mapped).
    pub fn into_vec(self) -> Vec<T> {
        match self.0 {
            Repr::Owned(v) => v,
            Repr::Mapped { .. } => self.to_vec(),
        }
    }
}

/// A byte range of a file mapping that tensors read in place ([`HostBuf::region`]).
pub struct MappedRegion {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
}

impl MappedRegion {
    /// Tells the kernel this process no longer needs the range's pages (`MADV_DONTNEED`), once
    /// a tensor converted at load (quantized, another dtype, uploaded) has replaced the values
    /// read from it: they leave the process's resident memory and stay in the page cache. Any
    /// buffer still reading them faults them back in from the file, so this never changes a
    /// value. Best effort: a refusal is ignored.
    pub fn release(&self) {
        #[cfg(unix)]
        {
            // madvise wants a page-aligned start: 64 KiB is a multiple of every common page
            // size (4, 16, 64 KiB), and widening the range only refaults neighbours' pages.
            let page = 1 << 16;
            let start = self.offset / page * page;
            let end = (self.offset + self.len).min(self.map.len());
            // SAFETY: the map is a read-only shared file mapping, so dropping its pages loses
            // nothing: the next read refaults them from the file. The range lies inside it.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end.saturating_sub(start),
                )
            };
        }
    }
}

impl<T> Deref for HostBuf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.0 {
            Repr::Owned(v) => v,
            // SAFETY: `from_map` only builds this variant for a range inside the map (checked
            // there) whose start is aligned for `T`, and `T: Plain` makes any bytes a valid
            // value. The map is read-only and kept alive by the `Arc` as long as `self`. (As
            // with every memory-mapped loader, the file must not be truncated or rewritten
            // while it is mapped.)
            Repr::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<T>(), *len)
            },
        }
    }
}

impl<T> From<Vec<T>> for HostBuf<T> {
    fn from(v: Vec<T>) -> HostBuf<T> {
        HostBuf(Repr::Owned(v))
    }
}

impl<T> FromIterator<T> for HostBuf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> HostBuf<T> {
        HostBuf(Repr::Owned(iter.into_iter().collect()))
    }
}

impl<T: Clone> Clone for HostBuf<T> {
    /// A copy of owned values; a mapped buffer shares its mapping.
    fn clone(&self) -> HostBuf<T> {
        HostBuf(match &self.0 {
            Repr::Owned(v) => Repr::Owned(v.clone()),
            Repr::Mapped { map, offset, len } => Repr::Mapped {
                map: map.clone(),
                offset: *offset,
                len: *len,
            },
        })
    }
}

impl<T> std::fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Owned(v) => write!(f, "HostBuf(owned, {} values)", v.len()),
            Repr::Mapped { offset, len, .. } => {
                write!(f, "HostBuf(mapped at byte {offset}, {len} values)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn map_of(bytes: &[u8]) -> Arc<Mmap> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        // SAFETY: a private temporary file nobody else writes.
        Arc::new(unsafe { Mmap::map(&f) }.unwrap())
    }

    #[test]
    fn aligned_ranges_are_viewed_in_place_and_others_copied_with_the_same_values() {
        let vals = [1.5f32, -2.0, 3.25, 1e-3];
        let mut bytes = vec![0u8; 2];
        bytes.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        bytes.extend([0, 0]);
        bytes.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        let map = map_of(&bytes);
        // Byte 2: not 4-aligned (the map itself is page-aligned), so decoded into a copy.
        let copied = HostBuf::<f32>::from_map(&map, 2, 4).unwrap();
        let mapped = HostBuf::<f32>::from_map(&map, 20, 4).unwrap();
        assert!(!copied.is_mapped() && mapped.is_mapped());
        assert_eq!(&*copied, &vals);
        assert_eq!(&*mapped, &vals);
        assert!(mapped.clone().is_mapped(), "a clone shares the mapping");
        assert!(
            HostBuf::<f32>::from_map(&map, 20, 5).is_none(),
            "past the end"
        );
        assert!(HostBuf::<f32>::from_map(&map, usize::MAX, 1).is_none());
    }

    #[test]
    fn writing_a_mapped_buffer_copies_it_first() {
        let map = map_of(&[1, 2, 3, 4]);
        let mut a = HostBuf::<u8>::from_map(&map, 0, 4).unwrap();
        let b = a.clone();
        a.make_mut()[0] = 9;
        assert!(!a.is_mapped() && b.is_mapped());
        assert_eq!((&*a, &*b), (&[9u8, 2, 3, 4][..], &[1u8, 2, 3, 4][..]));
        assert_eq!(b.into_vec(), vec![1, 2, 3, 4]);
    }
}
