//! vhostbox-blk's whole vhost-user handling: the relay with its in-flight hooks, then
//! vhost-user-backend and the blk backend's callbacks (features, config space, queues,
//! SET_CONFIG, GET/SET_INFLIGHT_FD without or with broken payloads), fed a stream of
//! well-framed messages with fuzzed codes, flags and payloads. Nothing may crash or hang. Each
//! input gets a connection built as a worker builds it.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vhostbox_blk::config::{Backing, Config};
use vhostbox_blk::engine::EngineKind;
use vhostbox_blk::queue::Shared;
use vhostbox_blk::Blk;
use vhostbox_common::launch::Device;
use vhostbox_common::test_utils::serve_stream;
use vhostbox_fuzz::serve_input;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

thread_local! {
    static DEV: (Blk, Arc<Shared>) = {
        let blk = Blk {
            cfg: Config {
                backing: Backing::Null(1 << 20),
                format: None,
                readonly: false,
                num_queues: 2,
                queue_size: 64,
                serial: *b"fuzz-serial-00000000",
                direct: false,
                engine: EngineKind::Sync,
                // Polling on, so the poll path sees the same hostile rings.
                poll_max: Duration::from_micros(50),
                logical_block_size: None,
                writeback: true,
                lock: false,
                limits: [0; 8],
            },
        };
        let shared = blk.open().unwrap();
        (blk, shared)
    };
}

fuzz_target!(|data: &[u8]| {
    serve_input(data, |stream| {
        DEV.with(|(blk, shared)| {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let conn = blk.build(shared, &mem).unwrap();
            let _ = serve_stream(Blk::NAME, conn, mem, stream);
        })
    });
});
