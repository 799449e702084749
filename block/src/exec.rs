//! The executor: one thread, many tasks, nothing ever blocks.
//!
//! QEMU runs requests as coroutines in an `AioContext` whose event loop
//! (`aio_poll`) dispatches completions and timers. blockhaus runs them as
//! futures on this [`Executor`]; the platform supplies the event sources.
//!
//! # How the kernel drives it
//! ```text
//! loop {
//!     devices.poll_completions();        // wakes futures via stored Wakers
//!     exec.timers().fire_expired(clock.now_ns());
//!     let more = exec.run_ready();       // polls every task woken so far
//!     if !more && !devices.busy() { halt_until_interrupt(exec.timers().next_deadline()); }
//! }
//! ```
//! A synchronous caller that must wait for a future (a QMP handler, the
//! halt path) uses [`Executor::block_on`] with a [`Platform`] that does the
//! device polling and halting above; other tasks keep running meanwhile.
//!
//! Wakers are `Send + Sync` (as `core::task::Waker` requires) and only push
//! a task id into a queue under a short `spin` lock: wake futures from the
//! main loop's device polling, never from an interrupt handler that could
//! interrupt the lock holder.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::sync::Arc;
use alloc::task::Wake;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::future::Future;
use core::pin::{Pin, pin};
use core::sync::atomic::{AtomicBool, Ordering};
use core::task::{Context, Poll, Waker};

use crate::timer::TimerList;

/// What a synchronous waiter does while its future is pending (QEMU: the
/// body of `AIO_WAIT_WHILE` / `aio_poll(ctx, true)`).
pub trait Platform {
    /// Polls every event source once (device completion rings, network,
    /// timers through [`TimerList::fire_expired`]). If `may_halt` and nothing
    /// became ready, waits for the next interrupt or timer deadline.
    /// Returns `false` only if nothing can ever make progress again (a host
    /// test with no pending timers), which ends the wait with [`Stalled`].
    fn poll(&self, exec: &Executor, may_halt: bool) -> bool;
}

/// [`Executor::block_on`] gave up: the future was pending, no task was
/// ready and the platform reported that nothing could wake anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request stalled: nothing left that could complete it")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TaskKey {
    index: usize,
    generation: u64,
}

#[derive(Default)]
struct ReadyQueue {
    queue: spin::Mutex<VecDeque<TaskKey>>,
}

struct TaskWaker {
    key: TaskKey,
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready.queue.lock().push_back(self.key);
        }
    }
}

struct Task {
    future: Pin<Box<dyn Future<Output = ()>>>,
    waker: Arc<TaskWaker>,
}

enum Slot {
    Vacant,
    Idle(u64, Task),
    Running { generation: u64, rewoken: bool },
}

struct Inner {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    next_generation: RefCell<u64>,
    ready: Arc<ReadyQueue>,
    timers: TimerList,
}

/// A single-threaded executor of `!Send` futures. Cloning gives another
/// handle on the same executor.
#[derive(Clone)]
pub struct Executor {
    inner: Rc<Inner>,
}

impl Default for Executor {
    fn default() -> Self {
        Executor::new()
    }
}

impl Executor {
    /// An executor with no tasks.
    pub fn new() -> Executor {
        Executor {
            inner: Rc::new(Inner {
                slots: RefCell::new(Vec::new()),
                free: RefCell::new(Vec::new()),
                next_generation: RefCell::new(0),
                ready: Arc::new(ReadyQueue::default()),
                timers: TimerList::new(),
            }),
        }
    }

    /// This executor's timers.
    pub fn timers(&self) -> &TimerList {
        &self.inner.timers
    }

