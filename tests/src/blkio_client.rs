//! A libblkio virtio-blk-vhost-user client (the `blkio` crate) with one memory region, as the
//! protocol tests drive a backend.

use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A started libblkio instance, its queues and one buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, buf_len: usize) -> Client {
        Client::connect_as(socket, num_queues, buf_len, false)
    }

    /// `connect`, read-only (libblkio refuses to start a read-only device otherwise).
    pub fn connect_as(socket: &Path, num_queues: i32, buf_len: usize, readonly: bool) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("driver");
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        if readonly {
            blkio.set_bool("read-only", true).unwrap();
        }
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", num_queues).unwrap();
        let out = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(buf_len).expect("alloc");
        blkio.map_mem_region(&region).expect("map");
        Client {
            blkio,
            queues: out.queues,
            region,
        }
    }

    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is a live mapping of region.len bytes owned by this client.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns them.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        let mut comps: Vec<std::mem::MaybeUninit<Completion>> =
            (0..n).map(|_| std::mem::MaybeUninit::uninit()).collect();
        while out.len() < n {
            let mut t = Duration::from_secs(30);
            let want = n - out.len();
            let got = self.queues[q]
                .do_io(&mut comps[..want], want, Some(&mut t), None)
                .expect("do_io");
            assert!(got > 0, "timed out waiting for completions");
            for c in &comps[..got] {
                // SAFETY: do_io initialised the first `got` completions.
                let c = unsafe { c.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    pub fn one(&mut self, q: usize) -> i32 {
        let r = self.wait(q, 1);
        r[0].1
    }

    pub fn read(&mut self, q: usize, off: u64, boff: usize, len: usize) -> i32 {
        let p = self.ptr(boff);
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.one(q)
    }

    pub fn write(&mut self, q: usize, off: u64, boff: usize, len: usize) -> i32 {
        let p = self.ptr(boff);
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
        self.one(q)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
