//! The `virtio_net_rx` / `virtio_net_tx` trace points: a smoltcp device
//! that hands the virtio-net device's tokens through, printing each frame's
//! length when the point is on (one check per frame when it is off).

use drivers::net::NetDevice;
use drivers::net::smoltcp::phy::{self, DeviceCapabilities, PacketMeta};
use drivers::net::smoltcp::time::Instant;

/// The device as smoltcp sees it.
pub struct Traced<'a>(pub &'a mut NetDevice);

pub struct Rx<T>(T);
pub struct Tx<T>(T);

impl<T: phy::RxToken> phy::RxToken for Rx<T> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        self.0.consume(|frame| {
            block::trace!(virtio_net_rx, "frame len {}", frame.len());
            f(frame)
        })
    }

    fn meta(&self) -> PacketMeta {
        self.0.meta()
    }
}

impl<T: phy::TxToken> phy::TxToken for Tx<T> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        block::trace!(virtio_net_tx, "frame len {len}");
        self.0.consume(len, f)
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.0.set_meta(meta);
    }
}

impl phy::Device for Traced<'_> {
    type RxToken<'a>
        = Rx<<NetDevice as phy::Device>::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<<NetDevice as phy::Device>::TxToken<'a>>
    where
        Self: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.0.receive(timestamp).map(|(r, t)| (Rx(r), Tx(t)))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.0.transmit(timestamp).map(Tx)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.0.capabilities()
    }
}
