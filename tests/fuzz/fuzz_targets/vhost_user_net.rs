//! vhostbox-net's whole vhost-user handling: the relay (early SET_VRING_ENABLE), then
//! vhost-user-backend and the net backend's callbacks (features and the tap set-up they
//! cause, config space, queue pairs), fed a stream of well-framed messages with fuzzed codes,
//! flags and payloads. The tap is a real one, in a network namespace of the fuzz process's own.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhostbox_common::daemon::serve_stream;
use vhostbox_fuzz::serve_input;
use vhostbox_net::config::Mac;
use vhostbox_net::tap::Tap;
use vhostbox_net::vhu_net::{DeviceConfig, NetDevice};

thread_local! {
    static DEV: RefCell<NetDevice> = RefCell::new({
        // SAFETY: unshare with a flag; the fuzz process gets a network namespace of its own
        // (needs root), so its tap is seen by nothing else.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare(CLONE_NEWNET) needs root: {}", std::io::Error::last_os_error());
        let tap = Arc::new(Tap::open("fuzz0", 2).unwrap());
        let cfg = DeviceConfig {
            mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            queue_pairs: 2,
            queue_size: 64,
            mtu: None,
        };
        let mut d = NetDevice::new(tap, cfg).unwrap();
        d.arm_shim().unwrap();
        d
    });
}

fuzz_target!(|data: &[u8]| {
    serve_input(data, |stream| {
        DEV.with(|d| {
            let _ = serve_stream("fuzz-net", &mut *d.borrow_mut(), stream);
        })
    });
});
