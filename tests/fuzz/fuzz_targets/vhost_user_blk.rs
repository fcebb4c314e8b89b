//! vhostbox-blk's whole vhost-user handling: the relay with its in-flight hooks, then
//! vhost-user-backend and the blk backend's callbacks (features, config space, queues,
//! SET_CONFIG, GET/SET_INFLIGHT_FD without or with broken payloads), fed a stream of
//! well-framed messages with fuzzed codes, flags and payloads. Nothing may crash or hang, and
//! the device must serve the next connection.
#![no_main]

use std::cell::RefCell;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhostbox_blk::disk::Disk;
use vhostbox_blk::engine::EngineKind;
use vhostbox_blk::vhu_blk::{BlkDevice, DeviceConfig};
use vhostbox_blk::worker::Shared;
use vhostbox_common::daemon::serve_stream;
use vhostbox_fuzz::serve_input;

thread_local! {
    static DEV: RefCell<BlkDevice> = RefCell::new({
        let shared = Arc::new(Shared {
            disk: Disk::null(1 << 20, 512, false).unwrap(),
            serial: *b"fuzz-serial-00000000",
            writeback: AtomicBool::new(true),
            stats: Default::default(),
        });
        let cfg = DeviceConfig {
            num_queues: 2,
            queue_size: 64,
            engine: EngineKind::Sync,
            // Polling on, so the poll path sees the same hostile rings.
            poll_max: std::time::Duration::from_micros(50),
        };
        BlkDevice::new(shared, cfg).unwrap()
    });
}

fuzz_target!(|data: &[u8]| {
    serve_input(data, |stream| {
        DEV.with(|d| {
            let _ = serve_stream("fuzz-blk", &mut *d.borrow_mut(), stream);
        })
    });
});
