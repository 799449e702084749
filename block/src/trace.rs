//! Trace events (QEMU: `trace-events` files, `trace/control.c`, the QMP
//! commands of `trace/qmp.c` and `qapi/trace.json`).
//!
//! A trace point is a named place in the data or control path, in QEMU's
//! naming (`nbd_receive_request`, `virtio_blk_req_complete`,
//! `job_state_transition`, `bdrv_open_common`, ...). Each has a dynamic
//! state, one [`AtomicBool`] in a static array: [`trace!`](crate::trace!)
//! loads it and branches before anything is formatted, so a point that is
//! off costs one load and one well-predicted branch. A point that is on
//! hands its formatted arguments to the [sink](set_sink) the platform
//! installed (the kernel prints them on COM1, in QEMU's `log` backend
//! format).
//!
//! QMP: `trace-event-get-state` and `trace-event-set-state`, with QEMU's
//! argument shapes, `*` wildcards (and `?` inside a pattern, as glib's
//! `g_pattern_match_simple`), error texts and reply order; blockhaus has
//! one vCPU (index 0) and no vCPU-specific events. Also
//! `x-blockhaus-set-loglevel` / `x-blockhaus-query-loglevel`: the `log`
//! level, settable at run time (QEMU has no such command; its HMP `log`
//! takes QEMU's log-item masks, not a level, so reusing it would mislead).
//!
//! ```
//! block::trace!(bdrv_drain_begin, "bs {}", "disk0");
//! ```

use alloc::format;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use log::LevelFilter;
use serde_json::{Value, json};

use crate::qmp::{Args, Dispatcher, QmpError, Signature};

macro_rules! trace_points {
    ($($name:ident),* $(,)?) => {
        /// Every trace point, by its QEMU-style name.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum TraceId {
            $(
                #[doc = stringify!($name)]
                $name,
            )*
        }

        /// The names of the trace points, indexed by [`TraceId`].
        pub const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

trace_points! {
    // NBD server (nbd/trace-events, server side).
    nbd_negotiate_begin,
    nbd_negotiate_success,
    nbd_receive_request,
    nbd_co_send_simple_reply,
    nbd_co_send_chunk_done,
    nbd_co_send_chunk_read,
    nbd_co_send_chunk_read_hole,
    nbd_co_send_chunk_error,
    nbd_co_send_chunk_block_status,
    // virtio-blk, virtio-scsi and virtio-net (the kernel's device wrappers).
    virtio_blk_handle_read,
    virtio_blk_handle_write,
    virtio_blk_handle_flush,
    virtio_blk_req_complete,
    virtio_scsi_cmd_req,
    virtio_scsi_cmd_resp,
    virtio_net_rx,
    virtio_net_tx,
    // Jobs (job.c).
    job_state_transition,
    job_apply_verb,
    job_completed,
    // Nodes: open, close, drain (block.c, block/io.c).
    bdrv_open_common,
    bdrv_close,
    bdrv_drain_begin,
    bdrv_drain_end,
}

/// Number of trace points.
pub const COUNT: usize = NAMES.len();

/// The dynamic states of the global registry's points.
static DSTATE: [AtomicBool; COUNT] = [const { AtomicBool::new(false) }; COUNT];

/// Where an enabled point's line goes: its name and formatted arguments.
pub type Sink = fn(&'static str, fmt::Arguments<'_>);

static SINK: spin::Once<Sink> = spin::Once::new();

/// Installs the sink enabled points print to (once; later calls are
/// ignored). Without a sink, enabled points print nothing.
pub fn set_sink(sink: Sink) {
    SINK.call_once(|| sink);
}

/// Whether point `id` is on: the one check a disabled point costs.
#[inline(always)]
pub fn enabled(id: TraceId) -> bool {
    DSTATE[id as usize].load(Ordering::Relaxed)
}

/// Prints point `id` (called by [`trace!`](crate::trace!) once
/// [`enabled`] said yes).
#[cold]
pub fn emit(id: TraceId, args: fmt::Arguments<'_>) {
    if let Some(sink) = SINK.get() {
        sink(NAMES[id as usize], args);
    }
}

/// `trace!(point, "format", args...)`: prints the line if `point` is on;
/// formats nothing otherwise.
#[macro_export]
macro_rules! trace {
    ($id:ident, $($arg:tt)*) => {
        if $crate::trace::enabled($crate::trace::TraceId::$id) {
            $crate::trace::emit($crate::trace::TraceId::$id, format_args!($($arg)*));
        }
    };
}

/// QEMU's `TraceEventState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceState {
    /// Compiled out (QEMU's `disable` property).
    Unavailable,
    /// Available, off.
    Disabled,
    /// On.
    Enabled,
}

