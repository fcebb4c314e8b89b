//! Protocol tests: the real vhostbox-net binary, jailed as in production, driven by the
//! vhost-user test frontend (vhost crate `Frontend`, memfd guest memory, real split rings and
//! eventfds) and exchanging frames with a real tap inside a network namespace each test
//! creates. Frames are compared byte for byte on both sides.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use vhostbox_tests::frontend::{
    Desc, DeviceOptions, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use vhostbox_tests::net_frontend::*;
use vhostbox_tests::netns::*;
use vhostbox_tests::openmetrics::{scrape, value};
use vhostbox_tests::{assert_jailed, run_to_exit, Backend};

const NET: &str = "vhostbox-net";
const TAP: &str = "vbx0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BCAST: [u8; 6] = [0xff; 6];
const T: Duration = Duration::from_secs(5);

const BASE: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MQ;
const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_HOST_UFO
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_GUEST_UFO;

/// A jailed backend on a tap it created in a fresh namespace; the tap is up.
struct Rig {
    // Dropped in this order: the backend (printing its log if the test failed), then the
    // namespace, then the directory with the socket and the log.
    backend: Backend,
    ns: NetNs,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn rig(pairs: u16, extra: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ns = NetNs::new().expect("network namespace");
    let pairs_s = pairs.to_string();
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--tap",
        TAP,
        "--queue-pairs",
        &pairs_s,
        "--mac",
        "52:54:00:12:34:56",
    ];
    args.extend_from_slice(extra);
    let backend = ns.run(|| Backend::start(NET, &sock, &args));
    ns.wait_link(TAP);
    ns.ip(&["link", "set", TAP, "up"]);
    Rig {
        _dir: dir,
        sock,
        ns,
        backend,
    }
}

impl Rig {
    fn connect(&self, pairs: usize, features: u64) -> NetFrontend {
        NetFrontend::connect(&self.sock, pairs, features, &DeviceOptions::default())
            .expect("frontend connect")
    }

    fn host(&self, vnet_hdr: bool) -> PacketSocket {
        self.ns
            .run(|| PacketSocket::bind(TAP, vnet_hdr))
            .expect("packet socket")
    }

    /// The traffic summary the backend logs when the frontend goes away.
    fn summary_after_disconnect(&self, nth: usize) -> String {
        let log = self.backend.wait_log("traffic of that connection");
        let deadline = std::time::Instant::now() + T;
        loop {
            let log2 = self.backend.log();
            let lines: Vec<&str> = log2
                .lines()
                .filter(|l| l.contains("traffic of that connection"))
                .collect();
            if lines.len() >= nth {
                return lines[nth - 1].to_string();
            }
            assert!(std::time::Instant::now() < deadline, "{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_worker_never_killed(&self) {
        let log = self.backend.log();
        assert!(!log.contains("killed"), "a worker died:\n{log}");
    }
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[14], f[15], f[16], f[17]])
}

/// Keeps the RX ring of `pair` stocked with `n` buffers of `len` bytes.
fn top_up(fe: &mut NetFrontend, pair: usize, n: usize, len: usize) {
    let have = fe.rx_posted(pair);
    if have < n {
        fe.post_rx(pair, n - have, len);
    }
}

/// The next test frame the guest receives on `pair` (other traffic is skipped).
fn guest_recv(fe: &mut NetFrontend, pair: usize) -> Option<(NetHdr, Vec<u8>)> {
    loop {
        let (h, f) = fe.recv(pair, T)?;
        if is_test_frame(&f, 0) {
            return Some((h, f));
        }
    }
}

