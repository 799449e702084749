//! QMP errors: QEMU's `Error` with its `QapiErrorClass`.
//!
//! A failed command answers `{"error": {"class": CLASS, "desc": TEXT}}`
//! (`qmp_error_response()` in `qapi/qmp-dispatch.c`). Almost every QEMU
//! error is a `GenericError` (`error_setg()`); the other classes survive
//! for compatibility (`error_set(errp, ERROR_CLASS_..., ...)`).
//!
//! The constructors named after QEMU's `QERR_*` macros
//! (`include/qapi/qmp/qerror.h`) produce their exact texts.

use alloc::format;
use alloc::string::String;
use core::fmt;
use serde::Serialize;

/// QEMU's `QapiErrorClass` (`qapi/error.json`); serialises as QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorClass {
    /// `GenericError`: everything from `error_setg()`.
    GenericError,
    /// `CommandNotFound`: unknown command, or not allowed yet.
    CommandNotFound,
    /// `DeviceNotActive`.
    DeviceNotActive,
    /// `DeviceNotFound`: e.g. an unknown `device`/`job-id` in some block
    /// commands.
    DeviceNotFound,
    /// `KVMMissingCap`.
    KVMMissingCap,
}

impl ErrorClass {
    /// The name QEMU puts in `"class"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error reply: class and human-readable description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description (`error_get_pretty()`).
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` (QEMU's `error_setg()`).
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// `QERR_MISSING_PARAMETER`: "Parameter 'NAME' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// `QERR_INVALID_PARAMETER_TYPE`: "Invalid parameter type for 'NAME',
    /// expected: EXPECTED".
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// `QERR_INVALID_PARAMETER_VALUE`: "Parameter 'NAME' expects EXPECTED".
    pub fn invalid_parameter_value(name: &str, expected: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// `QERR_INVALID_PARAMETER`: "Invalid parameter 'NAME'".
    pub fn invalid_parameter(name: &str) -> Self {
        Self::generic(format!("Invalid parameter '{name}'"))
    }

    /// The input visitor's check for leftover members: "Parameter 'NAME' is
    /// unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl core::error::Error for QmpError {}

/// What a command handler returns.
pub type QmpResult = Result<serde_json::Value, QmpError>;
