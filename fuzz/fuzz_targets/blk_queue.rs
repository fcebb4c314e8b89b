//! A whole virtio-blk queue pass: BlkQueue pops chains from an avail ring the input fills,
//! parses and runs them on a null device and publishes them in the used ring, with and
//! without EVENT_IDX, read-only or not.
#![no_main]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vhostbox_blk::disk::Disk;
use vhostbox_blk::queue::{BlkQueue, Shared};
use vhostbox_fuzz::{memory, queue, queue_size};

fn shared(readonly: bool) -> Arc<Shared> {
    static RW: OnceLock<Arc<Shared>> = OnceLock::new();
    static RO: OnceLock<Arc<Shared>> = OnceLock::new();
    let make = || {
        Arc::new(Shared {
            disk: Disk::null(1 << 20, 512, readonly).unwrap(),
            serial: *b"fuzz-serial-00000000",
            writeback: AtomicBool::new(true),
            stats: Default::default(),
            throttle: Default::default(),
        })
    };
    if readonly {
        RO.get_or_init(make).clone()
    } else {
        RW.get_or_init(make).clone()
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let qs = queue_size(data[0]);
    let mut q = queue(qs, data[1] & 1 != 0);
    let mem = Arc::new(memory(&data[2..]));
    let mem_handle = vm_memory::GuestMemoryAtomic::from(mem.clone());
    let mut w = BlkQueue::new(shared(data[1] & 2 != 0), None, 0, qs, mem_handle);
    let _ = w.start_tracking(None, &mut q, &mem);
    for _ in 0..3 {
        if w.process_queue(&mut q, &mem).is_err() {
            break;
        }
        if !w.take_more() {
            break;
        }
    }
});
