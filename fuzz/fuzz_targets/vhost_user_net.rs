//! vhostbox-net's whole vhost-user handling: the relay (early SET_VRING_ENABLE), then
//! vhost-user-backend and the net backend's callbacks (features and the tap set-up they
//! cause, config space, queue pairs), fed a stream of well-framed messages with fuzzed codes,
//! flags and payloads. The tap is a real one, in a network namespace of the fuzz process's own.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhostbox_common::launch::Device;
use vhostbox_common::test_utils::serve_stream;
use vhostbox_fuzz::serve_input;
use vhostbox_net::config::{Config, Mac, TapSource};
use vhostbox_net::tap::Tap;
use vhostbox_net::Net;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

thread_local! {
    static DEV: (Net, Arc<Tap>) = {
        // SAFETY: unshare with a flag; the fuzz process gets a network namespace of its own
        // (needs root), so its tap is seen by nothing else.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare(CLONE_NEWNET) needs root: {}", std::io::Error::last_os_error());
        let net = Net {
            cfg: Config {
                tap: TapSource::Name("fuzz0".into()),
                mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                queue_pairs: 2,
                queue_size: 64,
                mtu: None,
                offer_config: true,
            },
        };
        let tap = net.open().unwrap();
        (net, tap)
    };
}

fuzz_target!(|data: &[u8]| {
    serve_input(data, |stream| {
        DEV.with(|(net, tap)| {
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let conn = net.build(tap, &mem).unwrap();
            let _ = serve_stream(Net::NAME, conn, mem, stream);
        })
    });
});
