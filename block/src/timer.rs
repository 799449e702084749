//! Time: the platform's clock and the executor's timer list.
//!
//! QEMU names: `QEMUClockType` (here the [`Clock`] trait the kernel
//! implements from its TSC or LAPIC timer) and `QEMUTimer` / `aio_timer`
//! (here [`TimerList`] and the [`Sleep`] future). The block layer never reads
//! hardware time itself: throttling, job speed limits and qemu-io's timings
//! all ask the clock they were given.
//!
//! Nothing here fires by itself: the platform's loop calls
//! [`TimerList::fire_expired`] with the current time, and asks
//! [`TimerList::next_deadline`] how long it may halt the CPU.

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

/// Nanoseconds since an arbitrary epoch (QEMU: `QEMU_CLOCK_REALTIME`).
pub trait Clock {
    /// The current time in nanoseconds; never goes backwards.
    fn now_ns(&self) -> u64;
}

/// A clock that only moves when told to: for host tests and for platforms
/// that advance time from their own tick.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Cell<u64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock to `ns` (never backwards).
    pub fn set(&self, ns: u64) {
        if ns > self.now.get() {
            self.now.set(ns);
        }
    }

    /// Moves the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.now.set(self.now.get().saturating_add(ns));
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }
}

struct Entry {
    id: u64,
    deadline: u64,
    waker: Waker,
}

#[derive(Default)]
struct Timers {
    next_id: Cell<u64>,
    entries: RefCell<Vec<Entry>>,
}

/// The pending timers of one executor (QEMU: `QEMUTimerList`). Cloning
/// gives another handle on the same list.
#[derive(Clone, Default)]
pub struct TimerList {
    inner: Rc<Timers>,
}

impl TimerList {
    /// An empty list.
    pub fn new() -> TimerList {
        TimerList::default()
    }

    /// A future that completes once `clock` reads at least `deadline_ns`.
    pub fn sleep_until(&self, clock: Rc<dyn Clock>, deadline_ns: u64) -> Sleep {
        Sleep {
            timers: self.clone(),
            clock,
            deadline: deadline_ns,
            id: None,
        }
    }

    /// Wakes every timer whose deadline is at or before `now_ns`; returns
    /// how many were woken.
    pub fn fire_expired(&self, now_ns: u64) -> usize {
        let expired: Vec<Waker> = {
            let mut entries = self.inner.entries.borrow_mut();
            let mut expired = Vec::new();
            entries.retain(|e| {
                if e.deadline <= now_ns {
                    expired.push(e.waker.clone());
                    false
                } else {
                    true
                }
            });
            expired
        };
        let n = expired.len();
        for w in expired {
            w.wake();
        }
        n
    }

    /// The earliest pending deadline, if any timer is armed.
    pub fn next_deadline(&self) -> Option<u64> {
        self.inner.entries.borrow().iter().map(|e| e.deadline).min()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.borrow().is_empty()
    }

    fn arm(&self, id: Option<u64>, deadline: u64, waker: &Waker) -> u64 {
        let mut entries = self.inner.entries.borrow_mut();
        if let Some(id) = id
            && let Some(e) = entries.iter_mut().find(|e| e.id == id)
        {
            e.waker.clone_from(waker);
            return id;
        }
        let id = self.inner.next_id.get();
        self.inner.next_id.set(id + 1);
        entries.push(Entry {
            id,
            deadline,
            waker: waker.clone(),
        });
        id
    }

    fn disarm(&self, id: u64) {
        self.inner.entries.borrow_mut().retain(|e| e.id != id);
    }
}

/// A future that completes at a deadline (QEMU: a coroutine in
/// `qemu_co_sleep_ns`). Dropping it disarms its timer.
pub struct Sleep {
    timers: TimerList,
    clock: Rc<dyn Clock>,
    deadline: u64,
    id: Option<u64>,
}

impl Sleep {
    /// The deadline in clock nanoseconds.
    pub fn deadline(&self) -> u64 {
        self.deadline
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.clock.now_ns() >= self.deadline {
            if let Some(id) = self.id.take() {
                self.timers.disarm(id);
            }
            return Poll::Ready(());
        }
        let id = self.timers.arm(self.id, self.deadline, cx.waker());
        self.id = Some(id);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.timers.disarm(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Executor;

    #[test]
    fn sleep_completes_when_fired_after_deadline() {
        let exec = Executor::new();
        let clock = Rc::new(ManualClock::new());
        let timers = exec.timers().clone();
        let c: Rc<dyn Clock> = clock.clone();
        let h = exec.spawn(async move {
            timers.sleep_until(c, 1000).await;
            7
        });
        exec.run_ready();
        assert!(!h.is_finished());
        assert_eq!(exec.timers().next_deadline(), Some(1000));
        clock.set(999);
        assert_eq!(exec.timers().fire_expired(999), 0);
        clock.set(1000);
        assert_eq!(exec.timers().fire_expired(1000), 1);
        exec.run_ready();
        assert_eq!(h.try_take(), Some(7));
        assert!(exec.timers().is_empty());
    }

    #[test]
    fn dropped_sleep_disarms() {
        let timers = TimerList::new();
        let clock: Rc<dyn Clock> = Rc::new(ManualClock::new());
        let mut s = alloc::boxed::Box::pin(timers.sleep_until(clock, 5));
        let w = crate::exec::noop_waker();
        let mut cx = Context::from_waker(&w);
        assert!(s.as_mut().poll(&mut cx).is_pending());
        assert!(s.as_mut().poll(&mut cx).is_pending());
        assert_eq!(timers.inner.entries.borrow().len(), 1);
        drop(s);
        assert!(timers.is_empty());
    }
}
