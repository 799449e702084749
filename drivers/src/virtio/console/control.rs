//! Control messages of a multiport virtio console (virtio 1.2 §5.3.6.2):
//! `struct virtio_console_control { le32 id; le16 event; le16 value; }`,
//! followed for `PORT_NAME` by the port's name. [`parse`] and [`encode`]
//! are pure and host-tested.

use alloc::string::String;

/// `VIRTIO_CONSOLE_DEVICE_READY` (driver → device).
pub const DEVICE_READY: u16 = 0;
/// `VIRTIO_CONSOLE_DEVICE_ADD` (device → driver; "PORT_ADD").
pub const DEVICE_ADD: u16 = 1;
/// `VIRTIO_CONSOLE_DEVICE_REMOVE` (device → driver).
pub const DEVICE_REMOVE: u16 = 2;
/// `VIRTIO_CONSOLE_PORT_READY` (driver → device).
pub const PORT_READY: u16 = 3;
/// `VIRTIO_CONSOLE_CONSOLE_PORT` (device → driver).
pub const CONSOLE_PORT: u16 = 4;
/// `VIRTIO_CONSOLE_RESIZE` (device → driver).
pub const RESIZE: u16 = 5;
/// `VIRTIO_CONSOLE_PORT_OPEN` (both ways: host connect/disconnect, guest
/// open/close).
pub const PORT_OPEN: u16 = 6;
/// `VIRTIO_CONSOLE_PORT_NAME` (device → driver).
pub const PORT_NAME: u16 = 7;

/// The header's size.
pub const HEADER: usize = 8;

/// A message from the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A port exists (QEMU: at `DEVICE_READY`, and on hot-plug).
    Added(u32),
    /// A port was unplugged.
    Removed(u32),
    /// The port is a console (`virtconsole`), not a plain serial port.
    Console(u32),
    /// The port's name (`virtserialport,name=...`).
    Name(u32, String),
    /// The host side connected (`true`) or disconnected (`false`).
    Open(u32, bool),
    /// Anything else (`RESIZE`, unknown events): (id, event, value).
    Other(u32, u16, u16),
}

/// Decodes a control message the device wrote (`len` bytes of `buf`);
/// `None` if it is shorter than the header. A name that is not UTF-8 is
/// taken lossily; a trailing NUL (Linux's driver tolerates one) is dropped.
pub fn parse(buf: &[u8]) -> Option<Message> {
    let header = buf.get(..HEADER)?;
    let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let event = u16::from_le_bytes([header[4], header[5]]);
    let value = u16::from_le_bytes([header[6], header[7]]);
    Some(match event {
        DEVICE_ADD => Message::Added(id),
        DEVICE_REMOVE => Message::Removed(id),
        CONSOLE_PORT if value == 1 => Message::Console(id),
        PORT_OPEN => Message::Open(id, value != 0),
        PORT_NAME => {
            let name = &buf[HEADER..];
            let name = name.split(|&b| b == 0).next().unwrap_or(name);
            Message::Name(id, String::from_utf8_lossy(name).into_owned())
        }
        _ => Message::Other(id, event, value),
    })
}

/// Encodes a message for the device.
pub fn encode(id: u32, event: u16, value: u16) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[..4].copy_from_slice(&id.to_le_bytes());
    b[4..6].copy_from_slice(&event.to_le_bytes());
    b[6..].copy_from_slice(&value.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_qemu_sends() {
        assert_eq!(parse(&encode(3, DEVICE_ADD, 1)), Some(Message::Added(3)));
        assert_eq!(
            parse(&encode(3, DEVICE_REMOVE, 1)),
            Some(Message::Removed(3))
        );
        assert_eq!(
            parse(&encode(0, CONSOLE_PORT, 1)),
            Some(Message::Console(0))
        );
        assert_eq!(
            parse(&encode(2, PORT_OPEN, 1)),
            Some(Message::Open(2, true))
        );
        assert_eq!(
            parse(&encode(2, PORT_OPEN, 0)),
            Some(Message::Open(2, false))
        );
        assert_eq!(
            parse(&encode(1, RESIZE, 0)),
            Some(Message::Other(1, RESIZE, 0))
        );
        let mut named = encode(1, PORT_NAME, 1).to_vec();
        named.extend_from_slice(b"org.qemu.qmp.0");
        assert_eq!(
            parse(&named),
            Some(Message::Name(1, "org.qemu.qmp.0".into()))
        );
        named.push(0);
        assert_eq!(
            parse(&named),
            Some(Message::Name(1, "org.qemu.qmp.0".into()))
        );
        assert_eq!(parse(&[1, 0, 0]), None, "shorter than the header");
    }

    #[test]
    fn encodes_little_endian() {
        assert_eq!(encode(0x0102_0304, PORT_READY, 1), [4, 3, 2, 1, 3, 0, 1, 0]);
    }
}
