//! A black-box hostile frontend (tests/src/hostile.rs, written from the vhost-user
//! specification) against the real vhostbox-blk binary, jailed with `--seccomp kill`. Each
//! case connects, misbehaves, and hangs up; then a well-behaved frontend must be served by the
//! same backend with verified I/O, and no worker may have died of a signal.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vhostbox_tests::blkreq;
use vhostbox_tests::frontend::{DeviceOptions, VhostUserDevice, VIRTIO_F_VERSION_1};
use vhostbox_tests::hostile::*;
use vhostbox_tests::{sparse_image, Backend};

const MIB: u64 = 1 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    be: Backend,
    sock: PathBuf,
    img: PathBuf,
    round: u64,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse_image(&dir.path().join("disk.img"), 16 * MIB);
        let sock = dir.path().join("blk.sock");
        let be = Backend::blk(&sock, &img, &["--seccomp", "kill", "--num-queues", "2"]);
        Rig {
            _dir: dir,
            be,
            sock,
            img,
            round: 0,
        }
    }

    /// A hostile connection that has done the handshake.
    fn hostile(&self) -> Hostile {
        let h = Hostile::connect(&self.sock).unwrap();
        h.handshake().unwrap();
        h
    }

    /// A well-behaved frontend writes a 4 KiB pattern and reads it back through the device;
    /// the image holds it. No worker may have died of a signal so far.
    fn verified_io(&mut self, case: &str) {
        self.round += 1;
        let sector = 8 * self.round;
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i as u64 * 7 + self.round) as u8)
            .collect();
        let opts = DeviceOptions {
            queue_size: 64,
            mem_size: 16 << 20,
            ..Default::default()
        };
        let mut dev = VhostUserDevice::connect_with(&self.sock, 2, VIRTIO_F_VERSION_1, &opts)
            .unwrap_or_else(|e| panic!("{case}: next frontend not served: {e}\n{}", self.be.log()));
        let q = dev.queue(1);
        let mem = q.mem().clone();
        let mut req = |ty: u32, buf: u64, w: bool| {
            let (status, _) = blkreq::run(q, ty, sector, &[(buf, 4096, w)]);
            assert_eq!(status, blkreq::S_OK, "{case}: status");
        };
        let out = mem.alloc(4096, 512);
        mem.write(out, &data);
        req(blkreq::T_OUT, out, false);
        let back = mem.alloc(4096, 512);
        req(blkreq::T_IN, back, true);
        assert_eq!(mem.read_vec(back, 4096), data, "{case}: read back");
        let mut on_disk = vec![0u8; 4096];
        std::fs::File::open(&self.img)
            .unwrap()
            .read_exact_at(&mut on_disk, sector * 512)
            .unwrap();
        assert_eq!(on_disk, data, "{case}: image");
        let log = self.be.log();
        assert!(!log.contains("killed by"), "{case}: a worker died\n{log}");
        assert!(
            !log.contains("exited with status"),
            "{case}: a worker failed\n{log}"
        );
    }
}

/// A memory table of one 4 MiB region, accepted.
fn good_memory(h: &Hostile) -> std::fs::File {
    let f = memfd(4 * MIB);
    let p = mem_table(0, 4 * MIB, 0x7000_0000_0000, 0);
    assert_eq!(h.ack(SET_MEM_TABLE, &p, &[raw(&f)]).unwrap(), 0);
    f
}

