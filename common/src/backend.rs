//! Small helpers for a device's `VhostUserBackend` implementation.

use std::io;

/// The bytes GET_CONFIG asks for; empty (and a warning) when the range lies outside `space`.
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    match start.checked_add(size as usize) {
        Some(end) if end <= space.len() => space[start..end].to_vec(),
        _ => {
            log::warn!("GET_CONFIG beyond the config space: offset {offset} size {size}");
            Vec::new()
        }
    }
}

/// The answer to a SET_CONFIG of a field the driver may not write.
pub fn read_only_config(offset: u32, buf: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "SET_CONFIG of a read-only field: offset {offset} size {}",
            buf.len()
        ),
    )
}

/// `queues_per_thread` for `threads` queue threads of `per_thread` consecutive queues each.
pub fn thread_masks(threads: u16, per_thread: u32) -> Vec<u64> {
    let one = (1u64 << per_thread) - 1;
    (0..u32::from(threads))
        .map(|i| one << (per_thread * i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_slices() {
        assert_eq!(thread_masks(3, 1), vec![1, 2, 4]);
        assert_eq!(thread_masks(2, 2), vec![0b11, 0b1100]);
        assert_eq!(config_slice(&[1, 2, 3, 4], 1, 2), vec![2, 3]);
        assert!(config_slice(&[1, 2, 3, 4], 3, 2).is_empty());
        assert!(config_slice(&[1, 2], u32::MAX, 2).is_empty());
    }
}