    /// Starts `future` as a task; it is polled by the next [`run_ready`].
    ///
    /// [`run_ready`]: Executor::run_ready
    pub fn spawn<T: 'static>(&self, future: impl Future<Output = T> + 'static) -> JoinHandle<T> {
        let state = Rc::new(RefCell::new(JoinState {
            result: None,
            waker: None,
            done: false,
        }));
        let s = state.clone();
        let task = async move {
            let v = future.await;
            let waker = {
                let mut st = s.borrow_mut();
                st.result = Some(v);
                st.done = true;
                st.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        };
        let generation = {
            let mut g = self.inner.next_generation.borrow_mut();
            *g += 1;
            *g
        };
        let index = match self.inner.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.inner.slots.borrow_mut();
                slots.push(Slot::Vacant);
                slots.len() - 1
            }
        };
        let key = TaskKey { index, generation };
        let waker = Arc::new(TaskWaker {
            key,
            queued: AtomicBool::new(false),
            ready: self.inner.ready.clone(),
        });
        waker.wake_by_ref();
        if let Some(slot) = self.inner.slots.borrow_mut().get_mut(index) {
            *slot = Slot::Idle(
                generation,
                Task {
                    future: Box::pin(task),
                    waker,
                },
            );
        }
        JoinHandle { state }
    }

    /// Whether a woken task waits to be polled.
    pub fn has_ready(&self) -> bool {
        !self.inner.ready.queue.lock().is_empty()
    }

    /// How many tasks exist (running or waiting).
    pub fn task_count(&self) -> usize {
        self.inner
            .slots
            .borrow()
            .iter()
            .filter(|s| !matches!(s, Slot::Vacant))
            .count()
    }

    /// Polls every task that was woken before this call (tasks woken while
    /// it runs wait for the next call), and returns whether any task is
    /// ready again. May be called from inside a task (a nested wait): the
    /// running task is then simply not polled again until it returns.
    pub fn run_ready(&self) -> bool {
        let batch: Vec<TaskKey> = self.inner.ready.queue.lock().drain(..).collect();
        for key in batch {
            self.poll_task(key);
        }
        self.has_ready()
    }

    fn poll_task(&self, key: TaskKey) {
        let mut task = {
            let mut slots = self.inner.slots.borrow_mut();
            let Some(slot) = slots.get_mut(key.index) else {
                return;
            };
            match slot {
                Slot::Idle(g, _) if *g == key.generation => {
                    match core::mem::replace(
                        slot,
                        Slot::Running {
                            generation: key.generation,
                            rewoken: false,
                        },
                    ) {
                        Slot::Idle(_, t) => t,
                        _ => return,
                    }
                }
                Slot::Running {
                    generation,
                    rewoken,
                } if *generation == key.generation => {
                    // Woken while being polled further up the stack.
                    *rewoken = true;
                    return;
                }
                _ => return,
            }
        };
        task.waker.queued.store(false, Ordering::Release);
        let waker = Waker::from(task.waker.clone());
        let mut cx = Context::from_waker(&waker);
        let done = task.future.as_mut().poll(&mut cx).is_ready();
        let mut slots = self.inner.slots.borrow_mut();
        let Some(slot) = slots.get_mut(key.index) else {
            return;
        };
        let rewoken = matches!(slot, Slot::Running { rewoken: true, .. });
        if done {
            *slot = Slot::Vacant;
            drop(slots);
            self.inner.free.borrow_mut().push(key.index);
        } else {
            *slot = Slot::Idle(key.generation, task);
            drop(slots);
            if rewoken {
                self.inner.ready.queue.lock().push_back(key);
            }
        }
    }

    /// Runs `future` to completion from synchronous code, running other
    /// tasks and polling the platform while it is pending (QEMU:
    /// `AIO_WAIT_WHILE`). Busy-polls while anything is ready; lets the
    /// platform halt when nothing is.
    pub fn block_on<F: Future>(
        &self,
        future: F,
        platform: &dyn Platform,
    ) -> Result<F::Output, Stalled> {
        let mut future = pin!(future);
        let flag = Arc::new(FlagWaker(AtomicBool::new(true)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            if flag.0.swap(false, Ordering::AcqRel)
                && let Poll::Ready(v) = future.as_mut().poll(&mut cx)
            {
                return Ok(v);
            }
            let more = self.run_ready();
            if more || flag.0.load(Ordering::Acquire) {
                platform.poll(self, false);
                continue;
            }
            if !platform.poll(self, true) && !self.has_ready() && !flag.0.load(Ordering::Acquire) {
                return Err(Stalled);
            }
        }
    }
}

