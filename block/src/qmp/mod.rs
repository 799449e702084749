//! QMP (placeholder; being written).
