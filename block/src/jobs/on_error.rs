//! What a job does when a request fails (QEMU: `BlockdevOnError`,
//! `BlockErrorAction`, `block_job_error_action`, the `BLOCK_JOB_ERROR`
//! event).
//!
//! `report` fails the job with the error; `ignore` goes on (a mirror or
//! backup copies the chunk again later); `stop` pauses the job as if by
//! `job-pause` and sets its `io-status` (`failed`, `nospace` for ENOSPC)
//! until `job-resume`, which retries; `enospc` and `auto` stop on ENOSPC and
//! report anything else. Every decision but one taken for a cancelled job
//! is announced with `BLOCK_JOB_ERROR {"device", "operation", "action"}`.

use serde_json::json;

use crate::io::IoError;
use crate::job::Job;
use crate::qmp::{Args, QmpError};

/// QEMU's `BlockdevOnError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Go on.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Pause the job.
    Stop,
    /// As `enospc` (QEMU: inherit the device's setting; a job has none).
    Auto,
}

const NAMES: [&str; 5] = ["report", "ignore", "enospc", "stop", "auto"];

impl OnError {
    /// Reads optional member `name` (default `report`).
    pub fn parse(args: &Args<'_>, name: &str) -> Result<OnError, QmpError> {
        Ok(match args.opt_enum_str(name, &NAMES)? {
            None | Some("report") => OnError::Report,
            Some("ignore") => OnError::Ignore,
            Some("enospc") => OnError::Enospc,
            Some("stop") => OnError::Stop,
            Some(_) => OnError::Auto,
        })
    }
}

/// QEMU's `BlockErrorAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// Fail.
    Report,
    /// Go on.
    Ignore,
    /// Pause.
    Stop,
}

impl ErrorAction {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// Decides what `job` does about `err` under `policy` (QEMU:
/// `block_job_error_action`): emits `BLOCK_JOB_ERROR` and, for `stop`,
/// pauses the job and records its io-status.
pub fn error_action(job: &Job, policy: OnError, is_read: bool, err: IoError) -> ErrorAction {
    let action = match policy {
        OnError::Enospc | OnError::Auto if err == IoError::Enospc => ErrorAction::Stop,
        OnError::Enospc | OnError::Auto | OnError::Report => ErrorAction::Report,
        OnError::Ignore => ErrorAction::Ignore,
        OnError::Stop => ErrorAction::Stop,
    };
    if !job.is_force_cancelled()
        && let Some(r) = job.registry()
    {
        r.emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": job.id(),
                "operation": if is_read { "read" } else { "write" },
                "action": action.as_str(),
            }),
        );
    }
    if action == ErrorAction::Stop {
        job.pause_for_error();
        job.set_io_status(if err == IoError::Enospc {
            "nospace"
        } else {
            "failed"
        });
    }
    action
}