struct FlagWaker(AtomicBool);

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// A [`Platform`] with no devices: time only moves to the next timer
/// deadline of a [`ManualClock`](crate::timer::ManualClock). Host tests use
/// it; once no timer is armed it reports that nothing can progress.
pub struct SimulatedPlatform {
    clock: Rc<crate::timer::ManualClock>,
}

impl SimulatedPlatform {
    /// A platform advancing `clock`.
    pub fn new(clock: Rc<crate::timer::ManualClock>) -> SimulatedPlatform {
        SimulatedPlatform { clock }
    }
}

impl Platform for SimulatedPlatform {
    fn poll(&self, exec: &Executor, may_halt: bool) -> bool {
        use crate::timer::Clock;
        let now = self.clock.now_ns();
        if exec.timers().fire_expired(now) > 0 {
            return true;
        }
        if !may_halt {
            return true;
        }
        match exec.timers().next_deadline() {
            Some(d) => {
                self.clock.set(d);
                exec.timers().fire_expired(d);
                true
            }
            None => false,
        }
    }
}

struct JoinState<T> {
    result: Option<T>,
    waker: Option<Waker>,
    done: bool,
}

/// The result of a spawned task: a future, or poll it with
/// [`JoinHandle::try_take`]. Dropping it detaches the task.
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has completed.
    pub fn is_finished(&self) -> bool {
        self.state.borrow().done
    }

    /// The task's result, once, if it has completed.
    pub fn try_take(&self) -> Option<T> {
        self.state.borrow_mut().result.take()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut st = self.state.borrow_mut();
        match st.result.take() {
            Some(v) => Poll::Ready(v),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A waker that does nothing.
pub fn noop_waker() -> Waker {
    Waker::noop().clone()
}

/// A future that yields to other tasks once (QEMU: `aio_co_schedule`
/// of oneself, `qemu_coroutine_yield` + re-enter).
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    core::future::poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

/// Runs `futures` concurrently and returns their outputs in order (QEMU:
/// the coroutines a driver spawns per child and waits for).
pub async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut pending: Vec<Option<Pin<Box<dyn Future<Output = T> + '_>>>> =
        futures.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    core::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, out) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// A set of wakers to wake together (QEMU: `CoQueue` / `AioWait`).
#[derive(Default)]
pub struct WaitQueue {
    wakers: RefCell<Vec<Waker>>,
}

impl WaitQueue {
    /// An empty queue.
    pub fn new() -> WaitQueue {
        WaitQueue::default()
    }

    /// Registers `waker` to be woken by the next [`wake_all`](Self::wake_all).
    pub fn register(&self, waker: &Waker) {
        let mut w = self.wakers.borrow_mut();
        if !w.iter().any(|x| x.will_wake(waker)) {
            w.push(waker.clone());
        }
    }

    /// Wakes every registered waker.
    pub fn wake_all(&self) {
        let wakers = core::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// Waits until `cond()` is true, re-checking after every wake.
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        core::future::poll_fn(|cx| {
            if cond() {
                Poll::Ready(())
            } else {
                self.register(cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    struct NoPlatform;
    impl Platform for NoPlatform {
        fn poll(&self, _: &Executor, _: bool) -> bool {
            false
        }
    }

    #[test]
    fn tasks_run_until_done_and_slots_are_reused() {
        let exec = Executor::new();
        let log = Rc::new(RefCell::new(Vec::new()));
        let l = log.clone();
        let a = exec.spawn(async move {
            l.borrow_mut().push(1);
            yield_now().await;
            l.borrow_mut().push(3);
            "a"
        });
        let l = log.clone();
        let b = exec.spawn(async move {
            l.borrow_mut().push(2);
        });
        assert_eq!(exec.task_count(), 2);
        assert!(exec.has_ready());
        assert!(exec.run_ready());
        assert_eq!(*log.borrow(), [1, 2]);
        assert!(b.is_finished());
        assert!(!exec.run_ready());
        assert_eq!(*log.borrow(), [1, 2, 3]);
        assert_eq!(a.try_take(), Some("a"));
        assert_eq!(exec.task_count(), 0);
        let c = exec.spawn(async { 5 });
        exec.run_ready();
        assert_eq!(c.try_take(), Some(5));
        assert_eq!(exec.inner.slots.borrow().len(), 2);
    }

    #[test]
    fn many_in_flight_complete_through_stored_wakers() {
        // A fake device: requests park their waker; "completion" wakes them.
        let exec = Executor::new();
        let parked: Rc<RefCell<Vec<(usize, Waker)>>> = Rc::default();
        let done: Rc<RefCell<Vec<usize>>> = Rc::default();
        for i in 0..32 {
            let parked = parked.clone();
            let done = done.clone();
            let completed = Rc::new(Cell::new(false));
            exec.spawn(async move {
                core::future::poll_fn(|cx| {
                    if completed.get() {
                        Poll::Ready(())
                    } else {
                        parked.borrow_mut().push((i, cx.waker().clone()));
                        completed.set(true); // completes on the next poll
                        Poll::Pending
                    }
                })
                .await;
                done.borrow_mut().push(i);
            });
        }
        assert!(!exec.run_ready());
        assert_eq!(parked.borrow().len(), 32);
        assert!(done.borrow().is_empty());
        for (_, w) in parked.borrow_mut().drain(..).rev() {
            w.wake();
        }
        assert!(!exec.run_ready());
        assert_eq!(done.borrow().len(), 32);
        assert_eq!(done.borrow()[0], 31);
    }

    #[test]
    fn block_on_runs_other_tasks_and_reports_stalls() {
        let exec = Executor::new();
        let q = Rc::new(WaitQueue::new());
        let flag = Rc::new(Cell::new(false));
        let (q2, f2) = (q.clone(), flag.clone());
        exec.spawn(async move {
            yield_now().await;
            f2.set(true);
            q2.wake_all();
        });
        let (q3, f3) = (q.clone(), flag.clone());
        let r = exec.block_on(
            async move {
                q3.wait_until(|| f3.get()).await;
                42
            },
            &NoPlatform,
        );
        assert_eq!(r, Ok(42));
        let never = core::future::pending::<()>();
        assert_eq!(exec.block_on(never, &NoPlatform), Err(Stalled));
    }

    #[test]
    fn nested_run_ready_does_not_lose_wakeups() {
        let exec = Executor::new();
        let e2 = exec.clone();
        let count = Rc::new(Cell::new(0));
        let c = count.clone();
        let h = exec.spawn(async move {
            for _ in 0..3 {
                // Wake ourselves, then run the executor from inside the task.
                yield_now().await;
                c.set(c.get() + 1);
                e2.run_ready();
            }
        });
        for _ in 0..10 {
            exec.run_ready();
        }
        assert!(h.is_finished());
        assert_eq!(count.get(), 3);
    }

    #[test]
    fn simulated_platform_advances_time_to_deadlines() {
        use crate::timer::{Clock, ManualClock};
        let exec = Executor::new();
        let clock = Rc::new(ManualClock::new());
        let p = SimulatedPlatform::new(clock.clone());
        let c: Rc<dyn Clock> = clock.clone();
        let t = exec.timers().clone();
        let r = exec.block_on(
            async move {
                t.sleep_until(c.clone(), 5_000).await;
                t.sleep_until(c.clone(), 9_000).await;
                c.now_ns()
            },
            &p,
        );
        assert_eq!(r, Ok(9_000));
    }
}