#[test]
fn hostile_messages_are_refused_and_the_backend_serves_the_next_frontend() {
    let mut rig = Rig::new();
    rig.verified_io("before");

    // Ring sizes that are not powers of two, or zero: refused, and the ring unusable.
    for num in [3u32, 0, 100] {
        let h = rig.hostile();
        let _m = good_memory(&h);
        assert_ne!(
            h.ack(SET_VRING_NUM, &vring_state(0, num), &[]).unwrap(),
            0,
            "num {num}"
        );
        let kick = eventfd();
        let v = 0u64.to_le_bytes();
        assert_ne!(
            h.ack(SET_VRING_KICK, &v, &[raw(&kick)]).unwrap(),
            0,
            "kick after num {num}"
        );
        drop(h);
        rig.verified_io(&format!("SET_VRING_NUM {num}"));
    }
    assert!(
        rig.be.log().contains("refused SET_VRING_NUM"),
        "{}",
        rig.be.log()
    );

    // A ring base past 16 bits.
    let h = rig.hostile();
    assert_ne!(
        h.ack(SET_VRING_BASE, &vring_state(0, 0x1_0000), &[])
            .unwrap(),
        0
    );
    drop(h);
    rig.verified_io("SET_VRING_BASE 0x10000");

    // Call and kick fds that are not eventfds: a read-only regular file, a pipe's end.
    let file = std::fs::File::open(&rig.img).unwrap();
    let (pr, _pw) = std::io::pipe().unwrap();
    for (what, fd) in [("file", file.as_raw_fd()), ("pipe", pr.as_raw_fd())] {
        for req in [SET_VRING_CALL, SET_VRING_KICK] {
            let h = rig.hostile();
            let _m = good_memory(&h);
            assert_ne!(
                h.ack(req, &1u64.to_le_bytes(), &[fd]).unwrap(),
                0,
                "{what} {req}"
            );
            drop(h);
            rig.verified_io(&format!("{what} as fd of request {req}"));
        }
    }

    // Memory tables that do not fit their fds (each would be a SIGBUS at first access).
    let cases: [(&str, Vec<u8>, u64); 4] = [
        (
            "region larger than its memfd",
            mem_table(0, 64 * MIB, 1 << 40, 0),
            MIB,
        ),
        (
            "offset past the end",
            mem_table(0, MIB, 1 << 40, 8 * MIB),
            4 * MIB,
        ),
        (
            "offset + size overflows",
            mem_table(0, 2 * MIB, 1 << 40, u64::MAX - MIB),
            4 * MIB,
        ),
        ("zero-sized region", mem_table(0, 0, 1 << 40, 0), MIB),
    ];
    for (what, payload, fd_size) in cases {
        let h = rig.hostile();
        let f = memfd(fd_size);
        assert_ne!(
            h.ack(SET_MEM_TABLE, &payload, &[raw(&f)]).unwrap(),
            0,
            "{what}"
        );
        // The ring is pointed at where the region claimed to be: with the table refused the
        // address is simply not in guest memory.
        drop(h);
        rig.verified_io(&format!("SET_MEM_TABLE: {what}"));
    }
    let h = rig.hostile();
    let f = memfd(MIB);
    let p = one_region(16 * MIB, 8 * MIB, 1 << 41, 0);
    assert_ne!(h.ack(ADD_MEM_REG, &p, &[raw(&f)]).unwrap(), 0);
    drop(h);
    rig.verified_io("ADD_MEM_REG past the end of its memfd");
    let h = rig.hostile();
    let f = memfd(4 * MIB);
    let mut two = mem_table(0, MIB, 1 << 40, 0);
    two[0..4].copy_from_slice(&2u32.to_le_bytes());
    assert_ne!(h.ack(SET_MEM_TABLE, &two, &[raw(&f)]).unwrap(), 0);
    drop(h);
    rig.verified_io("SET_MEM_TABLE: two regions, one fd");

    // Framing: a payload larger than any message, a message cut off, a hang-up mid-header.
    let h = rig.hostile();
    h.send_raw(SET_MEM_TABLE, VERSION, 0x10_0000, &[0; 64], &[])
        .unwrap();
    assert!(
        h.recv().is_err(),
        "an oversized message must end the connection"
    );
    drop(h);
    rig.verified_io("oversized payload");
    let h = rig.hostile();
    h.send_raw(SET_VRING_NUM, VERSION | NEED_REPLY, 8, &[1, 0, 0], &[])
        .unwrap();
    drop(h);
    rig.verified_io("message cut off");
    let h = Hostile::connect(&rig.sock).unwrap();
    use std::io::Write;
    (&h.sock).write_all(&[1, 0, 0]).unwrap();
    drop(h);
    rig.verified_io("hang-up mid-header");

    // A flood: 2000 queries written before any answer is read, every answer right.
    let h = rig.hostile();
    let f = h.get_u64(GET_FEATURES).unwrap();
    let mut flood = Vec::new();
    for _ in 0..2000 {
        flood.extend_from_slice(&GET_FEATURES.to_ne_bytes());
        flood.extend_from_slice(&VERSION.to_ne_bytes());
        flood.extend_from_slice(&0u32.to_ne_bytes());
    }
    let writer = {
        let s = h.sock.try_clone().unwrap();
        std::thread::spawn(move || (&s).write_all(&flood))
    };
    for i in 0..2000 {
        let (r, p) = h.recv().unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(
            (r, u64::from_le_bytes(p[..8].try_into().unwrap())),
            (GET_FEATURES, f)
        );
    }
    writer.join().unwrap().unwrap();
    drop(h);
    rig.verified_io("flood");

    // Unknown requests and nonsense lengths for known ones.
    let h = rig.hostile();
    for code in [0u32, 47, 999, 0xffff_ffff] {
        let _ = h.send(code, true, &[0; 8], &[]);
    }
    drop(h);
    rig.verified_io("unknown requests");
    let h = rig.hostile();
    let _ = h.send(GET_CONFIG, false, &[0xff; 12], &[]);
    let _ = h.send(SET_INFLIGHT_FD, true, &[0xff; 24], &[]);
    let _ = h.send(GET_VRING_BASE, false, &vring_state(77, 0), &[]);
    drop(h);
    rig.verified_io("bad GET_CONFIG, SET_INFLIGHT_FD, GET_VRING_BASE");

    // An in-flight region that does not fit its fd.
    let h = rig.hostile();
    let f = memfd(4096);
    let mut p = (1u64 << 20).to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(&64u16.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    assert_ne!(h.ack(SET_INFLIGHT_FD, &p, &[raw(&f)]).unwrap(), 0);
    drop(h);
    rig.verified_io("SET_INFLIGHT_FD larger than its fd");
}

/// The backend answers a case it refuses with a log line naming the request and why.
#[test]
fn refusals_are_logged_with_the_request_and_the_reason() {
    let rig = Rig::new();
    let h = rig.hostile();
    assert_ne!(h.ack(SET_VRING_NUM, &vring_state(1, 3), &[]).unwrap(), 0);
    drop(h);
    let log = rig.be.wait_log("refused SET_VRING_NUM");
    assert!(
        log.contains("ring 1 size 3: a split ring's size is a power of two"),
        "{log}"
    );
}

/// A frontend that asks for more queues than the backend was started with is told which
/// request, which ring, how many there are and which flag sets them; the backend stays up.
#[test]
fn a_queue_count_mismatch_names_the_request_the_count_and_the_flag() {
    let mut rig = Rig::new();
    // REPLY_ACK but not MQ: a frontend that does not ask GET_QUEUE_NUM first (QEMU does).
    let opts = DeviceOptions {
        queue_size: 64,
        mem_size: 16 << 20,
        protocol_features: 1 << 3,
        ..Default::default()
    };
    let r = VhostUserDevice::connect_with(&rig.sock, 3, VIRTIO_F_VERSION_1, &opts);
    assert!(
        r.is_err(),
        "the third ring's SET_VRING_NUM is refused with a NACK"
    );
    drop(r);
    let log = rig.be.wait_log("refused SET_VRING_NUM: ring 2");
    assert!(
        log.contains(
            "ring 2, but the device has 2 (rings 0-1; started as vhostbox-blk --num-queues 2): \
             the frontend asks for more queues than the backend has"
        ),
        "{log}"
    );
    rig.verified_io("after a frontend that wanted 3 queues");
}
