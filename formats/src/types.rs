//! Offset newtypes. Most format bugs are a guest offset used as a host offset, so no bare
//! `u64` offset crosses the driver/engine boundary.

use std::fmt;

/// A byte offset in the guest (virtual disk) address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOff(pub u64);

/// A byte offset inside one of an image's host files (see [`FileId`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOff(pub u64);

/// Index into [`crate::Image::files`]: which host file of an image holds an extent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

impl GuestOff {
    /// The offset `len` bytes further on.
    pub fn plus(self, len: u64) -> GuestOff {
        GuestOff(self.0 + len)
    }
    /// Index of the cluster holding this offset, for clusters of `1 << cluster_bits` bytes.
    pub fn cluster(self, cluster_bits: u32) -> u64 {
        self.0 >> cluster_bits
    }
    /// Byte offset of this offset within its cluster.
    pub fn in_cluster(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }
}

impl HostOff {
    /// The offset `len` bytes further on.
    pub fn plus(self, len: u64) -> HostOff {
        HostOff(self.0 + len)
    }
}

impl fmt::Display for GuestOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl fmt::Display for HostOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host offset {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_math() {
        let g = GuestOff(0x1_2345);
        assert_eq!(g.cluster(16), 1);
        assert_eq!(g.in_cluster(16), 0x2345);
        assert_eq!(g.plus(0x10), GuestOff(0x1_2355));
    }
}
