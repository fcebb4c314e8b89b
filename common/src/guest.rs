//! Fast paths for the small guest-memory accesses every request makes (a descriptor, a
//! header, a status byte, a range check).
//!
//! vm-memory's general accessors (`Bytes` on a `GuestMemory`) go through an iterator of
//! volatile slices that allows ranges over several regions; measured with callgrind, that
//! machinery costs 150-250 instructions per access, several times the access itself, and a
//! request makes about ten of them. Nearly every such range lies in one region, so these
//! helpers find that region once and use its volatile slice directly, and fall back to
//! vm-memory's general path only when a range crosses regions. Same checks, same volatile
//! copies: they only skip the iterator.

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice,
};

use crate::dirty::DirtyLog;
use crate::launch::GuestMem;
use vm_memory::bitmap::RefSlice;

/// `[addr, addr + len)` as a slice of the one region holding it, if one does.
#[inline]
pub fn slice(
    mem: &GuestMem,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, RefSlice<'_, DirtyLog>>> {
    let r = mem.find_region(addr)?;
    let off = addr.0 - r.start_addr().0;
    r.get_slice(MemoryRegionAddress(off), len).ok()
}

/// Whether `[addr, addr + len)` lies in guest memory (in one region or across several).
#[inline]
pub fn contains(mem: &GuestMem, addr: GuestAddress, len: usize) -> bool {
    len == 0 || slice(mem, addr, len).is_some() || mem.check_range(addr, len)
}

/// Reads `buf.len()` bytes at `addr`.
#[inline]
pub fn read(mem: &GuestMem, addr: GuestAddress, buf: &mut [u8]) -> Option<()> {
    match slice(mem, addr, buf.len()) {
        Some(s) => (s.copy_to(buf) == buf.len()).then_some(()),
        None => mem.read_slice(buf, addr).ok(),
    }
}

/// Writes one byte at `addr`.
#[inline]
pub fn write_u8(mem: &GuestMem, addr: GuestAddress, v: u8) -> Option<()> {
    match slice(mem, addr, 1) {
        Some(s) => s.write_obj(v, 0).ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_cross_region_ranges() {
        let mem =
            GuestMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
                .unwrap();
        assert!(slice(&mem, GuestAddress(0xff0), 0x10).is_some());
        assert!(
            slice(&mem, GuestAddress(0xff0), 0x20).is_none(),
            "crosses regions"
        );
        assert!(
            contains(&mem, GuestAddress(0xff0), 0x20),
            "but is in memory"
        );
        assert!(!contains(&mem, GuestAddress(0x1ff0), 0x20), "past the end");
        assert!(contains(&mem, GuestAddress(0x5000), 0));
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0xffe)).unwrap();
        let mut b = [0u8; 4];
        read(&mem, GuestAddress(0xffe), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        write_u8(&mem, GuestAddress(0x10), 9).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 9);
        assert!(write_u8(&mem, GuestAddress(0x2000), 9).is_none());
    }
}