impl TraceState {
    /// The QAPI name.
    pub fn name(self) -> &'static str {
        match self {
            TraceState::Unavailable => "unavailable",
            TraceState::Disabled => "disabled",
            TraceState::Enabled => "enabled",
        }
    }
}

/// QEMU's `TraceEventInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEventInfo {
    /// The point's name.
    pub name: &'static str,
    /// Its state.
    pub state: TraceState,
    /// Whether it is vCPU-specific (never, here).
    pub vcpu: bool,
}

/// A set of trace points and their states: the global one
/// ([`Registry::global`]) or one a test builds.
#[derive(Debug, Clone, Copy)]
pub struct Registry<'a> {
    names: &'a [&'static str],
    /// Whether each point is compiled in.
    available: &'a [bool],
    state: &'a [AtomicBool],
}

/// Every global point is compiled in.
static ALL_AVAILABLE: [bool; COUNT] = [true; COUNT];

/// The vCPU indexes that exist: one vCPU.
const VCPUS: i64 = 1;

impl<'a> Registry<'a> {
    /// The appliance's trace points.
    pub fn global() -> Registry<'static> {
        Registry {
            names: NAMES,
            available: &ALL_AVAILABLE,
            state: &DSTATE,
        }
    }

    /// A registry over `names`, with their availability and states
    /// (slices of the same length).
    pub fn new(
        names: &'a [&'static str],
        available: &'a [bool],
        state: &'a [AtomicBool],
    ) -> Registry<'a> {
        assert!(names.len() == available.len() && names.len() == state.len());
        Registry {
            names,
            available,
            state,
        }
    }

    fn matching<'p>(&self, pattern: &'p str) -> impl Iterator<Item = usize> + use<'a, 'p> {
        let names = self.names;
        (0..names.len()).filter(move |&i| glob(pattern, names[i]))
    }

    /// QEMU's `get_cpu` and `check_events`.
    fn check(
        &self,
        name: &str,
        vcpu: Option<i64>,
        ignore_unavailable: bool,
    ) -> Result<(), QmpError> {
        if let Some(v) = vcpu
            && !(0..VCPUS).contains(&v)
        {
            return Err(QmpError::generic(format!(
                "invalid vCPU index {}",
                v as u32
            )));
        }
        if !name.contains('*') {
            let Some(i) = self.names.iter().position(|n| *n == name) else {
                return Err(QmpError::generic(format!("unknown event \"{name}\"")));
            };
            if vcpu.is_some() {
                return Err(QmpError::generic(format!(
                    "event \"{name}\" is not vCPU-specific"
                )));
            }
            if !ignore_unavailable && !self.available[i] {
                return Err(QmpError::generic(format!("event \"{name}\" is disabled")));
            }
            return Ok(());
        }
        if !ignore_unavailable && let Some(i) = self.matching(name).find(|&i| !self.available[i]) {
            return Err(QmpError::generic(format!(
                "event \"{}\" is disabled",
                self.names[i]
            )));
        }
        Ok(())
    }

    /// `trace-event-get-state`: the points `name` matches, in QEMU's
    /// order (the reverse of declaration: QEMU prepends to its list).
    pub fn get_state(
        &self,
        name: &str,
        vcpu: Option<i64>,
    ) -> Result<Vec<TraceEventInfo>, QmpError> {
        self.check(name, vcpu, true)?;
        if vcpu.is_some() {
            // No point is vCPU-specific: QEMU skips them all.
            return Ok(Vec::new());
        }
        let mut out: Vec<TraceEventInfo> = self
            .matching(name)
            .map(|i| TraceEventInfo {
                name: self.names[i],
                state: if !self.available[i] {
                    TraceState::Unavailable
                } else if self.state[i].load(Ordering::Relaxed) {
                    TraceState::Enabled
                } else {
                    TraceState::Disabled
                },
                vcpu: false,
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    /// `trace-event-set-state`: turns the available points `name` matches
    /// on or off; returns how many it set.
    pub fn set_state(
        &self,
        name: &str,
        enable: bool,
        ignore_unavailable: bool,
        vcpu: Option<i64>,
    ) -> Result<usize, QmpError> {
        self.check(name, vcpu, ignore_unavailable)?;
        if vcpu.is_some() {
            return Ok(0);
        }
        let mut n = 0;
        for i in self.matching(name) {
            if self.available[i] {
                self.state[i].store(enable, Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }
}

/// glib's `g_pattern_match_simple`: `*` matches any run of characters,
/// `?` any one character.
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == '?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The `log` levels, by their `loglevel=` names.
const LEVELS: [(&str, LevelFilter); 6] = [
    ("off", LevelFilter::Off),
    ("error", LevelFilter::Error),
    ("warn", LevelFilter::Warn),
    ("info", LevelFilter::Info),
    ("debug", LevelFilter::Debug),
    ("trace", LevelFilter::Trace),
];

fn level_name(level: LevelFilter) -> &'static str {
    LEVELS
        .iter()
        .find(|(_, l)| *l == level)
        .map_or("off", |(n, _)| n)
}

/// The `TraceEventInfo` list as QMP returns it.
fn info_value(list: &[TraceEventInfo]) -> Value {
    Value::Array(
        list.iter()
            .map(|e| json!({"name": e.name, "state": e.state.name(), "vcpu": e.vcpu}))
            .collect(),
    )
}

fn qmp_get_state<C>(_: &mut C, args: &Args<'_>) -> Result<Value, QmpError> {
    let name = args.str("name")?;
    let vcpu = args.opt_i64("vcpu")?;
    args.check_known(&["name", "vcpu"])?;
    Ok(info_value(&Registry::global().get_state(name, vcpu)?))
}

fn qmp_set_state<C>(_: &mut C, args: &Args<'_>) -> Result<Value, QmpError> {
    let name = args.str("name")?;
    let enable = args.bool("enable")?;
    let ignore = args.opt_bool("ignore-unavailable")?.unwrap_or(false);
    let vcpu = args.opt_i64("vcpu")?;
    args.check_known(&["name", "enable", "ignore-unavailable", "vcpu"])?;
    Registry::global().set_state(name, enable, ignore, vcpu)?;
    Ok(json!({}))
}

fn qmp_set_loglevel<C>(_: &mut C, args: &Args<'_>) -> Result<Value, QmpError> {
    let names = LEVELS.map(|(n, _)| n);
    let level = args.enum_str("level", &names)?;
    args.check_known(&["level"])?;
    let filter = LEVELS
        .iter()
        .find(|(n, _)| *n == level)
        .map_or(LevelFilter::Off, |(_, l)| *l);
    let old = log::max_level();
    log::set_max_level(filter);
    if old != filter {
        log::warn!("loglevel {} -> {level} (QMP)", level_name(old));
    }
    Ok(json!({}))
}

fn qmp_query_loglevel<C>(_: &mut C, args: &Args<'_>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    Ok(json!({"level": level_name(log::max_level())}))
}

/// Registers the trace and log-level commands and `TraceEventInfo`.
pub fn register<C>(d: &mut Dispatcher<C>) {
    d.register_type(
        "TraceEventInfo",
        "{name:str, state:(unavailable|disabled|enabled), vcpu:bool}",
    );
    d.register(
        "trace-event-get-state",
        Signature::new("name:str, vcpu?:int", "[@TraceEventInfo]"),
        qmp_get_state::<C>,
    );
    d.register(
        "trace-event-set-state",
        Signature::new(
            "name:str, enable:bool, ignore-unavailable?:bool, vcpu?:int",
            "{}",
        ),
        qmp_set_state::<C>,
    );
    d.register(
        "x-blockhaus-set-loglevel",
        Signature::new("level:(off|error|warn|info|debug|trace)", "{}"),
        qmp_set_loglevel::<C>,
    );
    d.register(
        "x-blockhaus-query-loglevel",
        Signature::new("", "{level:(off|error|warn|info|debug|trace)}"),
        qmp_query_loglevel::<C>,
    );
}