#[test]
fn frames_of_many_sizes_both_ways_byte_exact() {
    let r = rig(1, &["--mtu", "9000", "--offer-config"]);
    let mut fe = r.connect(1, BASE | OFFLOADS | VIRTIO_NET_F_MRG_RXBUF);
    let cfg = fe.config().unwrap();
    assert_eq!(cfg.mac, MAC);
    assert_eq!(cfg.status & 1, 1, "link up");
    assert_eq!(cfg.mtu, 9000);
    assert_eq!(cfg.max_virtqueue_pairs, 1);
    assert_eq!(
        fe.features() & VIRTIO_NET_F_MQ,
        0,
        "MQ is offered only for several pairs"
    );
    assert_eq!(fe.hdr_len(), 12);
    let host = r.host(false);
    let sizes = [
        14usize, 60, 61, 64, 100, 127, 128, 512, 1000, 1499, 1514, 1515, 4000, 9014,
    ];
    let layouts = [
        (TxLayout::Single, false),
        (TxLayout::SeparateHeader, false),
        (TxLayout::Chunks(5), false),
        (TxLayout::Single, true),
        (TxLayout::Chunks(7), true),
    ];
    let mut seq = 0u32;
    // Guest to host, every size in every descriptor layout.
    for &(layout, indirect) in &layouts {
        for &len in &sizes {
            seq += 1;
            let f = test_frame(BCAST, MAC, len.max(18), seq);
            let f = &f[..len.max(18)];
            // Small chunks (the header straddles descriptors) while the chain fits the ring.
            let layout = match layout {
                TxLayout::Chunks(n) if len > 1000 => TxLayout::Chunks(n * 64),
                l => l,
            };
            fe.send_with_layout(0, &NetHdr::default(), f, layout, indirect)
                .unwrap();
            let got = host
                .recv_matching(T, |g| is_test_frame(g, 0) && seq_of(g) == seq)
                .unwrap_or_else(|| panic!("{len}-byte frame ({layout:?}) never reached the tap"));
            assert_eq!(got, f, "{len}-byte frame ({layout:?}, indirect {indirect})");
        }
    }
    assert!(fe.wait_tx_done(0, T));
    // Host to guest: with MRG_RXBUF, 1536-byte buffers; a jumbo frame spans seven.
    for &len in &sizes {
        seq += 1;
        top_up(&mut fe, 0, 64, 1536);
        let f = test_frame(MAC, [2, 0, 0, 0, 0, 1], len.max(18), seq);
        host.send(&f).unwrap();
        let (h, got) = guest_recv(&mut fe, 0).expect("frame never reached the guest");
        assert_eq!(got, f, "{len}-byte frame");
        assert_eq!((h.flags & !VIRTIO_NET_HDR_F_DATA_VALID, h.gso_type), (0, 0));
        assert_eq!(h.num_buffers as usize, (12 + f.len()).div_ceil(1536));
    }
    drop(fe);
    let s = r.summary_after_disconnect(1);
    assert!(s.contains(&format!("rx {} frames", sizes.len())), "{s}");
    assert!(
        s.contains(&format!("tx {} frames", sizes.len() * layouts.len())),
        "{s}"
    );
    r.assert_worker_never_killed();
}

#[test]
fn without_mrg_rxbuf_one_buffer_per_frame_and_too_big_frames_are_dropped() {
    let r = rig(1, &["--mtu", "9000"]);
    let mut fe = r.connect(1, BASE);
    assert_eq!(fe.features() & VIRTIO_NET_F_MRG_RXBUF, 0);
    assert_eq!(fe.hdr_len(), 12, "VERSION_1 headers have num_buffers");
    let host = r.host(false);
    // Buffers as Linux posts them without MRG_RXBUF and without GUEST_TSO: header + 1514,
    // the header in its own descriptor.
    fe.post_rx_with_layout(0, 32, 12 + 1514, RxLayout::SeparateHeader);
    for (seq, len) in [(1u32, 60usize), (2, 1514), (3, 4000), (4, 100)] {
        host.send(&test_frame(MAC, [2, 0, 0, 0, 0, 1], len, seq))
            .unwrap();
    }
    // The 4000-byte frame fits no buffer: dropped; the frames around it arrive intact.
    for (seq, len) in [(1u32, 60usize), (2, 1514), (4, 100)] {
        let (h, f) = guest_recv(&mut fe, 0).unwrap();
        assert_eq!(f, test_frame(MAC, [2, 0, 0, 0, 0, 1], len, seq));
        assert_eq!(h.num_buffers, 1);
    }
    drop(fe);
    let s = r.summary_after_disconnect(1);
    assert!(s.contains("1 too big"), "{s}");
}

/// An IPv4/TCP frame with `payload` bytes, its TCP checksum set up for NEEDS_CSUM (the
/// pseudo-header sum) when `partial`, else complete.
fn tcp4(dst: [u8; 6], src: [u8; 6], payload: usize, seed: u32, partial: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + 20 + payload) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seed.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut body = tcp;
    let mut x = seed | 1;
    for _ in 0..payload {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.push(x as u8);
    }
    let pseudo = pseudo_sum(&ip, body.len());
    let c = if partial {
        fold(pseudo)
    } else {
        !fold(sum16(&body, pseudo))
    };
    body[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&body);
    f
}

