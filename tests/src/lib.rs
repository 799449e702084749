//! Test harness for booting blockhaus in QEMU.
