//! Request alignment for protocol nodes over devices with a block size
//! larger than a byte (QEMU: `request_alignment`, the padding in
//! `bdrv_co_pwritev_part` / `bdrv_padding_rmw_read`, tracked requests and
//! `bdrv_make_request_serialising`).
//!
//! A device reads and writes whole logical blocks (512 bytes, or 4 KiB on
//! a 4K-sector disk). A request that is not aligned to them is done as a
//! read-modify-write of the covering blocks. Two such writes into the same
//! block, or an aligned write racing one, would each read the old block and
//! write back their own part: the last one wins and the other's bytes are
//! lost although its write was acknowledged. So every request is *tracked*
//! with the block range it touches, and a read-modify-write is
//! *serialising*: it waits for every earlier request overlapping its
//! blocks, and every later overlapping request waits for it. Requests that
//! are aligned and meet no serialising request never wait for each other.
//!
//! A request only ever waits for requests that were tracked before it, so
//! waiting cannot deadlock; a request dropped while it waits or runs (a
//! cancelled job) leaves the list at once.

use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::exec::WaitQueue;
use crate::io::{BoxFuture, IoError, IoResult};

/// One request in flight on a device.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Tracked {
    fn conflicts_with(&self, other: &Tracked) -> bool {
        (self.serialising || other.serialising) && self.start < other.end && other.start < self.end
    }
}

/// The requests in flight on one device (QEMU: `BlockDriverState::
/// tracked_requests`).
#[derive(Default)]
pub struct RequestTracker {
    list: RefCell<Vec<Tracked>>,
    next_id: Cell<u64>,
    done: WaitQueue,
}

/// A tracked request; it leaves the list when dropped.
pub struct TrackedRequest<'a> {
    tracker: &'a RequestTracker,
    id: u64,
}

impl Drop for TrackedRequest<'_> {
    fn drop(&mut self) {
        self.tracker.list.borrow_mut().retain(|t| t.id != self.id);
        self.tracker.done.wake_all();
    }
}

impl RequestTracker {
    /// An empty list.
    pub fn new() -> RequestTracker {
        RequestTracker::default()
    }

    /// Tracks a request on `[start, end)` and waits until no earlier
    /// request conflicts with it.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> TrackedRequest<'_> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let me = Tracked {
            id,
            start,
            end,
            serialising,
        };
        self.list.borrow_mut().push(me);
        let guard = TrackedRequest { tracker: self, id };
        self.done
            .wait_until(|| {
                !self
                    .list
                    .borrow()
                    .iter()
                    .any(|t| t.id < id && t.conflicts_with(&me))
            })
            .await;
        guard
    }

    /// Requests in flight (waiting or running).
    pub fn in_flight(&self) -> usize {
        self.list.borrow().len()
    }
}

/// A device that only takes whole, aligned blocks.
pub trait AlignedDevice {
    /// Reads `len` bytes at `offset`; both are multiples of the alignment.
    fn read_blocks(&self, offset: u64, len: usize) -> BoxFuture<'_, IoResult<Vec<u8>>>;

    /// Writes `data` at `offset`; both are multiples of the alignment.
    fn write_blocks(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, IoResult<()>>;
}

/// Byte-granular reads and writes over an [`AlignedDevice`], serialised
/// where they need a read-modify-write.
pub struct Aligner {
    align: u64,
    tracker: RequestTracker,
}

impl Aligner {
    /// For a device whose logical block is `align` bytes (0 is taken as 1).
    pub fn new(align: u32) -> Aligner {
        Aligner {
            align: u64::from(align.max(1)),
            tracker: RequestTracker::new(),
        }
    }

    /// The node's `request_alignment`.
    pub fn alignment(&self) -> u64 {
        self.align
    }