fn sum16(b: &[u8], init: u32) -> u32 {
    b.chunks(2).fold(init, |s, c| {
        s + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
    })
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo_sum(ip: &[u8], tcp_len: usize) -> u32 {
    sum16(&ip[12..20], 6 + tcp_len as u32)
}

/// Checks an IPv4/TCP frame's checksums; returns its TCP payload.
fn tcp4_payload_verified(f: &[u8]) -> Vec<u8> {
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    let ip = &f[14..34];
    assert_eq!(fold(sum16(ip, 0)), 0xffff, "IPv4 header checksum");
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = &f[34..14 + tot];
    assert_eq!(
        fold(sum16(tcp, pseudo_sum(ip, tcp.len()))),
        0xffff,
        "TCP checksum"
    );
    tcp[20..].to_vec()
}

const TSO_HDR: NetHdr = NetHdr {
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
    hdr_len: 54,
    gso_size: 1448,
    csum_start: 34,
    csum_offset: 16,
    num_buffers: 0,
};

#[test]
fn offloads_follow_what_the_guest_negotiated() {
    let r = rig(1, &[]);
    let host = r.host(true);
    let peer = [2, 0, 0, 0, 0, 1];
    let big = tcp4(MAC, peer, 20000, 7, true);
    let host_hdr = |h: &NetHdr| h.to_bytes(10);

    // 1. The guest takes TSO: the tap hands over one 20 KB frame with its GSO header.
    let mut fe = r.connect(1, BASE | OFFLOADS | VIRTIO_NET_F_MRG_RXBUF);
    top_up(&mut fe, 0, 128, 1536);
    let mut m = host_hdr(&TSO_HDR);
    m.extend_from_slice(&big);
    host.send(&m).unwrap();
    let (h, f) = fe.recv(0, T).expect("TSO frame");
    assert_eq!(
        (h.gso_type, h.gso_size),
        (VIRTIO_NET_HDR_GSO_TCPV4, 1448),
        "{h:?}"
    );
    assert_eq!(
        h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_F_NEEDS_CSUM
    );
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert_eq!(f, big, "the 20 KB frame arrives whole and unchanged");

    // 2. The guest sends TSO (HOST_TSO4): the host sees the same GSO frame.
    let out = tcp4(peer, MAC, 30000, 8, true);
    fe.send(0, &TSO_HDR, &out).unwrap();
    let got = host
        .recv_matching(T, |g| g.len() > 10 && g[10..] == out[..])
        .expect("the guest's TSO frame never reached the host");
    let gh = NetHdr::from_bytes(&got[..10]);
    assert_eq!(
        (gh.gso_type, gh.gso_size),
        (VIRTIO_NET_HDR_GSO_TCPV4, 1448),
        "{gh:?}"
    );
    drop(fe);
    r.summary_after_disconnect(1);

    // 3. A guest without offloads: the kernel segments and checksums for it; every segment
    // fits 1514 bytes, has valid checksums, and together they carry the same payload.
    let mut fe = r.connect(1, BASE | VIRTIO_NET_F_MRG_RXBUF);
    top_up(&mut fe, 0, 128, 1536);
    host.send(&m).unwrap();
    let want = tcp4_payload_verified(&tcp4(MAC, peer, 20000, 7, false));
    let mut payload = Vec::new();
    while payload.len() < want.len() {
        let (h, f) = fe.recv(0, T).expect("segment");
        if f[12..14] != [0x08, 0x00] {
            continue;
        }
        assert_eq!(
            (h.flags, h.gso_type),
            (0, 0),
            "no offload reaches this guest: {h:?}"
        );
        assert!(f.len() <= 1514, "segment of {} bytes", f.len());
        payload.extend(tcp4_payload_verified(&f));
        top_up(&mut fe, 0, 128, 1536);
    }
    assert_eq!(payload, want);

    // 4. Without HOST_TSO4 a TSO header is refused: dropped and counted, TX goes on.
    fe.send(0, &TSO_HDR, &out).unwrap();
    let plain = test_frame(BCAST, MAC, 100, 99);
    fe.send(0, &NetHdr::default(), &plain).unwrap();
    assert!(host
        .recv_matching(T, |g| g.len() > 10 && g[10..] == plain[..])
        .is_some());
    drop(fe);
    let s = r.summary_after_disconnect(2);
    assert!(s.contains("1 bad header"), "{s}");
    r.assert_worker_never_killed();
}

/// A UDP/IPv4 frame of flow `port`: the tap steers flows to queues by hash.
fn udp4(dst: [u8; 6], port: u16, seq: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![
        0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&40u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(74, 0xab);
    f
}

fn udp_seq(f: &[u8]) -> Option<u32> {
    (f.len() >= 46 && f[12..14] == [0x08, 0x00] && f[23] == 17)
        .then(|| u32::from_be_bytes([f[42], f[43], f[44], f[45]]))
}

/// Sends `flows` UDP frames from the host and collects them from both pairs; returns how many
/// each pair received.
fn spread(
    fe: &mut NetFrontend,
    host: &PacketSocket,
    base: u32,
    flows: u32,
    pairs: &[usize],
) -> Vec<usize> {
    for p in pairs {
        top_up(fe, *p, 128, 1536);
    }
    for i in 0..flows {
        host.send(&udp4(MAC, 1000 + i as u16, base + i)).unwrap();
    }
    let mut got = BTreeSet::new();
    let mut per = vec![0; 2];
    let deadline = std::time::Instant::now() + T;
    while got.len() < flows as usize && std::time::Instant::now() < deadline {
        for &p in pairs {
            while let Some((_, f)) = fe.recv(p, Duration::from_millis(20)) {
                if let Some(s) = udp_seq(&f) {
                    assert!(got.insert(s), "frame {s} delivered twice");
                    per[p] += 1;
                }
            }
        }
    }
    assert!(got.iter().all(|s| (base..base + flows).contains(s)));
    per.push(got.len());
    per
}

#[test]
fn multiqueue_one_tap_queue_per_pair() {
    let r = rig(2, &["--offer-config"]);
    let mut fe = r.connect(2, BASE | OFFLOADS | VIRTIO_NET_F_MRG_RXBUF);
    assert_ne!(fe.features() & VIRTIO_NET_F_MQ, 0);
    assert_eq!(fe.config().unwrap().max_virtqueue_pairs, 2);
    let host = r.host(false);
    // TX on both pairs reaches the host.
    for pair in 0..2 {
        let f = test_frame(BCAST, MAC, 300, 100 + pair as u32);
        fe.send(pair, &NetHdr::default(), &f).unwrap();
        assert_eq!(host.recv_matching(T, |g| g == &f[..]).unwrap(), f);
    }
    // RX: the tap spreads 64 flows over both queues; every frame arrives exactly once.
    let per = spread(&mut fe, &host, 0, 64, &[0, 1]);
    assert_eq!(per[2], 64, "{per:?}");
    assert!(
        per[0] > 0 && per[1] > 0,
        "both pairs carry traffic: {per:?}"
    );
    // The guest stops using pair 1: its tap queue is detached (frames already steered to it
    // may be lost), after which all traffic arrives on pair 0.
    fe.device().set_vring_enable(2, false).unwrap();
    fe.device().set_vring_enable(3, false).unwrap();
    spread(&mut fe, &host, 1000, 64, &[0]);
    let per = spread(&mut fe, &host, 2000, 64, &[0]);
    assert_eq!(
        per[0], 64,
        "all flows on pair 0 once pair 1 is off: {per:?}"
    );
    // And back: the queue is re-attached as the worker handles the enable, a moment after the
    // frontend's message; until then the tap steers every flow to queue 0 (nothing is lost).
    fe.device().set_vring_enable(2, true).unwrap();
    fe.device().set_vring_enable(3, true).unwrap();
    let mut round = 0;
    loop {
        let per = spread(&mut fe, &host, 3000 + 100 * round, 64, &[0, 1]);
        assert_eq!(per[2], 64, "{per:?}");
        if per[1] > 0 {
            break;
        }
        round += 1;
        assert!(round < 20, "pair 1 never carries traffic again: {per:?}");
    }
    r.assert_worker_never_killed();
}

#[test]
fn reconnect_keeps_the_tap_and_serves_the_next_frontend() {
    let r = rig(1, &[]);
    let idx = r.ns.wait_link(TAP);
    let host = r.host(false);
    for round in 0..3u32 {
        let mut fe = r.connect(1, BASE | VIRTIO_NET_F_MRG_RXBUF);
        top_up(&mut fe, 0, 64, 1536);
        let out = test_frame(BCAST, MAC, 1000, round);
        fe.send(0, &NetHdr::default(), &out).unwrap();
        assert_eq!(host.recv_matching(T, |g| g == &out[..]).unwrap(), out);
        let inb = test_frame(MAC, [2, 0, 0, 0, 0, 1], 700, 100 + round);
        host.send(&inb).unwrap();
        assert_eq!(guest_recv(&mut fe, 0).unwrap().1, inb, "round {round}");
        drop(fe);
        r.summary_after_disconnect(round as usize + 1);
    }
    assert_eq!(r.ns.wait_link(TAP), idx, "the same tap throughout");
    r.assert_worker_never_killed();
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_backend_keeps_serving() {
    let mdir = tempfile::tempdir().unwrap();
    let msock = mdir.path().join("metrics.sock");
    let m = format!("unix:{}", msock.display());
    let r = rig(1, &["--metrics", &m]);
    let mut fe = r.connect(1, BASE | VIRTIO_NET_F_MRG_RXBUF);
    let host = r.host(false);
    let mem = fe.device().mem().clone();
    let good = {
        let mut b = NetHdr::default().to_bytes(12);
        b.extend(test_frame(BCAST, MAC, 200, 1));
        b
    };
    let at = mem.alloc(good.len(), 16);
    mem.write(at, &good);
    let big = mem.alloc(70000, 16);
    let end = mem.end();
    let d = |addr, len, flags, next| Desc {
        addr,
        len,
        flags,
        next,
    };
    let chains: Vec<Vec<Desc>> = vec![
        // A device-writable descriptor in a TX chain.
        vec![
            d(at, 12, VIRTQ_DESC_F_NEXT, 1),
            d(at + 12, 200, VIRTQ_DESC_F_WRITE, 0),
        ],
        // Beyond guest memory.
        vec![d(end - 16, 4096, 0, 0)],
        // Longer than any frame.
        vec![d(big, 70000, 0, 0)],
        // Only a header.
        vec![d(at, 12, 0, 0)],
        // A descriptor loop.
        vec![
            d(at, 12, VIRTQ_DESC_F_NEXT, 1),
            d(at + 12, 200, VIRTQ_DESC_F_NEXT, 0),
        ],
    ];
    let q = fe.device().queue(1);
    for c in &chains {
        q.add_raw_descs(c);
    }
    q.kick();
    for _ in &chains {
        q.wait_used(T)
            .expect("every malformed chain is returned to the guest");
    }
    // The device still works.
    let f = test_frame(BCAST, MAC, 200, 2);
    fe.send(0, &NetHdr::default(), &f).unwrap();
    assert_eq!(host.recv_matching(T, |g| g == &f[..]).unwrap(), f);
    drop(fe);
    let s = r.summary_after_disconnect(1);
    assert!(s.contains("tx 1 frames"), "{s}");
    assert!(s.contains("4 malformed, 1 oversize"), "{s}");
    // The same figures on --metrics, parsed by an OpenMetrics parser.
    let samples = scrape(&msock);
    let drops = |reason: &str| {
        value(
            &samples,
            "vhostbox_net_dropped_frames_total",
            &[("queue", "0"), ("direction", "tx"), ("reason", reason)],
        )
    };
    assert_eq!(drops("malformed"), 4.0);
    assert_eq!(drops("oversize"), 1.0);
    assert_eq!(drops("bad_header"), 0.0);
    let frames = |d: &str| {
        value(
            &samples,
            "vhostbox_net_frames_total",
            &[("queue", "0"), ("direction", d)],
        )
    };
    assert_eq!(frames("tx"), 1.0);
    assert_eq!(
        value(
            &samples,
            "vhostbox_net_bytes_total",
            &[("queue", "0"), ("direction", "tx")]
        ),
        f.len() as f64
    );
    r.assert_worker_never_killed();
}

#[test]
fn tap_fds_from_a_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ns = NetNs::new().unwrap();
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
    // The launcher opens two queues in its namespace; the backend runs outside it and never
    // needs CAP_NET_ADMIN or the namespace.
    let (q0, q1) = ns.run(|| {
        (
            open_tap("lnch0", flags, true).unwrap(),
            open_tap("lnch0", flags, true).unwrap(),
        )
    });
    ns.ip(&["link", "set", "lnch0", "up"]);
    use std::os::fd::AsRawFd;
    let fds = format!("{},{}", q0.as_raw_fd(), q1.as_raw_fd());
    let backend = Backend::start(
        NET,
        &sock,
        &[
            "--socket-path",
            sock.to_str().unwrap(),
            "--tap-fd",
            &fds,
            "--mac",
            "52:54:00:12:34:56",
        ],
    );
    drop((q0, q1));
    let log = backend.wait_log("ready");
    assert!(
        log.contains("tap lnch0 (from --tap-fd, 2 queue(s))"),
        "{log}"
    );
    let mut fe = NetFrontend::connect(
        &sock,
        2,
        BASE | VIRTIO_NET_F_MRG_RXBUF,
        &DeviceOptions::default(),
    )
    .unwrap();
    let host = ns.run(|| PacketSocket::bind("lnch0", false)).unwrap();
    for pair in 0..2 {
        let f = test_frame(BCAST, MAC, 400, pair as u32);
        fe.send(pair, &NetHdr::default(), &f).unwrap();
        assert_eq!(host.recv_matching(T, |g| g == &f[..]).unwrap(), f);
    }
    let per = spread(&mut fe, &host, 0, 32, &[0, 1]);
    assert_eq!(per[2], 32, "{per:?}");
}

#[test]
fn bad_taps_and_flags_exit_2_with_one_clear_line() {
    let ns = NetNs::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    // A single-queue tap that exists (persistent), a tun, and a tap without the vnet header.
    let (single, tun, novnet) = ns.run(|| {
        let single = open_tap("single0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, false).unwrap();
        persist(&single).unwrap();
        let tun = open_tap("tun0", 0x0001 | IFF_NO_PI, true).unwrap();
        let novnet = open_tap("plain0", IFF_TAP | IFF_NO_PI, true).unwrap();
        (single, tun, novnet)
    });
    drop(single);
    use std::os::fd::AsRawFd;
    let tun_fd = tun.as_raw_fd().to_string();
    let novnet_fd = novnet.as_raw_fd().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--tap", "lo"], "tap lo: cannot attach queue 1 of 1"),
        (
            vec!["--tap", "single0", "--queue-pairs", "2"],
            "not a multi-queue tap",
        ),
        (vec!["--tap-fd", "0"], "--tap-fd 0 is not a tap queue"),
        (
            vec!["--tap-fd", "987"],
            "--tap-fd 987 is not an open file descriptor",
        ),
        (
            vec!["--tap-fd", &tun_fd],
            "is a tun (layer 3) device tun0, not a tap",
        ),
        (
            vec!["--tap-fd", &novnet_fd],
            "was opened without IFF_VNET_HDR",
        ),
        (
            vec!["--tap", "t0", "--mac", "01:00:5e:00:00:01"],
            "multicast",
        ),
        (
            vec!["--tap", "t0", "--mac", "zz:00:00:00:00:01"],
            "is not a MAC address",
        ),
        (
            vec!["--tap", "t0", "--queue-pairs", "33"],
            "out of range 1-32",
        ),
        (vec!["--tap", "t0", "--mtu", "9"], "--mtu 9 is out of range"),
        (vec!["--tap", "t0", "--tap-fd", "3"], "cannot be used with"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--socket-path", s];
        args.extend(extra.iter().copied());
        let (code, err) = ns.run(|| run_to_exit(NET, &args));
        assert_eq!(code, 2, "{args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains(want),
            "{args:?}: wanted {want:?} in the first line of {err:?}"
        );
        assert!(!sock.exists(), "{args:?} left its socket behind");
    }
    // Nothing was created on the way.
    assert!(ns.run(|| ifindex("t0")).is_none());
    drop((tun, novnet));
}

#[test]
fn the_serving_worker_is_jailed_and_holds_only_its_tap() {
    let r = rig(2, &[]);
    let mut fe = r.connect(2, BASE | VIRTIO_NET_F_MRG_RXBUF);
    let host = r.host(false);
    let f = test_frame(BCAST, MAC, 300, 1);
    fe.send(1, &NetHdr::default(), &f).unwrap();
    assert_eq!(host.recv_matching(T, |g| g == &f[..]).unwrap(), f);
    let pid = r.backend.worker_pid();
    // Every thread filtered and without privilege; own namespaces; an empty root.
    assert_jailed(pid);
    // Open: the two tap queues, sockets, eventfds and epoll, guest memory, the log, /dev/null.
    let mut taps = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let t = std::fs::read_link(e.unwrap().path()).unwrap();
        let t = t.to_string_lossy();
        if t == "/dev/net/tun" {
            taps += 1;
            continue;
        }
        let ok = t.starts_with("socket:")
            || t.starts_with("anon_inode:")
            || t.starts_with("pipe:")
            || t.starts_with("/memfd:")
            || t.ends_with(".log")
            || t == "/dev/null";
        assert!(ok, "unexpected fd -> {t}");
    }
    assert_eq!(taps, 2, "one fd per tap queue");
}

/// What libvirt users hit: a tap vhostbox-net creates is brought up (the operator's own tap
/// that is down is named loudly in the log), and QEMU, whose virtio-net refuses
/// VHOST_USER_PROTOCOL_F_CONFIG, is not offered it unless --offer-config asks for it.
#[test]
fn a_created_tap_is_up_a_down_tap_is_named_and_config_is_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new().expect("network namespace");
    // Administratively up: "UP" among the flags `ip -o link` prints in <...>.
    let up = |name: &str| {
        let out = ns.run(|| {
            std::process::Command::new("ip")
                .args(["-o", "link", "show", name])
                .output()
                .unwrap()
        });
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let flags = text.split('<').nth(1).and_then(|r| r.split('>').next());
        flags
            .unwrap_or_else(|| panic!("no flags in {text:?}"))
            .split(',')
            .any(|f| f == "UP")
    };

    let sock = dir.path().join("created.sock");
    let s = sock.to_str().unwrap();
    let b = ns.run(|| Backend::start(NET, &sock, &["--socket-path", s, "--tap", "mk0"]));
    let log = b.wait_log("ready; waiting for a frontend");
    assert!(up("mk0"), "the tap it created is up\n{log}");
    assert!(!log.contains("is DOWN"), "{log}");
    let fe = NetFrontend::connect(&sock, 1, BASE, &DeviceOptions::default()).unwrap();
    let pf = fe_protocol_features(fe);
    assert_eq!(
        pf & (1 << 9),
        0,
        "no CONFIG without --offer-config: {pf:#x}"
    );
    drop(b);

    // The operator's tap, left down.
    ns.ip(&[
        "tuntap",
        "add",
        "dn0",
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
    ]);
    let sock = dir.path().join("down.sock");
    let s = sock.to_str().unwrap();
    let b = ns.run(|| {
        Backend::start(
            NET,
            &sock,
            &["--socket-path", s, "--tap", "dn0", "--offer-config"],
        )
    });
    let log = b.wait_log("ready; waiting for a frontend");
    assert!(
        log.contains("*** tap dn0 is DOWN") && log.contains("ip link set dn0 up"),
        "{log}"
    );
    assert!(!up("dn0"), "someone else's tap is left as it is");
    let fe = NetFrontend::connect(&sock, 1, BASE, &DeviceOptions::default()).unwrap();
    assert_ne!(
        fe_protocol_features(fe) & (1 << 9),
        0,
        "CONFIG with --offer-config"
    );
}

fn fe_protocol_features(mut fe: NetFrontend) -> u64 {
    fe.device().protocol_features()
}

/// Two queue pairs asked of a one-pair backend: the log names the ring and `--queue-pairs`.
#[test]
fn asking_for_more_pairs_than_offered_names_queue_pairs() {
    let r = rig(1, &[]);
    // REPLY_ACK but not MQ: a frontend that does not ask GET_QUEUE_NUM first (QEMU does).
    let opts = DeviceOptions {
        protocol_features: 1 << 3,
        ..Default::default()
    };
    assert!(NetFrontend::connect(&r.sock, 2, BASE, &opts).is_err());
    let log = r.backend.wait_log("refused SET_VRING_NUM: ring 2");
    assert!(
        log.contains("the device has 2 (rings 0-1; started as vhostbox-net --queue-pairs 1)"),
        "{log}"
    );
    // The next frontend that asks for what there is gets it.
    let mut fe = r.connect(1, BASE | VIRTIO_NET_F_MRG_RXBUF);
    let f = test_frame(BCAST, MAC, 200, 7);
    fe.send(0, &NetHdr::default(), &f).unwrap();
}