    /// Whether `[offset, offset + len)` is made of whole blocks.
    pub fn is_aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align) && len.is_multiple_of(self.align)
    }

    /// The whole blocks inside `[offset, offset + len)` as `(start, len)`,
    /// if there is one: what an advisory discard may drop.
    pub fn whole_blocks_within(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let start = offset.checked_next_multiple_of(self.align)?;
        let end = offset.checked_add(len)? / self.align * self.align;
        (end > start).then(|| (start, end - start))
    }

    /// The block-aligned range covering `[offset, offset + len)`.
    fn covering(&self, offset: u64, len: u64) -> IoResult<(u64, u64)> {
        let start = offset / self.align * self.align;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(self.align))
            .ok_or(IoError::Einval)?;
        Ok((start, end))
    }

    /// Tracks a request that is not a read or write (discard, write
    /// zeroes) on its covering blocks, so that it is ordered against a
    /// read-modify-write of the same blocks.
    pub async fn track(&self, offset: u64, len: u64) -> IoResult<TrackedRequest<'_>> {
        let (start, end) = self.covering(offset, len)?;
        Ok(self.tracker.begin(start, end, false).await)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(
        &self,
        dev: &dyn AlignedDevice,
        offset: u64,
        len: usize,
    ) -> IoResult<Vec<u8>> {
        let (start, end) = self.covering(offset, len as u64)?;
        let _tracked = self.tracker.begin(start, end, false).await;
        if self.is_aligned(offset, len as u64) {
            return dev.read_blocks(offset, len).await;
        }
        let buf = dev.read_blocks(start, (end - start) as usize).await?;
        let from = (offset - start) as usize;
        Ok(buf[from..from + len].to_vec())
    }

    /// Writes `data` at `offset`: directly when aligned, else as a
    /// serialised read-modify-write of the covering blocks.
    pub async fn write(
        &self,
        dev: &dyn AlignedDevice,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> IoResult<()> {
        let (start, end) = self.covering(offset, data.len() as u64)?;
        let rmw = !self.is_aligned(offset, data.len() as u64);
        let _tracked = self.tracker.begin(start, end, rmw).await;
        if !rmw {
            return dev.write_blocks(offset, data, fua).await;
        }
        let mut buf = dev.read_blocks(start, (end - start) as usize).await?;
        let from = (offset - start) as usize;
        buf[from..from + data.len()].copy_from_slice(&data);
        dev.write_blocks(start, buf, fua).await
    }

    /// Requests in flight on the device through this aligner.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::exec::{Executor, JoinHandle, yield_now};
    use alloc::rc::Rc;
    use alloc::vec;

    const BLOCK: u64 = 4096;

    /// A 4K-sector device in memory. Each request takes a number of
    /// executor turns chosen by a seeded generator, so requests in flight
    /// interleave as on a real device; unaligned requests are refused.
    struct Disk {
        data: RefCell<Vec<u8>>,
        rng: Cell<u64>,
        writes: Cell<usize>,
    }

    impl Disk {
        fn new(blocks: u64, seed: u64) -> Rc<Disk> {
            Rc::new(Disk {
                data: RefCell::new(vec![0xee; (blocks * BLOCK) as usize]),
                rng: Cell::new(seed | 1),
                writes: Cell::new(0),
            })
        }

        async fn delay(&self) {
            let mut x = self.rng.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng.set(x);
            for _ in 0..x % 5 {
                yield_now().await;
            }
        }

        fn check(offset: u64, len: u64) -> IoResult<()> {
            if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
                return Err(IoError::Einval);
            }
            Ok(())
        }
    }

    impl AlignedDevice for Rc<Disk> {
        fn read_blocks(&self, offset: u64, len: usize) -> BoxFuture<'_, IoResult<Vec<u8>>> {
            Box::pin(async move {
                Disk::check(offset, len as u64)?;
                self.delay().await;
                let o = offset as usize;
                Ok(self.data.borrow()[o..o + len].to_vec())
            })
        }

        fn write_blocks(
            &self,
            offset: u64,
            data: Vec<u8>,
            _fua: bool,
        ) -> BoxFuture<'_, IoResult<()>> {
            Box::pin(async move {
                Disk::check(offset, data.len() as u64)?;
                self.delay().await;
                let o = offset as usize;
                self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
                self.writes.set(self.writes.get() + 1);
                Ok(())
            })
        }
    }

    use alloc::boxed::Box;

    fn run(exec: &Executor) {
        for _ in 0..100_000 {
            if !exec.run_ready() {
                return;
            }
        }
        panic!("requests never finished");
    }

    fn spawn_write(
        exec: &Executor,
        al: &Rc<Aligner>,
        disk: &Rc<Disk>,
        offset: u64,
        data: Vec<u8>,
    ) -> JoinHandle<IoResult<()>> {
        let (al, disk) = (al.clone(), disk.clone());
        exec.spawn(async move { al.write(&disk, offset, data, false).await })
    }

    /// Issue 11's report: eight clients each write their own 512-byte
    /// piece of the same blocks at once; every piece must land.
    #[test]
    fn concurrent_sub_block_writes_into_shared_blocks_all_land() {
        for seed in 1..=20 {
            let exec = Executor::new();
            let disk = Disk::new(16, seed);
            let al = Rc::new(Aligner::new(BLOCK as u32));
            let mut handles = Vec::new();
            for block in 0..16u64 {
                for client in 0..8u64 {
                    let offset = block * BLOCK + client * 512;
                    let byte = (client as u8 + 1) * 0x11;
                    handles.push(spawn_write(&exec, &al, &disk, offset, vec![byte; 512]));
                }
            }
            run(&exec);
            for h in &handles {
                assert_eq!(h.try_take(), Some(Ok(())));
            }
            let data = disk.data.borrow();
            for block in 0..16u64 {
                for client in 0..8u64 {
                    let o = (block * BLOCK + client * 512) as usize;
                    let byte = (client as u8 + 1) * 0x11;
                    assert!(
                        data[o..o + 512].iter().all(|&b| b == byte),
                        "seed {seed}: block {block} piece {client} lost"
                    );
                }
            }
            assert_eq!(al.in_flight(), 0);
        }
    }

    /// An aligned write issued after a read-modify-write of the same block
    /// wins; one issued before it is kept under the RMW's piece.
    #[test]
    fn aligned_writes_are_ordered_against_read_modify_write() {
        for seed in 1..=20 {
            let exec = Executor::new();
            let disk = Disk::new(2, seed);
            let al = Rc::new(Aligner::new(BLOCK as u32));
            // Block 0: RMW first, whole block after.
            let a = spawn_write(&exec, &al, &disk, 100, vec![1; 10]);
            let b = spawn_write(&exec, &al, &disk, 0, vec![2; BLOCK as usize]);
            // Block 1: whole block first, RMW after.
            let c = spawn_write(&exec, &al, &disk, BLOCK, vec![3; BLOCK as usize]);
            let d = spawn_write(&exec, &al, &disk, BLOCK + 100, vec![4; 10]);
            run(&exec);
            for h in [a, b, c, d] {
                assert_eq!(h.try_take(), Some(Ok(())));
            }
            let data = disk.data.borrow();
            assert!(
                data[..BLOCK as usize].iter().all(|&x| x == 2),
                "seed {seed}"
            );
            let b1 = &data[BLOCK as usize..];
            assert!(b1[..100].iter().all(|&x| x == 3), "seed {seed}");
            assert!(b1[100..110].iter().all(|&x| x == 4), "seed {seed}");
            assert!(b1[110..].iter().all(|&x| x == 3), "seed {seed}");
        }
    }

    #[test]
    fn unaligned_reads_return_the_bytes_asked_for() {
        let exec = Executor::new();
        let disk = Disk::new(2, 7);
        disk.data.borrow_mut()[4000..4200].copy_from_slice(&[9; 200]);
        let al = Rc::new(Aligner::new(BLOCK as u32));
        let (a, d) = (al.clone(), disk.clone());
        let h = exec.spawn(async move { a.read(&d, 3990, 220).await });
        run(&exec);
        let got = h.try_take().unwrap().unwrap();
        assert_eq!(&got[..10], &[0xee; 10]);
        assert_eq!(&got[10..210], &[9; 200][..]);
        assert_eq!(&got[210..], &[0xee; 10]);
    }

    /// Requests that need no read-modify-write do not wait for each other.
    #[test]
    fn aligned_requests_do_not_serialise() {
        let t = RequestTracker::new();
        let exec = Executor::new();
        let t = Rc::new(t);
        let (t1, t2) = (t.clone(), t.clone());
        let first = exec.spawn(async move {
            let g = t1.begin(0, BLOCK, false).await;
            for _ in 0..3 {
                yield_now().await;
            }
            drop(g);
        });
        let second = exec.spawn(async move {
            let _g = t2.begin(0, BLOCK, false).await;
        });
        exec.run_ready();
        assert!(second.is_finished(), "an aligned request waited");
        assert!(!first.is_finished());
        run(&exec);
    }

    /// A request dropped while it waits (a cancelled job) leaves the list
    /// and does not hold up the ones after it.
    #[test]
    fn a_dropped_waiting_request_leaves_the_list() {
        let t = Rc::new(RequestTracker::new());
        let exec = Executor::new();
        let rmw = t.clone();
        let holder = exec.spawn(async move {
            let _g = rmw.begin(0, BLOCK, true).await;
            core::future::pending::<()>().await;
        });
        exec.run_ready();
        let waiting = t.clone();
        let mut fut = Box::pin(async move {
            let _g = waiting.begin(0, BLOCK, false).await;
        });
        let waker = crate::exec::noop_waker();
        let mut cx = core::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(t.in_flight(), 2);
        drop(fut);
        assert_eq!(t.in_flight(), 1);
        drop(holder);
    }
}
